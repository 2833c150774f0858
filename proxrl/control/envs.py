"""Vectorised Gymnasium environments with one pinned autoreset mode, and the space checks PPO needs.

Autoreset mode: **NEXT_STEP**, for every vectorisation (native, sync, async). It is the only mode
Gymnasium 1.4's native ``CartPoleVectorEnv`` supports, and pinning one mode keeps a single code path:

* the step on which sub-env ``i`` terminates or is truncated returns its **true final observation** in
  ``obs[i]`` (so bootstrapping a truncated episode uses ``V(obs[i])``, the value we compute next anyway);
* the *following* ``step`` call ignores ``action[i]``, resets sub-env ``i`` and returns its first observation
  with ``reward 0, terminated False, truncated False``. That "reset step" is not a transition of the MDP;
  the rollout marks it invalid and the update drops it from the batch, so it never enters the losses.

Supported spaces: observations a flat 1-D ``Box``; actions ``Discrete`` (categorical policy) or a 1-D ``Box``
(diagonal Gaussian). Anything else raises :class:`UserError` naming the space.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from proxrl.errors import UserCodeError, UserError

__all__ = ["EnvFactory", "SpaceInfo", "make_env_fn", "make_vector_env", "space_info", "AUTORESET_MODE", "derive_seed",
           "env_call", "env_error"]

AUTORESET_MODE = AutoresetMode.NEXT_STEP
EnvFactory = Callable[[], gym.Env]


@dataclass(frozen=True)
class SpaceInfo:
    """What the policy needs to know about the spaces."""

    obs_dim: int
    discrete: bool
    action_dim: int  # number of actions (Discrete) or action vector length (Box)
    action_low: np.ndarray | None  # (action_dim,) float32 bounds of a Box, None for Discrete
    action_high: np.ndarray | None


def derive_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed that depends on ``seed`` and ``keys`` (distinct streams for train/eval/re-seeds)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] & 0x7FFFFFFF)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def env_error(env_id: str, call: str, e: BaseException) -> UserCodeError:
    """The one-line :class:`~proxrl.errors.UserCodeError` (exit 1) for exception ``e`` raised by the env's
    ``call`` (``"step"`` or ``"reset"``); raise it ``from e``."""
    return UserCodeError(f"env {env_id!r} raised in {call}(): {_one_line(e)}")


def env_call(env_id: str, call: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a call into the env, with any exception the env raises turned into
    :func:`env_error`; our own :class:`UserError` passes through unchanged."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as e:
        raise env_error(env_id, call, e) from e


def make_env_fn(env_id: str, env_fn: EnvFactory | None = None) -> EnvFactory:
    """A zero-argument factory for one env: ``env_fn`` if given, a ``pkg.module:function`` path, or ``gym.make(id)``."""
    if env_fn is not None:
        return env_fn
    if env_id in gym.registry:
        return lambda: gym.make(env_id)
    module_name, _, attr = env_id.partition(":")
    if attr and module_name:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            # Gymnasium's own "module:EnvId" form imports the module and then looks the id up.
            raise UserError(f"cannot import module {module_name!r} of env factory {env_id!r}: {e}") from None
        if attr in gym.registry:
            return lambda: gym.make(attr)
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UserError(f"env factory {env_id!r}: module {module_name!r} has no callable {attr!r}")
        return factory
    from proxrl.control.config import check_env_id

    check_env_id(env_id)  # raises with close matches
    raise UserError(f"cannot build env {env_id!r}")  # pragma: no cover


def _describe(space: Any) -> str:
    return f"{type(space).__name__} {space}"


def space_info(obs_space: spaces.Space, action_space: spaces.Space) -> SpaceInfo:
    """Check the single-env spaces and summarise them; UserError naming an unsupported space."""
    if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
        raise UserError(
            f"unsupported observation space {_describe(obs_space)}; proxrl control needs a flat 1-D Box "
            "(wrap Dict/image/Discrete observations, e.g. with gymnasium.wrappers.FlattenObservation)"
        )
    if isinstance(action_space, spaces.Discrete):
        if action_space.start != 0:
            raise UserError(f"unsupported action space {_describe(action_space)}; Discrete actions must start at 0")
        return SpaceInfo(int(obs_space.shape[0]), True, int(action_space.n), None, None)
    if isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
        low = action_space.low.astype(np.float32)
        high = action_space.high.astype(np.float32)
        return SpaceInfo(int(obs_space.shape[0]), False, int(action_space.shape[0]), low, high)
    raise UserError(
        f"unsupported action space {_describe(action_space)}; proxrl control supports Discrete and 1-D Box actions"
    )


def _has_native(env_id: str, env_fn: EnvFactory | None) -> bool:
    if env_fn is not None or env_id not in gym.registry:
        return False
    spec = gym.registry[env_id]
    return spec.vector_entry_point is not None and not spec.additional_wrappers


def make_vector_env(
    env_id: str, num_envs: int, mode: str = "auto", env_fn: EnvFactory | None = None
) -> tuple[gym.vector.VectorEnv, SpaceInfo]:
    """Build a vector env in NEXT_STEP autoreset mode and check its spaces.

    ``mode``: ``"native"`` uses the id's ``vector_entry_point`` (UserError if it has none or it is not
    NEXT_STEP), ``"sync"`` / ``"async"`` wrap ``num_envs`` single envs, ``"auto"`` = native when available.
    """
    use_native = mode == "native" or (mode == "auto" and _has_native(env_id, env_fn))
    if use_native:
        if not _has_native(env_id, env_fn):
            raise UserError(f"vector_mode='native' but env {env_id!r} has no native vector implementation; use sync")
        venv = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point")
        got = venv.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if got != AUTORESET_MODE:
            venv.close()
            if mode == "native":
                raise UserError(f"native vector env of {env_id!r} uses autoreset mode {got}; use vector_mode sync")
            return make_vector_env(env_id, num_envs, "sync", env_fn)
    else:
        factory = make_env_fn(env_id, env_fn)
        cls = gym.vector.AsyncVectorEnv if mode == "async" else gym.vector.SyncVectorEnv
        try:
            venv = cls([factory] * num_envs, autoreset_mode=AUTORESET_MODE)
        except UserError:
            raise
        except Exception as e:  # a broken factory / env constructor: user code
            raise UserCodeError(f"cannot create env {env_id!r}: {_one_line(e)}") from e
    try:
        info = space_info(venv.single_observation_space, venv.single_action_space)
    except UserError:
        venv.close()
        raise
    return venv, info
