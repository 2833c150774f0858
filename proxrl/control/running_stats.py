"""Running observation normalisation and reward scaling (the two halves of SB3's ``VecNormalize``).

* :class:`ObsNormalizer`: ``clip((obs - mean) / sqrt(var + eps), -c, c)`` with running mean/var over every
  observation seen during training (parallel-variance merge of Chan et al. 1979). Frozen at evaluation.
* :class:`RewardScaler`: keeps the discounted return ``R_t = gamma * R_{t-1} + r_t`` of each env (reset at
  episode ends), tracks its running variance, and returns ``clip(r_t / sqrt(var + eps), -c, c)``. Only the
  scale is changed (no mean shift), so the sign of rewards and the optimal policy are preserved.

Statistics are float64 numpy arrays; ``state_tensors``/``load_state_tensors`` move them in and out of
checkpoints (float64 tensors, bit-exact).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["RunningMeanStd", "ObsNormalizer", "RewardScaler"]


class RunningMeanStd:
    """Running mean and (population) variance of vectors of shape ``shape``."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4  # SB3's epsilon prior: the first batch dominates immediately

    def update(self, batch: np.ndarray) -> None:
        """Merge a batch of shape ``(N, *shape)``."""
        n = batch.shape[0]
        if n == 0:
            return
        if n == 1:  # one env: the general formulas below with a zero batch variance, in fewer numpy calls (same bits)
            delta = batch[0] - self.mean  # float64 (self.mean is)
            total = self.count + 1
            self.mean = np.asarray(self.mean + delta * (1 / total))
            self.var = np.asarray((self.var * self.count + delta * delta * (self.count / total)) / total)
            self.count = total
            return
        # (np.mean / np.var cost ~10 us each on a handful of numbers; this is the same two-pass maths)
        b = batch.astype(np.float64)
        b_mean = np.add.reduce(b, axis=0) / n
        dev = b - b_mean
        b_m2 = np.add.reduce(dev * dev, axis=0)  # n * batch variance
        delta = b_mean - self.mean
        total = self.count + n
        self.mean = np.asarray(self.mean + delta * (n / total))
        m2 = self.var * self.count + b_m2 + delta * delta * (self.count * n / total)
        self.var = np.asarray(m2 / total)
        self.count = total

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.mean": torch.tensor(np.asarray(self.mean, np.float64)),
            f"{prefix}.var": torch.tensor(np.asarray(self.var, np.float64)),
            f"{prefix}.count": torch.tensor([self.count], dtype=torch.float64),
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        self.mean = tensors[f"{prefix}.mean"].numpy().astype(np.float64).copy()
        self.var = tensors[f"{prefix}.var"].numpy().astype(np.float64).copy()
        self.count = float(tensors[f"{prefix}.count"].item())


class ObsNormalizer:
    """Normalise observations of dimension ``dim``; identity when ``enabled`` is False."""

    def __init__(self, dim: int, enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.rms = RunningMeanStd((dim,))
        self.clip = clip
        self.eps = eps

    def __call__(self, obs: np.ndarray, out: np.ndarray, update: bool) -> np.ndarray:
        """Write the normalised ``obs`` ``(N, dim)`` into ``out`` (float32, same shape); update stats first if asked."""
        if not self.enabled:
            np.copyto(out, obs, casting="same_kind")
            return out
        if update:
            self.rms.update(obs)
        scaled = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        np.minimum(np.maximum(scaled, -self.clip), self.clip, out=out, casting="same_kind")  # clip, minus np.clip's overhead
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.rms.state_tensors("obs_rms") if self.enabled else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.enabled:
            self.rms.load_state_tensors(tensors, "obs_rms")


class RewardScaler:
    """Scale rewards of ``num_envs`` envs by the running std of their discounted return."""

    def __init__(self, num_envs: int, gamma: float, enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.gamma = gamma
        self.clip = clip
        self.eps = eps
        self.rms = RunningMeanStd(())
        self.returns = np.zeros(num_envs, np.float64)

    def __call__(self, reward: np.ndarray, done: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Scaled rewards ``(N,)`` for one vector step.

        ``done``: the episode ended on this step (terminated or truncated); ``valid``: this step is a real
        transition (not a NEXT_STEP reset step). Only valid steps update the statistics.
        """
        if not self.enabled:
            return reward
        if reward.shape[0] == 1:
            return self._scale_one(float(reward[0]), bool(done[0]), bool(valid[0]))
        return self._scale(reward, done, valid)

    def _scale(self, reward: np.ndarray, done: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """:meth:`__call__` for any number of envs (numpy)."""
        self.returns = self.returns * self.gamma + reward
        self.rms.update(self.returns if valid.all() else self.returns[valid])
        self.returns[done] = 0.0
        return np.minimum(np.maximum(reward / np.sqrt(self.rms.var + self.eps), -self.clip), self.clip)

    def _scale_one(self, reward: float, done: bool, valid: bool) -> np.ndarray:
        """:meth:`__call__` for one env (HalfCheetah's preset: one call per env step): the same float64
        operations in the same order on Python floats, so the same bits as :meth:`_scale`, in ~1/8 of the time of
        its 15 numpy calls on length-1 arrays (``tests/test_control_running_stats.py`` checks the bits)."""
        ret = float(self.returns[0]) * self.gamma + reward
        rms = self.rms
        if valid:  # RunningMeanStd.update of one row, written out
            mean, var, count = float(rms.mean), float(rms.var), rms.count
            delta = ret - mean
            total = count + 1
            rms.mean = np.asarray(mean + delta * (1 / total))
            rms.var = np.asarray((var * count + delta * delta * (count / total)) / total)
            rms.count = total
        self.returns[0] = 0.0 if done else ret
        scaled = reward / math.sqrt(float(rms.var) + self.eps)
        if not scaled >= -self.clip:  # (NaN stays NaN, as with np.maximum)
            scaled = scaled if math.isnan(scaled) else -self.clip
        elif scaled > self.clip:
            scaled = self.clip
        return np.array([scaled])

    def reset_returns(self) -> None:
        self.returns[:] = 0.0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.rms.state_tensors("ret_rms") if self.enabled else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.enabled:
            self.rms.load_state_tensors(tensors, "ret_rms")
