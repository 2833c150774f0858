"""Videos of a policy playing: MP4 through Gymnasium's ``RecordVideo`` (needs moviepy), GIF otherwise.

:func:`record_episodes` plays ``episodes`` episodes of one env rendered as ``rgb_array`` and writes one file per
episode into ``out_dir``: ``<name_prefix>-episode-<i>.mp4`` with Gymnasium's ``RecordVideo`` wrapper when
moviepy is installed (``pip install 'proxrl[video]'``; it brings its own ffmpeg binary through imageio-ffmpeg),
else ``<name_prefix>-episode-<i>.gif`` written with Pillow (a matplotlib dependency, so always present).

The first episode is reset with ``seed`` and later ones continue the env's RNG, so the same policy and seed
give the same videos. Atari ids are built with :func:`proxrl.control.atari.make_atari_env` in evaluation mode
(whole games, raw rewards) and recorded at 60 / frame_skip frames per second, i.e. in real time. MuJoCo
envs render with OpenGL: without an X display ``MUJOCO_GL`` defaults to ``egl`` here (off-screen; set it to
``osmesa`` for software rendering), and pygame's ``SDL_VIDEODRIVER`` to ``dummy``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from proxrl.errors import UserError

__all__ = ["record_episodes", "video_format", "greedy_policy_fn", "record_policy_episodes", "check_can_record"]

FORMATS = ("auto", "mp4", "gif")


def video_format(fmt: str = "auto") -> str:
    """``"mp4"`` or ``"gif"``: ``auto`` picks MP4 when moviepy is installed. UserError for MP4 without moviepy."""
    if fmt not in FORMATS:
        raise UserError(f"video format {fmt!r} is not one of {', '.join(FORMATS)}")
    has_moviepy = importlib.util.find_spec("moviepy") is not None
    if fmt == "mp4" and not has_moviepy:
        raise UserError("MP4 videos need moviepy: pip install 'proxrl[video]' (or use the GIF format)")
    if fmt == "auto":
        return "mp4" if has_moviepy else "gif"
    return fmt


def greedy_policy_fn(policy: Any, obs_transform: Callable[[np.ndarray], np.ndarray] | None = None
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """``obs -> action`` for one unbatched observation from a policy's ``deterministic_action`` (a batch of 1).

    ``obs_transform`` maps the raw observation batch ``(1, ...)`` first (e.g. frozen observation normalisation);
    float observations reach the policy as float32, pixels as uint8, on the policy's device. The action comes
    back as the env expects it (``policy.dist.to_env`` for policies with an action distribution).
    """
    import torch

    device = next(iter(policy.parameters())).device
    dist = getattr(policy, "dist", None)

    def act(obs: np.ndarray) -> np.ndarray:
        batch = np.asarray(obs)[None]
        if obs_transform is not None:
            batch = obs_transform(batch)
        if np.issubdtype(batch.dtype, np.floating) and batch.dtype != np.float32:
            batch = batch.astype(np.float32)
        action = policy.deterministic_action(torch.as_tensor(batch).to(device)).cpu().numpy()
        return (dist.to_env(action) if dist is not None else action)[0]

    return act


def _make_env(env_id: str, env_fn: Callable[[], gym.Env] | None) -> tuple[gym.Env, int | None]:
    """An ``rgb_array`` env for ``env_id`` (or from ``env_fn``) and its real-time fps (None = the env's metadata)."""
    if not os.environ.get("DISPLAY"):
        # pygame (classic control) renders off-screen; SDL's default video driver would print
        # "error: XDG_RUNTIME_DIR is invalid ..." at exit on a headless machine
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    if env_fn is not None:
        env = env_fn()
        if env.render_mode != "rgb_array":
            env.close()
            raise UserError(f"video: the env factory for {env_id!r} must build the env with render_mode='rgb_array'")
        return env, None
    from proxrl.control.atari import AtariSettings, is_atari, make_atari_env

    if is_atari(env_id):
        return make_atari_env(env_id, evaluation=True, render_mode="rgb_array"), 60 // AtariSettings().frame_skip
    from proxrl.control.envs_extra import is_mujoco

    if is_mujoco(env_id) and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless: GLFW needs an X display; EGL renders off-screen
    try:
        env = gym.make(env_id, render_mode="rgb_array")
    except Exception as e:  # an id that cannot render, a missing dependency
        raise UserError(f"video: cannot build {env_id!r} with render_mode='rgb_array': {type(e).__name__}: {e}") from None
    return env, None


def _check_render(env: gym.Env, env_id: str) -> None:
    """UserError naming the missing package when ``env`` cannot render (pygame for classic control, OpenGL for MuJoCo)."""
    try:
        env.reset(seed=0)
        frame = env.render()
    except gym.error.DependencyNotInstalled as e:
        raise UserError(f"video: {env_id!r} cannot render: {e}") from None
    except Exception as e:  # e.g. MuJoCo without an OpenGL context (set MUJOCO_GL=egl or osmesa)
        raise UserError(f"video: {env_id!r} cannot render: {type(e).__name__}: {e}") from None
    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        raise UserError(f"video: {env_id!r} rendered {type(frame).__name__}, not an RGB array")


def _play(env: gym.Env, policy_fn: Callable[[np.ndarray], Any], seed: int | None, max_steps: int,
          frames: list[np.ndarray] | None) -> float:
    """One episode; appends rendered frames to ``frames`` when given. Returns the episode's return."""
    obs, _ = env.reset(seed=seed)
    if frames is not None:
        frames.append(env.render())
    space = env.action_space
    total = 0.0
    for _ in range(max_steps):
        action = policy_fn(obs)
        if isinstance(space, gym.spaces.Box):
            action = np.clip(action, space.low, space.high)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        if frames is not None:
            frames.append(env.render())
        if terminated or truncated:
            break
    return total


def _write_gif(path: Path, frames: list[np.ndarray], fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, 10 * round(100 / fps)), loop=0)  # GIF delays are in 1/100 s


def record_episodes(
    policy_fn: Callable[[np.ndarray], Any],
    env_id: str,
    out_dir: str | Path,
    episodes: int = 1,
    seed: int = 0,
    *,
    env_fn: Callable[[], gym.Env] | None = None,
    fmt: str = "auto",
    fps: int | None = None,
    name_prefix: str = "eval",
    max_steps: int = 3000,
) -> list[Path]:
    """Play ``episodes`` episodes with ``policy_fn`` (one observation -> one env action) and write one video each.

    ``env_fn``: a zero-argument factory returning an env with ``render_mode="rgb_array"`` (default: built from
    ``env_id``). ``fmt``: ``"auto"`` (MP4 if moviepy is installed, else GIF), ``"mp4"`` or ``"gif"``. ``fps``:
    frames per second of the file (default: real time). Episodes are cut after ``max_steps`` steps (frames are
    held in memory until written). Returns the paths written, in episode order.
    """
    if episodes < 1:
        raise UserError(f"video: episodes={episodes} must be at least 1")
    fmt = video_format(fmt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env, real_fps = _make_env(env_id, env_fn)
    fps = fps or real_fps or int(env.metadata.get("render_fps", 30))
    paths: list[Path] = []
    try:
        _check_render(env, env_id)
        if fmt == "mp4":
            import warnings

            with warnings.catch_warnings():  # "Overwriting existing videos": out_dir may hold other files
                warnings.simplefilter("ignore")
                env = gym.wrappers.RecordVideo(env, str(out), episode_trigger=lambda _: True, name_prefix=name_prefix,
                                               fps=fps, disable_logger=True)
            for i in range(episodes):
                _play(env, policy_fn, seed if i == 0 else None, max_steps, None)
                env.stop_recording()  # write this episode's file now (RecordVideo would wait for the next reset)
                paths.append(out / f"{name_prefix}-episode-{i}.mp4")
        else:
            for i in range(episodes):
                frames: list[np.ndarray] = []
                _play(env, policy_fn, seed if i == 0 else None, max_steps, frames)
                path = out / f"{name_prefix}-episode-{i}.gif"
                _write_gif(path, frames, fps)
                paths.append(path)
    finally:
        env.close()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"video: no file was written for {', '.join(missing)} (did the env render any frame?)")
    return paths


def _policy_env_fn(env_id: str, env_fn: Callable[[], gym.Env] | None) -> Callable[[], gym.Env] | None:
    """The rgb_array env factory :func:`record_policy_episodes` plays: Dict/Tuple observations flattened as in
    training; None for Atari ids (:func:`record_episodes` builds their evaluation env)."""
    from proxrl.control.atari import is_atari
    from proxrl.control.envs import make_env_fn
    from proxrl.control.envs_extra import flatten_observations, is_mujoco

    if env_fn is not None:
        return lambda: flatten_observations(env_fn())
    if is_atari(env_id):
        return None
    if env_id not in gym.registry:  # a "pkg.module:function" factory: it decides the render mode
        return make_env_fn(env_id)

    def make() -> gym.Env:
        if is_mujoco(env_id) and not os.environ.get("DISPLAY"):
            os.environ.setdefault("MUJOCO_GL", "egl")
        try:
            env = gym.make(env_id, render_mode="rgb_array")
        except Exception as e:  # an id that cannot render, a missing dependency
            raise UserError(f"video: cannot build {env_id!r} with render_mode='rgb_array': "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
        return flatten_observations(env)

    return make


def check_can_record(env_id: str, env_fn: Callable[[], gym.Env] | None = None, fmt: str = "auto") -> None:
    """One-line UserError now (before training) if videos of ``env_id`` cannot be recorded later."""
    video_format(fmt)
    make = _policy_env_fn(env_id, env_fn)
    env, _ = _make_env(env_id, make)
    try:
        _check_render(env, env_id)
    finally:
        env.close()


def record_policy_episodes(
    policy: Any,
    obs_norm: Any,
    env_id: str,
    out_dir: str | Path,
    episodes: int = 1,
    seed: int = 0,
    *,
    env_fn: Callable[[], gym.Env] | None = None,
    fmt: str = "auto",
    name_prefix: str = "eval",
    max_steps: int = 3000,
) -> list[Path]:
    """Videos of ``policy``'s greedy episodes (:func:`record_episodes`) with the frozen observation normaliser
    ``obs_norm`` (:class:`proxrl.control.running_stats.ObsNormalizer`) applied as in training; ``env_fn`` for
    runs trained on a Python env factory (it must build the env with ``render_mode="rgb_array"``)."""
    transform = None
    if obs_norm is not None and obs_norm.enabled:
        def transform(batch: np.ndarray) -> np.ndarray:
            return obs_norm(batch, np.empty(batch.shape, np.float32), update=False)

    return record_episodes(greedy_policy_fn(policy, transform), env_id, out_dir, episodes, seed,
                           env_fn=_policy_env_fn(env_id, env_fn), fmt=fmt, name_prefix=name_prefix, max_steps=max_steps)
