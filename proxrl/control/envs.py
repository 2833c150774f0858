"""Vectorised Gymnasium environments with one pinned autoreset mode, and the space checks PPO needs.

Autoreset mode: **NEXT_STEP**, for every vectorisation (native, sync, async). It is the only mode
Gymnasium 1.4's native ``CartPoleVectorEnv`` supports, and pinning one mode keeps a single code path:

* the step on which sub-env ``i`` terminates or is truncated returns its **true final observation** in
  ``obs[i]`` (so bootstrapping a truncated episode uses ``V(obs[i])``, the value we compute next anyway);
* the *following* ``step`` call ignores ``action[i]``, resets sub-env ``i`` and returns its first observation
  with ``reward 0, terminated False, truncated False``. That "reset step" is not a transition of the MDP;
  the rollout marks it invalid and the update drops it from the batch, so it never enters the losses.

Supported spaces (:func:`space_info`): observations a flat 1-D ``Box`` (MLP policies), a 3-D ``uint8`` image
``Box`` (Nature-CNN policy) or a ``Dict``/``Tuple`` of those flattened to one vector (every env is built through
:func:`~proxrl.control.envs_extra.flatten_observations`); actions ``Discrete``, ``MultiDiscrete``,
``MultiBinary`` or a 1-D ``Box`` (:func:`~proxrl.control.distributions.action_dist_for`). Anything else raises
:class:`UserError` naming the space. ``ALE/...`` ids get the standard Atari preprocessing
(:func:`~proxrl.control.atari.make_atari_env_fn`; ``evaluation=True`` for evaluation envs).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from proxrl.control.distributions import ActionDist, action_dist_for
from proxrl.errors import UserCodeError, UserError

__all__ = ["EnvFactory", "LeanSyncVectorEnv", "SpaceInfo", "make_env_fn", "make_vector_env", "space_info",
           "AUTORESET_MODE", "derive_seed", "env_call", "env_error"]

AUTORESET_MODE = AutoresetMode.NEXT_STEP
EnvFactory = Callable[[], gym.Env]


@dataclass(frozen=True)
class SpaceInfo:
    """What the policy and the rollout buffers need to know about the (single-env) spaces.

    ``obs_shape``: ``(obs_dim,)`` for vector observations, ``(C, H, W)`` / ``(H, W, C)`` for images;
    ``obs_kind``: ``"vector"`` (float32, MLP policy) or ``"image"`` (uint8, CNN policy); ``dist``: the action
    distribution; ``action_low``/``action_high``: ``(d,)`` float32 bounds of a Box action space (None otherwise).
    """

    obs_shape: tuple[int, ...]
    obs_kind: str
    dist: ActionDist
    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None

    @property
    def obs_dim(self) -> int:
        """Numbers per observation (``prod(obs_shape)``)."""
        return int(np.prod(self.obs_shape))

    @property
    def discrete(self) -> bool:
        """True for every action distribution without a Gaussian ``log_std``."""
        return self.dist.discrete

    @property
    def action_dim(self) -> int:
        """Width of the policy's action output: logits (Discrete: n; MultiDiscrete: sum(nvec)) or Box/MultiBinary size."""
        return self.dist.out_dim

    @property
    def obs_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.obs_kind == "image" else np.dtype(np.float32)

    def to_json(self) -> dict[str, Any]:
        """The JSON part of the summary (bounds go into tensors), for checkpoints; inverse :meth:`from_json`."""
        d = self.dist
        return {"obs_shape": list(self.obs_shape), "obs_kind": self.obs_kind, "obs_dim": self.obs_dim,
                "discrete": self.discrete, "action_dim": self.action_dim, "dist": {
                    "kind": d.kind, "size": d.size, "nvec": list(d.nvec),
                    "start": None if d.start is None else list(d.start)}}

    @staticmethod
    def from_json(space: dict[str, Any], low: np.ndarray | None, high: np.ndarray | None) -> "SpaceInfo":
        """Rebuild from :meth:`to_json` (also reads the older ``{obs_dim, discrete, action_dim}`` form)."""
        if "dist" in space:
            dd = space["dist"]
            start = dd.get("start")
            dist = ActionDist(str(dd["kind"]), int(dd["size"]), tuple(int(n) for n in dd["nvec"]),
                              None if start is None else tuple(int(s) for s in start))
            return SpaceInfo(tuple(int(s) for s in space["obs_shape"]), str(space["obs_kind"]), dist, low, high)
        n = int(space["action_dim"])
        dist = ActionDist("categorical", 1, (n,)) if bool(space["discrete"]) else ActionDist("gaussian", n)
        return SpaceInfo((int(space["obs_dim"]),), "vector", dist, low, high)


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


def make_env_fn(env_id: str, env_fn: EnvFactory | None = None, evaluation: bool = False) -> EnvFactory:
    """A zero-argument factory for one env whose Dict/Tuple observations come flattened
    (:func:`~proxrl.control.envs_extra.flatten_observations`).

    The env is ``env_fn()`` if given, the preprocessed Atari env for an Atari id
    (:func:`~proxrl.control.atari.make_atari_env_fn`, whole games and raw rewards with ``evaluation``), the
    function of a ``pkg.module:function`` path, or ``gym.make(id)``.
    """
    from proxrl.control.envs_extra import flatten_observations

    base = _base_env_fn(env_id, env_fn, evaluation)
    return lambda: flatten_observations(base())


def _base_env_fn(env_id: str, env_fn: EnvFactory | None, evaluation: bool) -> EnvFactory:
    from proxrl.control.atari import is_atari, make_atari_env_fn

    if env_fn is not None:
        return env_fn
    if is_atari(env_id):
        from proxrl.control.envs_extra import require_extra_for

        require_extra_for(env_id)
        return make_atari_env_fn(env_id, evaluation=evaluation)
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


def space_info(obs_space: spaces.Space, action_space: spaces.Space) -> SpaceInfo:
    """Check the single-env spaces and summarise them; one-line UserError naming an unsupported space.

    Observations: :func:`~proxrl.control.envs_extra.observation_kind` (1-D Box -> vector, 3-D uint8 Box ->
    image); actions: :func:`~proxrl.control.distributions.action_dist_for`.
    """
    from proxrl.control.envs_extra import observation_kind

    kind = observation_kind(obs_space)
    dist = action_dist_for(action_space)
    low = high = None
    if dist.kind == "gaussian":
        low = action_space.low.astype(np.float32)
        high = action_space.high.astype(np.float32)
    return SpaceInfo(tuple(int(s) for s in obs_space.shape), kind, dist, low, high)


def _has_native(env_id: str, env_fn: EnvFactory | None) -> bool:
    """Whether ``auto`` picks the id's own vector implementation (CartPole's, ...). Atari ids have one too,
    ale-py's ``AtariVectorEnv``, but only ``vector_mode="native"`` selects it (see :mod:`proxrl.control.atari`)."""
    from proxrl.control.atari import is_atari

    if env_fn is not None or env_id not in gym.registry or is_atari(env_id):
        return False
    spec = gym.registry[env_id]
    return spec.vector_entry_point is not None and not spec.additional_wrappers


class LeanSyncVectorEnv(gym.vector.SyncVectorEnv):
    """Gymnasium's ``SyncVectorEnv`` (NEXT_STEP autoreset) whose ``step`` skips what PPO's rollout never reads.

    Same env calls in the same order, so the same observations, rewards and flags, bit for bit
    (``tests/test_control_envs.py``); but ``step`` returns no ``infos`` (an empty dict) and stacks the
    observations straight into a fresh array, without Gymnasium's per-step info merging, action iterator and
    deep copy. That overhead is ~17 us of a ~90 us MuJoCo step with one env (HalfCheetah's preset: 1 env,
    1M steps). ``reset`` is the parent's, infos included. Used by :func:`make_vector_env` for ``sync`` (and
    ``auto`` without a native implementation); it needs a ``Box`` observation space, which every space proxrl
    trains on is once flattened (:func:`space_info` refuses the others before any step).
    """

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs = np.empty((self.num_envs, *self.single_observation_space.shape), self.single_observation_space.dtype)
        rewards, terms, truncs = self._rewards, self._terminations, self._truncations
        for i, env in enumerate(self.envs):
            if self._autoreset_envs[i]:  # NEXT_STEP: this call resets the env whose episode ended last step
                obs[i], _ = env.reset()
                rewards[i], terms[i], truncs[i] = 0.0, False, False
            else:
                obs[i], rewards[i], terms[i], truncs[i], _ = env.step(actions[i])
        self._autoreset_envs = terms | truncs
        return obs, rewards.copy(), terms.copy(), truncs.copy(), {}


def make_vector_env(
    env_id: str, num_envs: int, mode: str = "auto", env_fn: EnvFactory | None = None, evaluation: bool = False
) -> tuple[gym.vector.VectorEnv, SpaceInfo]:
    """Build a vector env in NEXT_STEP autoreset mode and check its spaces.

    ``mode``: ``"native"`` uses the id's ``vector_entry_point`` (UserError if it has none or it is not
    NEXT_STEP) or, for Atari ids, ale-py's ``AtariVectorEnv`` (evaluation: whole games, raw rewards);
    ``"sync"`` / ``"async"`` wrap ``num_envs`` single envs, ``"auto"`` = native when available (never for Atari).
    ``evaluation``: build evaluation envs (Atari: whole games, raw rewards).
    """
    use_native = mode == "native" or (mode == "auto" and _has_native(env_id, env_fn))
    from proxrl.control.atari import is_atari

    if use_native and env_fn is None and is_atari(env_id):
        from proxrl.control.atari import AtariSettings, make_ale_vector_env
        from proxrl.control.envs_extra import require_extra_for

        require_extra_for(env_id)
        # evaluation: whole games with raw rewards in the same emulator wrapper the policy trained in
        settings = AtariSettings(terminal_on_life_loss=False, clip_rewards=False) if evaluation else None
        venv = make_ale_vector_env(env_id, num_envs, settings)
    elif use_native:
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
        factory = make_env_fn(env_id, env_fn, evaluation)
        cls = gym.vector.AsyncVectorEnv if mode == "async" else LeanSyncVectorEnv
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
