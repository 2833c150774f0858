"""Environment checks and wrappers for the optional extras: which extra an id needs, Dict observations, image spaces.

* :func:`require_extra_for` -- call it before looking ``env_id`` up in ``gymnasium.registry``: it registers
  the ``ALE/`` ids (``import ale_py``) and raises a one-line :class:`UserError` naming the extra to install
  when an Atari or MuJoCo id is used without its package.
* :func:`flatten_observations` -- ``Dict`` / ``Tuple`` observations concatenated into one flat float vector
  (Gymnasium's ``FlattenObservation``: Box entries flattened, Discrete ones one-hot, in the space's key
  order), so the MLP policies take them.
* :func:`observation_kind` -- ``"vector"`` (MLP), ``"image"`` (CNN) or a UserError naming the space.
* :func:`quiet_mujoco_model_deprecations` -- MuJoCo's deprecation notices about a model file (Gymnasium's own
  ``half_cheetah.xml``) are dropped; its other warnings go to stderr.
"""
from __future__ import annotations

import importlib.util
import sys

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from proxrl.control.atari import is_atari
from proxrl.errors import UserError

__all__ = ["require_extra_for", "flatten_observations", "needs_flattening", "observation_kind", "is_mujoco",
           "quiet_mujoco_model_deprecations"]

# MuJoCo >= 4 says this of Gymnasium 1.x's half_cheetah.xml each time the model compiles (every env built)
_MODEL_DEPRECATION = "is deprecated and will be removed in a future release"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def is_mujoco(env_id: str) -> bool:
    """True for Gymnasium's MuJoCo ids (registered even without ``mujoco`` installed)."""
    spec = gym.registry.get(env_id)
    entry = spec.entry_point if spec is not None else None
    return isinstance(entry, str) and entry.startswith("gymnasium.envs.mujoco")


def require_extra_for(env_id: str) -> None:
    """UserError if ``env_id`` needs an extra that is not installed; registers the ALE ids when ale-py is.

    Example message: ``env 'ALE/Breakout-v5' needs the Atari emulator: pip install 'proxrl[atari]'``.
    """
    if is_atari(env_id):
        if not _installed("ale_py"):
            raise UserError(f"env {env_id!r} needs the Atari emulator (ale-py): pip install 'proxrl[atari]'")
        import ale_py

        gym.register_envs(ale_py)  # importing ale_py registers the ids; this keeps the import "used"
        return
    if is_mujoco(env_id):
        if not _installed("mujoco"):
            raise UserError(f"env {env_id!r} needs MuJoCo: pip install 'proxrl[mujoco]'")
        quiet_mujoco_model_deprecations()


def quiet_mujoco_model_deprecations() -> None:
    """Install a MuJoCo warning handler (once per process) that drops deprecation notices about model files.

    MuJoCo 4 warns that Gymnasium's ``half_cheetah.xml`` uses the deprecated ``settotalmass`` each time the model
    compiles, i.e. for every env built (8 times in a short run with evaluations), and its default handler also
    appends each warning to ``MUJOCO_LOG.TXT`` in the working directory. The user can do nothing about either.
    Every other MuJoCo warning (e.g. "Nan, Inf or huge value in QACC ... The simulation is unstable") goes to the
    handler installed before, or else to stderr as ``WARNING: ...``, without the log file.
    """
    import mujoco

    previous = mujoco.get_mju_user_warning()
    if getattr(previous, "proxrl_quiet", False):
        return

    def handler(message: str) -> None:
        if _MODEL_DEPRECATION in message:
            return
        if previous is not None:
            previous(message)
        else:
            print(f"WARNING: {message}", file=sys.stderr, flush=True)

    handler.proxrl_quiet = True  # type: ignore[attr-defined]
    mujoco.set_mju_user_warning(handler)


def needs_flattening(space: spaces.Space) -> bool:
    """True for composite observation spaces (Dict, Tuple) that :func:`flatten_observations` turns into a Box."""
    return isinstance(space, (spaces.Dict, spaces.Tuple))


def flatten_observations(env: gym.Env) -> gym.Env:
    """``env`` with Dict/Tuple observations flattened to a 1-D float32 Box (unchanged otherwise)."""
    if needs_flattening(env.observation_space):
        flat = gym.wrappers.FlattenObservation(env)
        box = flat.observation_space
        space = spaces.Box(box.low.astype(np.float32), box.high.astype(np.float32), dtype=np.float32)
        return gym.wrappers.TransformObservation(flat, lambda obs: obs.astype(np.float32), space)
    return env


def observation_kind(space: spaces.Space) -> str:
    """``"vector"`` for a 1-D Box, ``"image"`` for a 3-D uint8 Box; UserError naming any other space."""
    if isinstance(space, spaces.Box):
        if len(space.shape) == 1:
            return "vector"
        if len(space.shape) == 3 and space.dtype == "uint8":
            return "image"
    raise UserError(
        f"unsupported observation space {type(space).__name__} {space}; proxrl control takes 1-D Box observations "
        "(MLP policy), 3-D uint8 images (CNN policy) and Dict/Tuple ones (flattened); wrap others, e.g. with "
        "gymnasium.wrappers.FlattenObservation"
    )
