"""Collecting rollouts from a NEXT_STEP vector env into preallocated tensors.

Layout (``T = rollout_steps``, ``N = num_envs`` of this process), all tensors allocated once and reused:

* ``obs[t]`` ``(T+1, N, *obs_shape)``: the (normalised) observation the action at ``t`` was chosen from,
  float32 for vector observations, uint8 pixels for images (never normalised; the CNN scales them);
  ``obs[T]`` is the observation after the last step (carried over to ``obs[0]`` of the next rollout).
* ``actions[t]`` ``(T, N, *action_shape)``: the **raw** sampled action (int64, or float32 for Box actions,
  which are clipped only in the copy sent to the env), ``logprobs[t]``, ``values[t] = V(obs[t])`` ``(T+1, N)``.
* ``rewards[t]``, ``terminated[t]``, ``truncated[t]``: the env's answer to that action (rewards scaled when
  ``norm_reward``).
* ``valid[t]``: False for a NEXT_STEP *reset step* (the env ignored the action and only reset); the
  update drops such entries from the batch before computing any loss (:func:`proxrl.control.ppo.ppo_update`).

In NEXT_STEP mode the observation returned on a done step is the true final observation, so the bootstrap
value of step ``t`` is simply ``next_values[t] = values[t + 1]`` -- for truncation this is
``V(final observation)``, and :func:`proxrl.core.gae` ignores it on termination.

Two ways to act, the same random numbers: proxrl's MLP ``ActorCritic`` on the CPU runs as a fused numpy MLP
(:class:`~proxrl.control.policy.NumpyPolicy`, no torch op per env step); every other policy (the Nature CNN,
multi-head MLPs, any policy on a GPU) runs its torch forward under ``inference_mode`` on its device. Both draw
the sampling noise (:meth:`~proxrl.control.distributions.ActionDist.noise`) from the one numpy ``Generator``
that checkpoints save, so resuming is exact on either path.

Several processes (torchrun): each process steps its share ``env_slice`` of the job's ``num_envs`` envs. The
noise is drawn for all envs and each process keeps its rows, and the observation/reward normalisers (when
enabled) are fed every process's values each step (one all-gather), so the rollout, once gathered with
:func:`gather_rollout`, is the one a single process would have collected.
"""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from proxrl import distributed as D
from proxrl.control.envs import SpaceInfo, env_call, env_error
from proxrl.control.policy import ActorCritic, NumpyPolicy
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.errors import UserError
from proxrl.runs.finite import check_finite, first_non_finite

__all__ = ["Rollout", "Collector", "gather_rollout", "uses_numpy_rollout", "policy_forward"]


@dataclass
class Rollout:
    """Views of one rollout (see the module docstring for shapes).

    ``obs_all`` / ``values_all``: the ``(T+1, ...)`` buffers that ``obs`` / ``values`` and ``next_values``
    view (set by :class:`Collector`; None for a hand-made rollout).
    """

    obs: Tensor  # (T, N, *obs_shape)
    actions: Tensor  # (T, N, *action_shape)
    logprobs: Tensor  # (T, N)
    values: Tensor  # (T, N)
    next_values: Tensor  # (T, N)
    rewards: Tensor  # (T, N)
    terminated: Tensor  # (T, N) bool
    truncated: Tensor  # (T, N) bool
    valid: Tensor  # (T, N) bool
    episode_returns: list[float]  # raw (unscaled) returns of the episodes that ended in this rollout (the
    # collector's: this process's; gather_rollout's: the job's)
    episode_lengths: list[int]
    obs_all: Tensor | None = None  # (T+1, N, *obs_shape)
    values_all: Tensor | None = None  # (T+1, N)


def _from_buffers(obs_all: Tensor, values_all: Tensor, **rest) -> Rollout:
    return Rollout(obs=obs_all[:-1], values=values_all[:-1], next_values=values_all[1:], obs_all=obs_all,
                   values_all=values_all, **rest)


_GATHERED = ("actions", "logprobs", "rewards", "terminated", "truncated", "valid")


def gather_rollout(rollout: Rollout) -> Rollout:
    """The job's whole rollout ``(T, num_envs, ...)`` on every process (envs in global order), from each process's
    ``(T, N_local, ...)`` share (``rollout`` itself with one process). ``rollout`` must come from
    :meth:`Collector.collect` (it gathers the ``(T+1)`` buffers).

    The episode lists become the job's too, in the order one process lists them (by step, then global env):
    the ``k``-th episode of a process ended at its ``k``-th done flag (``terminated | truncated``) in
    ``(t, env)`` order, so each return and length travels at the position of its done flag.

    One all-gather per rollout: the raw bytes of every buffer (uint8 pixels, float32 observations, int64
    actions, the flags, the float64 episode returns) are packed per env into one uint8 tensor, so nothing is
    converted and the result is bit-exact.
    """
    if not D.is_distributed():
        return rollout
    T1, n = rollout.obs_all.shape[:2]
    done = rollout.terminated | rollout.truncated
    if int(done.sum()) != len(rollout.episode_returns):
        raise ValueError(f"the rollout lists {len(rollout.episode_returns)} episodes but has {int(done.sum())} "
                         "done flags; gather_rollout needs a rollout from Collector.collect")
    ep_return = torch.zeros(done.shape, dtype=torch.float64)
    ep_length = torch.zeros(done.shape, dtype=torch.int64)
    ep_return[done] = torch.tensor(rollout.episode_returns, dtype=torch.float64)
    ep_length[done] = torch.tensor(rollout.episode_lengths, dtype=torch.int64)
    buffers = {k: getattr(rollout, k) for k in ("obs_all", "values_all", *_GATHERED)}
    buffers.update(ep_return=ep_return, ep_length=ep_length)
    cols, layout = [], []
    for k, t in buffers.items():
        rows = t if t.shape[0] == T1 else torch.cat([t, t.new_zeros((1, *t.shape[1:]))])  # pad T -> T+1
        rows = rows.reshape(T1, n, -1).contiguous()
        if rows.dtype == torch.bool:
            rows = rows.view(torch.uint8)
        cols.append(rows.view(torch.uint8))  # (T+1, n, bytes): the values' own bytes
        layout.append((k, t.shape[0], t.shape[2:], t.dtype, cols[-1].shape[2]))
    packed = D.all_gather_cat(torch.cat(cols, dim=2), dim=1, equal_sizes=True)  # (T+1, num_envs, bytes)
    parts: dict[str, Tensor] = {}
    offset = 0
    for k, length, tail, dtype, width in layout:
        block = packed[:length, :, offset: offset + width].contiguous()
        offset += width
        block = block.view(torch.bool) if dtype == torch.bool else block.view(dtype)
        parts[k] = block.reshape(length, -1, *tail)
    done_all = parts["terminated"] | parts["truncated"]
    ep_return, ep_length = parts.pop("ep_return")[done_all], parts.pop("ep_length")[done_all]
    return _from_buffers(**parts, episode_returns=ep_return.tolist(), episode_lengths=ep_length.tolist())


def uses_numpy_rollout(policy: nn.Module, device: torch.device) -> bool:
    """True when the rollout runs ``policy`` as a numpy MLP: proxrl's ``ActorCritic`` on the CPU."""
    return type(policy) is ActorCritic and device.type == "cpu"


def policy_forward(policy: nn.Module, obs: Tensor) -> tuple[Tensor, Tensor]:
    """``(actor output (N, out_dim), V(s) (N,))`` of any proxrl policy in one call."""
    actor_value = getattr(policy, "actor_value", None)
    if actor_value is not None:
        return actor_value(obs)
    return policy.actor(obs), policy.value(obs)


class Collector:
    """Steps ``venv`` with a policy and fills the rollout buffers.

    ``env_id`` names the env in errors: an exception raised by its ``step``/``reset`` becomes a one-line
    :class:`~proxrl.errors.UserCodeError`. ``device``: where a torch-path policy computes (the buffers stay on
    the CPU). ``env_slice``: the global indices of this process's envs among ``num_envs_global`` (default:
    all of them, one process); the normalisers are sized for the whole job.
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
        *,
        device: torch.device | str = "cpu",
        env_slice: slice | None = None,
        num_envs_global: int | None = None,
    ) -> None:
        self.venv = venv
        self.env_id = env_id
        self._fast: NumpyPolicy | None = None  # the numpy twin of the policy, refreshed per rollout
        self.info = info
        self.T = rollout_steps
        self.N = n = venv.num_envs
        self.n_global = num_envs_global or n
        self.env_slice = env_slice or slice(0, n)
        if self.env_slice.stop - self.env_slice.start != n:
            raise ValueError(f"env_slice {self.env_slice} does not hold the {n} envs of the vector env")
        self.device = torch.device(device)
        self.obs_norm = obs_norm
        self.reward_scaler = reward_scaler
        self.rng = rng
        # several processes with a normaliser: its statistics need every process's values at every step
        self._sync_norm = self.n_global != n and (obs_norm.enabled or reward_scaler.enabled)
        t = rollout_steps
        obs_dtype = torch.uint8 if info.obs_kind == "image" else torch.float32
        self.obs = torch.zeros((t + 1, n, *info.obs_shape), dtype=obs_dtype)
        self.actions = torch.zeros((t, n, *info.dist.action_shape), dtype=info.dist.action_dtype)
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
        self._global_obs = np.zeros((self.n_global, *info.obs_shape), np.float32) if self._sync_norm else None
        self._fresh = False

    # ------------------------------------------------------------------------------------------ normalisers
    def _gather_step(self, obs: np.ndarray, reward: np.ndarray | None, done: np.ndarray | None,
                     valid: np.ndarray | None) -> np.ndarray:
        """Every process's ``[obs, reward, done, valid]`` rows of one step, in global env order (float64)."""
        n = self.N
        cols = [np.asarray(obs, np.float64).reshape(n, -1)]
        if reward is not None:
            cols += [np.asarray(reward, np.float64)[:, None], done[:, None].astype(np.float64),
                     valid[:, None].astype(np.float64)]
        packed = torch.from_numpy(np.concatenate(cols, axis=1))
        return D.all_gather_cat(packed, dim=0, equal_sizes=True).numpy()

    def _normalise_obs(self, obs: np.ndarray, out: np.ndarray, packed: np.ndarray | None) -> None:
        if packed is None:
            self.obs_norm(obs, out, update=True)
            return
        if self.obs_norm.enabled:
            glob = packed[:, : self.info.obs_dim].reshape((self.n_global, *self.info.obs_shape))
            self.obs_norm(glob, self._global_obs, update=True)
            out[:] = self._global_obs[self.env_slice]
        else:
            np.copyto(out, obs, casting="same_kind")

    # ------------------------------------------------------------------------------------------ rollout
    def reset(self, seed: int) -> None:
        """Reset all envs; the env of global index ``g`` gets ``seed + g`` in sync/async mode (a native vector
        env gets ``seed + env_slice.start`` for all its envs); drop partial episodes."""
        if isinstance(self.venv, (gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv)):
            seeds: int | list[int] = [seed + g for g in range(self.env_slice.start, self.env_slice.stop)]
        else:
            seeds = seed + self.env_slice.start
        obs, _ = env_call(self.env_id, "reset", self.venv.reset, seed=seeds)
        packed = self._gather_step(obs, None, None, None) if self._sync_norm else None
        self._normalise_obs(obs, self._obs_np[0], packed)
        self._prev_done[:] = False
        self._ep_return[:] = 0.0
        self._ep_length[:] = 0
        self.reward_scaler.reset_returns()
        self._fresh = True

    def _numpy_policy(self, policy: ActorCritic) -> NumpyPolicy:
        """``policy`` as a :class:`NumpyPolicy` with its current weights: the one built for it before, refreshed."""
        fast = self._fast
        if fast is None or not fast.reads(policy):
            fast = self._fast = NumpyPolicy(policy)
        else:
            fast.refresh()
        return fast

    def collect(self, policy: nn.Module) -> Rollout:
        """Run ``T`` vector steps with ``policy`` (sampling noise from ``self.rng``) and return this process's
        rollout (:func:`gather_rollout` makes it the job's)."""
        if not self._fresh:
            self.obs[0].copy_(self.obs[self.T])
        self._fresh = False
        dist = self.info.dist
        fast = self._numpy_policy(policy) if uses_numpy_rollout(policy, self.device) else None
        device = self.device
        log_std = None if dist.discrete else policy.log_std
        venv, scaler, rng = self.venv, self.reward_scaler, self.rng
        sync_norm, obs_norm = self._sync_norm, self.obs_norm
        n, n_global, mine = self.N, self.n_global, self.env_slice
        whole = n == n_global
        clip_low, clip_high = self.info.action_low, self.info.action_high
        obs_np, act_np, logp_np, val_np, rew_np = self._obs_np, self._act_np, self._logp_np, self._val_np, self._rew_np
        term_np, trunc_np, valid_np = self._term_np, self._trunc_np, self._valid_np
        prev_done, ep_return, ep_length = self._prev_done, self._ep_return, self._ep_length
        ep_returns: list[float] = []
        ep_lengths: list[int] = []
        for t in range(self.T):
            noise = dist.noise(rng, n_global)
            if not whole:
                noise = noise[mine]
            if fast is not None:
                action, logp_np[t], val_np[t] = fast.act(obs_np[t], noise=noise)
            else:
                with torch.inference_mode():
                    out, value = policy_forward(policy, self.obs[t].to(device, non_blocking=True))
                    act_t, logp_t = dist.sample_from_noise(out, log_std, torch.from_numpy(noise).to(device))
                    action = act_t.cpu().numpy()
                    logp_np[t] = logp_t.cpu().numpy()
                    val_np[t] = value.cpu().numpy()
            act_np[t] = action
            env_action = dist.to_env(action) if clip_low is None else np.minimum(np.maximum(action, clip_low), clip_high)
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
            if sync_norm:
                packed = self._gather_step(next_obs, reward, done, valid)
                d = self.info.obs_dim
                g_reward, g_done, g_valid = packed[:, d], packed[:, d + 1] != 0, packed[:, d + 2] != 0
                rew_np[t] = scaler(g_reward, g_done, g_valid)[mine] if scaler.enabled else reward
                self._normalise_obs(next_obs, obs_np[t + 1], packed)
            else:
                rew_np[t] = scaler(reward, done, valid)
                obs_norm(next_obs, obs_np[t + 1], update=True)
            prev_done[:] = done
        if fast is not None:
            val_np[self.T] = fast.value(obs_np[self.T])
        else:
            with torch.inference_mode():
                val_np[self.T] = policy_forward(policy, self.obs[self.T].to(device))[1].cpu().numpy()
        return _from_buffers(
            obs_all=self.obs,
            values_all=self.values,
            actions=self.actions,
            logprobs=self.logprobs,
            rewards=self.rewards,
            terminated=self.terminated,
            truncated=self.truncated,
            valid=self.valid,
            episode_returns=ep_returns,
            episode_lengths=ep_lengths,
        )

    def check_finite(self, rollout: Rollout, first_step: int, where: str) -> None:
        """:class:`~proxrl.runs.finite.NonFiniteError` if ``rollout`` (the job's, :func:`gather_rollout`) holds
        a NaN/inf observation (as fed to the policy, i.e. after normalisation) or reward, or the normalisers'
        statistics went non-finite.

        ``first_step``: the env-step count before the rollout, to name the env step that returned the bad
        value; ``where``: e.g. ``"update 3"``.
        """
        n = rollout.rewards.shape[1]
        # obs[t] was returned by vector step t - 1 (obs[0] by the reset or the previous rollout), rewards[t] by step t
        buffers = [("reward", rollout.rewards, 1)]
        obs = rollout.obs if rollout.obs_all is None else rollout.obs_all
        if obs.is_floating_point():  # (uint8 pixels are always finite)
            buffers.insert(0, ("observation", obs, 0))
        for name, buffer, offset in buffers:
            found = first_non_finite(buffer.numpy())
            if found is not None:
                (t, i, *_), value = found
                step = first_step + (t + offset) * n
                check_finite(name, value, f"{where}, env step {step} (env {i} of {n}), as returned by the env "
                                          "or after normalisation")
        for name, scaler in (("observation normaliser", self.obs_norm), ("reward scaler", self.reward_scaler)):
            if scaler.enabled:
                check_finite(f"{name} variance", scaler.rms.var, f"{where} (a NaN or infinite observation/reward)")
