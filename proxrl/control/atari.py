"""Atari (ALE) environments with the standard preprocessing, built from Gymnasium's own wrappers.

For an ``ALE/...`` id, :func:`make_atari_env` returns (innermost first)::

    gym.make(env_id, frameskip=1)              ALE emulator, one frame per step (sticky actions: the id's default,
                                               0.25 for v5 ids, Machado et al. 2018)
    AtariPreprocessing(noop_max=30,            up to 30 random no-ops after reset; repeat each action 4 frames and
        frame_skip=4, screen_size=84,          max-pool the last two; 84x84 greyscale uint8 (INTER_AREA resize);
        terminal_on_life_loss=True)            training only: a lost life terminates the episode (and restarts the game)
    FireReset                                  games with a FIRE action: press it at the start of every life
                                               (evaluation: also after 1000 steps without reward or lost life)
    RecordEpisodeStatistics                    info["episode"] with the raw (unclipped) return of each episode
    ClipReward(-1, 1)                          training only: rewards clipped to [-1, 1] (= sign for Atari's integers)
    FrameStackObservation(4)                   observation (4, 84, 84) uint8, oldest frame first

``vector_mode="native"`` instead steps ale-py's own vector env,
``ale_py.vector_env.AtariVectorEnv`` (:func:`make_ale_vector_env`): the same preprocessing (no-op reset, frame
skip with max-pool, 84x84 grey, 4-frame stack, life loss = end of episode and a new game, reward clipping, FIRE at
reset, the id's sticky actions) done in C++ threads, ~5x the frames/s of ``async`` here. Two small differences,
seen when both are stepped without no-ops or sticky actions: its frame stack starts zero-filled after a reset
(Gymnasium's repeats the first frame) and its reset presses FIRE for one emulator frame (ours for a frame-skipped
step). A policy trained in one of the two is evaluated in the same one (whole games, raw rewards): the small
differences in how a life starts are enough for an early policy to score in one and not in the other (seen:
a mostly-LEFT policy after 125k steps, 0.81 points per life in ale-py's env, 0.25 in Gymnasium's). ale-py's env
presses FIRE only at a reset, so a greedy policy that never fires can idle until the 108k-frame limit:
evaluate such runs with sampled actions (``eval_deterministic=false``, the Atari preset's default).

(Mnih et al. 2015; the same steps as CleanRL's ``ppo_atari.py`` and SB3's ``AtariWrapper``.) One difference
from those: Gymnasium's ``terminal_on_life_loss`` restarts the game after a lost life, where SB3's
``EpisodicLifeEnv`` only reports the termination and plays on with one life fewer; training episodes are
therefore single lives. ``evaluation=True`` plays whole games with raw rewards (no life-loss termination, no
reward clipping), so evaluation returns are game scores. Gymnasium has no fire-reset wrapper: :class:`FireReset`
is the one hand-written piece (a dozen lines).

:func:`atari_settings` describes the preprocessing as a dict for ``config.yaml``. :func:`is_atari` recognises
the ids without importing ale-py.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from proxrl.errors import UserError

__all__ = ["AtariSettings", "FireReset", "is_atari", "make_atari_env", "atari_settings", "make_atari_env_fn",
           "make_ale_vector_env"]

EVAL_REFIRE_AFTER = 1000  # evaluation: press FIRE again after this many agent steps without reward or lost life

_LEGACY_ID = re.compile(r"[A-Z][A-Za-z]*(NoFrameskip|Deterministic)-v[04]")


def is_atari(env_id: str) -> bool:
    """True for ``ALE/<Game>-v5`` ids and the legacy ``<Game>NoFrameskip-v4`` / ``<Game>Deterministic-v4`` ones."""
    if env_id.startswith("ALE/") or _LEGACY_ID.fullmatch(env_id):
        return True
    spec = gym.registry.get(env_id)  # e.g. "Breakout-v4", registered once ale_py is imported
    return spec is not None and spec.entry_point == "ale_py.env:AtariEnv"


@dataclass(frozen=True)
class AtariSettings:
    """The preprocessing knobs (defaults: Mnih et al. 2015 / CleanRL ``ppo_atari``)."""

    noop_max: int = 30
    frame_skip: int = 4
    screen_size: int = 84
    frame_stack: int = 4
    terminal_on_life_loss: bool = True  # training envs only
    clip_rewards: bool = True  # training envs only
    fire_reset: bool = True  # only for games with a FIRE action
    repeat_action_probability: float | None = None  # None = the id's default (0.25 for ALE/...-v5)
    full_action_space: bool = False
    max_num_frames_per_episode: int = 108_000  # ALE's default: 30 minutes of play at 60 frames/s


class FireReset(gym.Wrapper):
    """Press FIRE at the start of every life: after ``reset`` and after a lost life that did not end the episode.

    Many games (Breakout's ball, ...) wait for FIRE; without it a fresh policy can idle until the time limit.
    The FIRE step's reward is added to the step that lost the life. The game sometimes misses the FIRE pressed
    right after a lost life (seen in ~5% of Breakout games with sticky actions), and a greedy policy that never
    presses FIRE itself then idles until the 108k-frame limit: with ``refire_after=k``, FIRE is pressed again
    once ``k`` agent steps pass without a reward or a lost life (used for evaluation envs, k = 1000, ~67 s of play).
    """

    def __init__(self, env: gym.Env, refire_after: int | None = None) -> None:
        super().__init__(env)
        self._fire = env.unwrapped.get_action_meanings().index("FIRE")
        self._lives = 0
        self.refire_after = refire_after
        self._quiet = 0  # agent steps since the last reward or lost life

    def _ale_lives(self) -> int:
        return int(self.env.unwrapped.ale.lives())

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        self.env.reset(**kwargs)
        obs, _, _, _, info = self.env.step(self._fire)
        self._lives = self._ale_lives()
        self._quiet = 0
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self._ale_lives()
        self._quiet = 0 if (reward != 0 or lives < self._lives) else self._quiet + 1
        stalled = self.refire_after is not None and self._quiet >= self.refire_after
        if (lives < self._lives or stalled) and not (terminated or truncated):
            obs, fire_reward, terminated, truncated, info = self.env.step(self._fire)
            reward += fire_reward
            lives = self._ale_lives()
            self._quiet = 0
        self._lives = lives
        return obs, reward, terminated, truncated, info


def _base_kwargs(s: AtariSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"frameskip": 1, "full_action_space": s.full_action_space,
                              "max_num_frames_per_episode": s.max_num_frames_per_episode}
    if s.repeat_action_probability is not None:
        kwargs["repeat_action_probability"] = s.repeat_action_probability
    return kwargs


def make_atari_env(
    env_id: str, settings: AtariSettings | None = None, *, evaluation: bool = False, render_mode: str | None = None
) -> gym.Env:
    """One preprocessed Atari env (see the module docstring); observations ``(frame_stack, 84, 84)`` uint8.

    ``evaluation=True``: whole games and raw rewards. ``render_mode="rgb_array"`` renders the emulator's
    210x160 RGB screen (for videos). Needs ale-py (``pip install 'proxrl[atari]'``) and opencv.
    """
    import ale_py

    gym.register_envs(ale_py)
    s = settings or AtariSettings()
    env = gym.make(env_id, render_mode=render_mode, **_base_kwargs(s))
    env = gym.wrappers.AtariPreprocessing(
        env, noop_max=s.noop_max, frame_skip=s.frame_skip, screen_size=s.screen_size,
        terminal_on_life_loss=s.terminal_on_life_loss and not evaluation, grayscale_obs=True, scale_obs=False,
    )
    if s.fire_reset and "FIRE" in env.unwrapped.get_action_meanings():
        env = FireReset(env, refire_after=EVAL_REFIRE_AFTER if evaluation else None)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    if s.clip_rewards and not evaluation:
        env = gym.wrappers.ClipReward(env, -1.0, 1.0)
    return gym.wrappers.FrameStackObservation(env, s.frame_stack)


def make_atari_env_fn(env_id: str, settings: AtariSettings | None = None, *, evaluation: bool = False,
                      render_mode: str | None = None):
    """A zero-argument factory of :func:`make_atari_env` (picklable enough for ``AsyncVectorEnv``)."""
    return lambda: make_atari_env(env_id, settings, evaluation=evaluation, render_mode=render_mode)


def _sticky(env_id: str, s: AtariSettings) -> float | None:
    """The sticky-action probability: the settings' value, else the id's default (0.25 for ``ALE/...-v5``)."""
    if s.repeat_action_probability is not None:
        return s.repeat_action_probability
    spec = gym.registry.get(env_id)
    return float(spec.kwargs.get("repeat_action_probability", 0.0)) if spec else None


def make_ale_vector_env(env_id: str, num_envs: int, settings: AtariSettings | None = None,
                        num_threads: int | None = None) -> gym.vector.VectorEnv:
    """``num_envs`` training envs of ``env_id`` in ale-py's C++ ``AtariVectorEnv``, preprocessed as
    :func:`make_atari_env` does (see the module docstring); observations ``(num_envs, frame_stack, 84, 84)``
    uint8, NEXT_STEP autoreset. ``reset(seed=s)`` seeds env ``i`` with ``s + i`` (as the sync/async envs are
    seeded). ``num_threads``: emulator threads, default ``min(num_envs, cpu count)``.
    """
    import os

    import ale_py
    from ale_py.vector_env import AtariVectorEnv

    gym.register_envs(ale_py)
    s = settings or AtariSettings()
    spec = gym.registry.get(env_id)
    if spec is None or "game" not in spec.kwargs:
        raise UserError(f"unknown Atari env id {env_id!r} for ale-py's vector env; e.g. ALE/Breakout-v5")
    sticky = _sticky(env_id, s)
    return AtariVectorEnv(
        spec.kwargs["game"], num_envs,
        num_threads=num_threads or min(num_envs, os.cpu_count() or 1),
        repeat_action_probability=0.0 if sticky is None else sticky,
        full_action_space=s.full_action_space, max_num_frames_per_episode=s.max_num_frames_per_episode,
        img_height=s.screen_size, img_width=s.screen_size, grayscale=True, stack_num=s.frame_stack,
        frameskip=s.frame_skip, maxpool=s.frame_skip > 1, noop_max=s.noop_max,
        episodic_life=s.terminal_on_life_loss, reward_clipping=s.clip_rewards, use_fire_reset=s.fire_reset,
        autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
    )


def atari_settings(env_id: str, settings: AtariSettings | None = None, vector_mode: str = "async") -> dict[str, Any]:
    """The preprocessing of ``env_id`` as a plain dict (for ``config.yaml``), sticky-action probability resolved;
    ``vector_mode``: the training envs' (``"native"`` = ale-py's ``AtariVectorEnv``)."""
    s = settings or AtariSettings()
    d = dataclasses.asdict(s)
    d["repeat_action_probability"] = _sticky(env_id, s)
    d.update(
        env_id=env_id,
        base_frameskip=1,
        max_pool_last_two_frames=s.frame_skip > 1,
        grayscale=True,
        observation_shape=[s.frame_stack, s.screen_size, s.screen_size],
        observation_dtype="uint8",
        wrappers=["AtariPreprocessing", *(["FireReset"] if s.fire_reset else []), "RecordEpisodeStatistics",
                  *(["ClipReward(-1, 1)"] if s.clip_rewards else []), "FrameStackObservation"],
        training_envs=("ale_py.vector_env.AtariVectorEnv (the same preprocessing in C++; evaluation too)"
                       if vector_mode == "native"
                       else f"the wrappers above in a {'sync' if vector_mode == 'sync' else 'async'} vector env"),
        evaluation="whole games, raw rewards (no life-loss termination, no reward clipping); FIRE pressed again "
                   f"after {EVAL_REFIRE_AFTER} agent steps without a reward or a lost life",
    )
    return d


def random_frames_per_second(env_id: str, num_envs: int = 8, frames: int = 10_000, seed: int = 0,
                             mode: str = "async") -> float:
    """Emulator frames per second (agent steps x frame_skip) of ``num_envs`` preprocessed envs under random actions
    (``mode``: ``"async"``, ``"sync"`` or ``"native"``)."""
    import time

    if mode == "native":
        venv = make_ale_vector_env(env_id, num_envs)
    else:
        cls = gym.vector.AsyncVectorEnv if mode == "async" else gym.vector.SyncVectorEnv
        venv = cls([make_atari_env_fn(env_id)] * num_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        venv.reset(seed=seed)
        rng = np.random.default_rng(seed)
        n_actions = int(venv.single_action_space.n)
        steps = max(1, frames // (num_envs * AtariSettings().frame_skip))
        t0 = time.perf_counter()
        for _ in range(steps):
            venv.step(rng.integers(0, n_actions, num_envs))
        return steps * num_envs * AtariSettings().frame_skip / (time.perf_counter() - t0)
    finally:
        venv.close()
