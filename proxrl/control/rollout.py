"""Collecting rollouts from a NEXT_STEP vector env into preallocated tensors.

Layout (``T = rollout_steps``, ``N = num_envs``), all tensors allocated once and reused every update:

* ``obs[t]`` ``(T+1, N, obs_dim)``: the (normalised) observation the action at ``t`` was chosen from;
  ``obs[T]`` is the observation after the last step (carried over to ``obs[0]`` of the next rollout).
* ``actions[t]`` ``(T, N)`` int64 or ``(T, N, d)`` float32: the **raw** sampled action (sampled by
  :class:`~proxrl.control.policy.NumpyPolicy` with a numpy ``Generator``) (Box actions are
  clipped only in the copy sent to the env), ``logprobs[t]``, ``values[t] = V(obs[t])`` ``(T+1, N)``.
* ``rewards[t]``, ``terminated[t]``, ``truncated[t]``: the env's answer to that action (rewards scaled when
  ``norm_reward``).
* ``valid[t]``: False for a NEXT_STEP *reset step* (the env ignored the action and only reset); the
  update drops such entries from the batch before computing any loss (:func:`proxrl.control.ppo.ppo_update`).

In NEXT_STEP mode the observation returned on a done step is the true final observation, so the bootstrap
value of step ``t`` is simply ``next_values[t] = values[t + 1]`` -- for truncation this is
``V(final observation)``, and :func:`proxrl.core.gae` ignores it on termination.
"""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from proxrl.control.envs import SpaceInfo, env_call, env_error
from proxrl.control.policy import ActorCritic, NumpyPolicy
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.errors import UserError
from proxrl.runs.finite import check_finite, first_non_finite

__all__ = ["Rollout", "Collector"]


@dataclass
class Rollout:
    """Views of one rollout (see the module docstring for shapes)."""

    obs: Tensor  # (T, N, obs_dim)
    actions: Tensor  # (T, N) or (T, N, d)
    logprobs: Tensor  # (T, N)
    values: Tensor  # (T, N)
    next_values: Tensor  # (T, N)
    rewards: Tensor  # (T, N)
    terminated: Tensor  # (T, N) bool
    truncated: Tensor  # (T, N) bool
    valid: Tensor  # (T, N) bool
    episode_returns: list[float]  # raw (unscaled) returns of the episodes that ended in this rollout
    episode_lengths: list[int]


class Collector:
    """Steps ``venv`` with a policy and fills the rollout buffers.

    ``env_id`` names the env in errors: an exception raised by its ``step``/``reset`` becomes a one-line
    :class:`~proxrl.errors.UserCodeError`.
    """

    def __init__(
        self,
        venv: gym.vector.VectorEnv,
        info: SpaceInfo,
        rollout_steps: int,
        obs_norm: ObsNormalizer,
        reward_scaler: RewardScaler,
        rng: np.random.Generator,
        env_id: str = "env",
    ) -> None:
        self.venv = venv
        self.env_id = env_id
        self.info = info
        self.T = rollout_steps
        self.N = n = venv.num_envs
        self.obs_norm = obs_norm
        self.reward_scaler = reward_scaler
        self.rng = rng
        t = rollout_steps
        self.obs = torch.zeros((t + 1, n, info.obs_dim), dtype=torch.float32)
        if info.discrete:
            self.actions = torch.zeros((t, n), dtype=torch.int64)
        else:
            self.actions = torch.zeros((t, n, info.action_dim), dtype=torch.float32)
        self.logprobs = torch.zeros((t, n))
        self.values = torch.zeros((t + 1, n))
        self.rewards = torch.zeros((t, n))
        self.terminated = torch.zeros((t, n), dtype=torch.bool)
        self.truncated = torch.zeros((t, n), dtype=torch.bool)
        self.valid = torch.ones((t, n), dtype=torch.bool)
        # numpy views sharing memory with the tensors above
        self._obs_np = self.obs.numpy()
        self._act_np = self.actions.numpy()
        self._logp_np = self.logprobs.numpy()
        self._val_np = self.values.numpy()
        self._rew_np = self.rewards.numpy()
        self._term_np = self.terminated.numpy()
        self._trunc_np = self.truncated.numpy()
        self._valid_np = self.valid.numpy()
        self._prev_done = np.zeros(n, dtype=bool)  # env i resets on its next step (NEXT_STEP)
        self._ep_return = np.zeros(n, dtype=np.float64)
        self._ep_length = np.zeros(n, dtype=np.int64)
        self._fresh = False

    def reset(self, seed: int) -> None:
        """Reset all envs with ``seed`` (sub-env ``i`` gets ``seed + i`` in sync/async mode); drop partial episodes."""
        obs, _ = env_call(self.env_id, "reset", self.venv.reset, seed=seed)
        self.obs_norm(obs, self._obs_np[0], update=True)
        self._prev_done[:] = False
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self.reward_scaler.reset_returns()
        self._fresh = True

    def collect(self, policy: ActorCritic) -> Rollout:
        """Run ``T`` vector steps with ``policy`` (sampling with ``self.rng``) and return the rollout."""
        if not self._fresh:
            self.obs[0].copy_(self.obs[self.T])
        self._fresh = False
        fast = NumpyPolicy(policy)  # numpy copy of the current weights; no torch op per env step
        venv, obs_norm, scaler, rng = self.venv, self.obs_norm, self.reward_scaler, self.rng
        clip_low, clip_high = self.info.action_low, self.info.action_high
        obs_np, act_np, logp_np, val_np, rew_np = self._obs_np, self._act_np, self._logp_np, self._val_np, self._rew_np
        term_np, trunc_np, valid_np = self._term_np, self._trunc_np, self._valid_np
        prev_done, ep_return, ep_length = self._prev_done, self._ep_return, self._ep_length
        ep_returns: list[float] = []
        ep_lengths: list[int] = []
        for t in range(self.T):
            action, logp_np[t], val_np[t] = fast.act(obs_np[t], rng)
            act_np[t] = action
            env_action = action if clip_low is None else np.minimum(np.maximum(action, clip_low), clip_high)
            try:
                next_obs, reward, terminated, truncated, _ = venv.step(env_action)
            except UserError:
                raise
            except Exception as e:  # the env's own code failed
                raise env_error(self.env_id, "step", e) from e
            valid = ~prev_done
            valid_np[t] = valid
            term_np[t] = terminated
            trunc_np[t] = truncated
            done = terminated | truncated
            ep_return += reward
            ep_length += valid
            if done.any():
                idx = np.flatnonzero(done)
                ep_returns.extend(ep_return[idx].tolist())
                ep_lengths.extend(ep_length[idx].tolist())
                ep_return[idx] = 0.0
                ep_length[idx] = 0
            rew_np[t] = scaler(reward, done, valid)
            obs_norm(next_obs, obs_np[t + 1], update=True)
            prev_done[:] = done
        val_np[self.T] = fast.value(obs_np[self.T])
        return Rollout(
            obs=self.obs[: self.T],
            actions=self.actions,
            logprobs=self.logprobs,
            values=self.values[: self.T],
            next_values=self.values[1:],
            rewards=self.rewards,
            terminated=self.terminated,
            truncated=self.truncated,
            valid=self.valid,
            episode_returns=ep_returns,
            episode_lengths=ep_lengths,
        )

    def check_finite(self, first_step: int, where: str) -> None:
        """:class:`~proxrl.runs.finite.NonFiniteError` if the last rollout holds a NaN/inf observation (as fed
        to the policy, i.e. after normalisation) or reward, or the normalisers' statistics went non-finite.

        ``first_step``: the env-step count before the rollout, to name the env step that returned the bad
        value; ``where``: e.g. ``"update 3"``.
        """
        n = self.N
        # obs[t] was returned by vector step t - 1 (obs[0] by the reset or the previous rollout), rewards[t] by step t
        for name, buffer, offset in (("observation", self._obs_np, 0), ("reward", self._rew_np, 1)):
            found = first_non_finite(buffer)
            if found is not None:
                (t, i, *_), value = found
                step = first_step + (t + offset) * n
                check_finite(name, value, f"{where}, env step {step} (env {i} of {n}), as returned by the env "
                                          "or after normalisation")
        for name, scaler in (("observation normaliser", self.obs_norm), ("reward scaler", self.reward_scaler)):
            if scaler.enabled:
                check_finite(f"{name} variance", scaler.rms.var, f"{where} (a NaN or infinite observation/reward)")

