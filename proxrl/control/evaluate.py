"""Evaluation: greedy actions (argmax of the logits / Gaussian mean; ``deterministic=False``: actions sampled
with a generator seeded from the evaluation seed), frozen obs-norm stats.

Each evaluation runs ``episodes`` episodes on a separate vector env with ``min(episodes, 32)`` sub-envs,
counting only the **first** episode of each sub-env per round (so short episodes are not over-represented),
reset with a seed derived from ``seed`` and the round number: the same policy and seed give the same
returns every time. Rewards are the env's raw rewards (never scaled).

:func:`eval_seed` is the seed of a run's evaluations during training; :func:`evaluate_run` uses it by
default, so it reproduces the evaluation logged at the run's last checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from proxrl.control.checkpointing import load_agent
from proxrl.control.envs import EnvFactory, SpaceInfo, derive_seed, env_call, make_vector_env
from proxrl.control.rollout import policy_forward
from proxrl.control.running_stats import ObsNormalizer
from proxrl.errors import UserError

__all__ = ["Evaluator", "eval_seed", "evaluate_run"]

EVAL_ENV_STREAM = 3  # derive_seed stream of the evaluation envs (train.py numbers the other streams)
SAMPLING_SUBSTREAM = 1  # derive_seed(seed, round, this): the action noise of a sampled (non-greedy) evaluation


def eval_seed(seed: int) -> int:
    """Seed of the evaluation envs of a run with config ``seed`` (the default of :func:`evaluate_run`)."""
    return derive_seed(seed, EVAL_ENV_STREAM)

MAX_EVAL_ENVS = 32
MAX_EPISODE_STEPS = 100_000  # guard against envs without a time limit


class Evaluator:
    """Holds an evaluation vector env open across evaluations."""

    def __init__(self, env_id: str, episodes: int, vector_mode: str = "auto", env_fn: EnvFactory | None = None,
                 deterministic: bool = True) -> None:
        self.episodes = episodes
        self.deterministic = deterministic
        self.env_id = env_id
        self.num_envs = min(episodes, MAX_EVAL_ENVS)
        self.venv, self.info = make_vector_env(env_id, self.num_envs, vector_mode, env_fn, evaluation=True)
        self._obs = np.zeros((self.num_envs, *self.info.obs_shape), self.info.obs_dtype)

    def close(self) -> None:
        self.venv.close()

    def evaluate(
        self, policy: nn.Module, obs_norm: ObsNormalizer, seed: int, record: list[np.ndarray] | None = None
    ) -> dict:
        """``{"mean_return", "std_return", "returns", "lengths"}`` over ``self.episodes`` episodes (greedy, or
        sampled from a generator seeded with ``(seed, round)`` when ``self.deterministic`` is false).

        ``policy`` acts on its own device. ``record``: if a list, the raw observations ``(k, *obs_shape)`` of
        the counted episodes are appended to it.
        """
        device = next(iter(policy.parameters())).device
        dist = self.info.dist
        returns: list[float] = []
        lengths: list[int] = []
        info: SpaceInfo = self.info
        n = self.num_envs
        round_ = 0
        while len(returns) < self.episodes:
            need = min(n, self.episodes - len(returns))
            obs, _ = env_call(self.env_id, "reset", self.venv.reset, seed=derive_seed(seed, round_))
            rng = None if self.deterministic else np.random.default_rng(derive_seed(seed, round_, SAMPLING_SUBSTREAM))
            ep_ret = np.zeros(n, np.float64)
            ep_len = np.zeros(n, np.int64)
            finished = np.zeros(n, dtype=bool)
            steps = 0
            while not finished[:need].all():
                if record is not None:
                    record.append(obs[:need][~finished[:need]].copy())
                obs_norm(obs, self._obs, update=False)
                action = _act(policy, dist, torch.from_numpy(self._obs).to(device), rng)
                if info.action_low is not None:
                    action = np.clip(action, info.action_low, info.action_high)
                else:
                    action = dist.to_env(action)
                obs, reward, terminated, truncated, _ = env_call(self.env_id, "step", self.venv.step, action)
                running = ~finished
                ep_ret += np.where(running, reward, 0.0)
                ep_len += running
                finished |= terminated | truncated
                steps += 1
                if steps > MAX_EPISODE_STEPS:
                    raise UserError(
                        f"evaluation episode did not end within {MAX_EPISODE_STEPS} steps; "
                        "wrap the env in gymnasium.wrappers.TimeLimit"
                    )
            returns.extend(ep_ret[:need].tolist())
            lengths.extend(ep_len[:need].tolist())
            round_ += 1
        arr = np.asarray(returns)
        return {
            "mean_return": float(arr.mean()),
            "std_return": float(arr.std()),
            "returns": returns,
            "lengths": lengths,
        }


def _act(policy: nn.Module, dist: Any, obs: Tensor, rng: np.random.Generator | None) -> np.ndarray:
    """Actions for ``obs`` ``(n, *obs_shape)``: the distribution's mode, or a sample from ``rng``'s noise."""
    if rng is None:
        return policy.deterministic_action(obs).cpu().numpy()
    with torch.inference_mode():
        out, _ = policy_forward(policy, obs)
        noise = torch.from_numpy(dist.noise(rng, obs.shape[0])).to(obs.device)
        action, _ = dist.sample_from_noise(out, None if dist.discrete else policy.log_std, noise)
    return action.cpu().numpy()


def evaluate_run(
    run_dir: str | Path, episodes: int | None = None, seed: int | None = None, env_fn: EnvFactory | None = None,
    device: str = "auto", video: int = 0, video_format: str = "auto", deterministic: bool | None = None,
) -> dict[str, Any]:
    """Evaluate the latest checkpoint of ``run_dir`` as training evaluated it (greedy actions unless the run's
    ``eval_deterministic`` is false; frozen obs stats).

    ``episodes=None`` and ``seed=None`` use the run's own ``eval_episodes`` and evaluation seed
    (:func:`eval_seed`), so by default this reproduces the ``eval_return_mean`` logged at that checkpoint.
    ``env_fn`` is needed only for runs trained on a Python env factory. ``device``: where the policy acts
    (``auto|cpu|cuda|cuda:N|mps``). ``video``: also record this many greedy episodes (the first reset with
    ``seed``) as MP4/GIF files in ``run_dir/videos`` (``video_format``: auto, mp4 or gif;
    :func:`proxrl.control.video.record_policy_episodes`). ``deterministic``: greedy (True) or sampled (False)
    actions, None = the run's ``eval_deterministic``. Returns ``{"mean_return", "std_return", "episodes",
    "returns", "lengths", "checkpoint", "seed", "device", "videos", "deterministic"}``.
    """
    from proxrl import distributed as D

    if episodes is not None and episodes < 1:
        raise UserError(f"episodes={episodes} must be at least 1")
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"seed={seed} must be in [0, 2**63); omit it to use the run's own evaluation seed")
    if video < 0:
        raise UserError(f"video={video} must be >= 0 (episodes to record)")
    dev = D.resolve_device(device)
    D.configure_device(dev)
    agent = load_agent(run_dir, dev)
    seed = eval_seed(agent.cfg.seed) if seed is None else seed
    episodes = agent.cfg.eval_episodes if episodes is None else episodes
    videos: list[str] = []
    if video:
        from proxrl.control.video import record_policy_episodes

        videos = [str(p) for p in record_policy_episodes(
            agent.policy, agent.obs_norm, agent.cfg.env_id, Path(run_dir) / "videos", episodes=video, seed=seed,
            env_fn=env_fn, fmt=video_format, name_prefix=f"eval-step-{agent.state.get('global_step', 0)}")]
    deterministic = agent.cfg.eval_deterministic if deterministic is None else deterministic
    evaluator = Evaluator(agent.cfg.env_id, episodes, agent.cfg.vector_mode, env_fn, deterministic=deterministic)
    torch.set_flush_denormal(True)  # as during training's evaluations (trainer.py), so the logged return is reproduced
    try:
        result = evaluator.evaluate(agent.policy, agent.obs_norm, seed)
    finally:
        torch.set_flush_denormal(False)
        evaluator.close()
    return {**result, "episodes": episodes, "checkpoint": str(agent.checkpoint), "seed": seed, "device": str(dev),
            "videos": videos, "deterministic": deterministic}
