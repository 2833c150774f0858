"""Action distributions for every action space proxrl control supports, computed directly from network outputs.

One :class:`ActionDist` per action space (:func:`action_dist_for`). The policy network emits a flat output
``out`` of width :attr:`ActionDist.out_dim` per observation; the distribution reads it as:

* ``Discrete(n)`` -- **categorical**: ``out`` ``(N, n)`` logits; ``log pi(a) = log_softmax(out)[a]``,
  ``H = -sum_k p_k log p_k``. Actions ``(N,)`` int64.
* ``MultiDiscrete(nvec)`` -- **independent categoricals**: ``out`` ``(N, sum(nvec))`` holds the logits of
  component ``j`` in columns ``[o_j, o_j + nvec_j)``; ``log pi(a) = sum_j log_softmax(out_j)[a_j]``,
  ``H = sum_j H_j``. Actions ``(N, k)`` int64, counted from 0 (the space's ``start`` is added only in
  :meth:`ActionDist.to_env`).
* ``MultiBinary(n)`` -- **independent Bernoullis**: ``out`` ``(N, n)`` logits ``l``, ``p = sigmoid(l)``;
  ``log pi(a) = sum_j [a_j l_j - softplus(l_j)]``, ``H = sum_j [softplus(l_j) - p_j l_j]`` (both exact and
  stable: ``log p = -softplus(-l)``, ``log(1 - p) = -softplus(l)``). Actions ``(N, n)`` int64 in {0, 1}.
* 1-D ``Box(d)`` -- **diagonal Gaussian** with a state-independent ``log_std`` ``(d,)``: ``out`` ``(N, d)``
  means; ``log pi(a) = sum_d [-(a_d - mu_d)^2 / (2 sigma_d^2) - log sigma_d - log(2 pi) / 2]``,
  ``H = sum_d [log sigma_d + (1 + log(2 pi)) / 2]``. Actions ``(N, d)`` float32, raw (clip only for the env).

These are the formulas of :class:`proxrl.control.policy.ActorCritic` for the first and last case, so either
policy class gives the same numbers on Discrete and Box spaces. ``tests/test_control_atari.py`` checks each
against hand-computed values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor

from proxrl.errors import UserError

__all__ = ["ActionDist", "action_dist_for"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
KINDS = ("categorical", "multi_categorical", "bernoulli", "gaussian")


@dataclass(frozen=True)
class ActionDist:
    """The distribution family of one action space and the sizes it needs (see the module docstring).

    ``nvec``: the category counts (``(n,)`` for categorical, ``(n_1, ..., n_k)`` for multi-categorical,
    ``()`` otherwise); ``size``: actions per step (``1`` for categorical, ``k``, ``n`` or ``d``);
    ``start``: MultiDiscrete ``start`` offsets added in :meth:`to_env` (None when all zero).
    """

    kind: str
    size: int
    nvec: tuple[int, ...] = ()
    start: tuple[int, ...] | None = None

    @property
    def discrete(self) -> bool:
        """True for every family without a ``log_std`` parameter (all but the Gaussian)."""
        return self.kind != "gaussian"

    @property
    def out_dim(self) -> int:
        """Width of the network output the distribution is read from."""
        return sum(self.nvec) if self.kind in ("categorical", "multi_categorical") else self.size

    @property
    def action_shape(self) -> tuple[int, ...]:
        """Shape of one action as stored in a rollout: ``()`` for categorical, ``(size,)`` otherwise."""
        return () if self.kind == "categorical" else (self.size,)

    @property
    def action_dtype(self) -> torch.dtype:
        return torch.float32 if self.kind == "gaussian" else torch.int64

    def _segments(self, out: Tensor) -> list[Tensor]:
        return list(out.split(list(self.nvec), dim=-1))

    def log_prob_entropy(
        self, out: Tensor, log_std: Tensor | None, actions: Tensor, with_grad_entropy: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``(log pi(a|s), H[pi(.|s)])``, each ``(N,)``, from ``out`` ``(N, out_dim)`` and stored ``actions``.

        ``with_grad_entropy=False`` computes the entropy outside autograd (when it only feeds a log).
        """
        grad_h = with_grad_entropy and torch.is_grad_enabled()
        if self.kind == "categorical":
            logp_all = out.log_softmax(-1)
            logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            with torch.set_grad_enabled(grad_h):
                entropy = -(logp_all.exp() * logp_all).sum(-1)
            return logp, entropy
        if self.kind == "multi_categorical":
            logp = out.new_zeros(out.shape[0])
            entropy = out.new_zeros(out.shape[0])
            for j, logits in enumerate(self._segments(out)):
                logp_all = logits.log_softmax(-1)
                logp = logp + logp_all.gather(-1, actions[:, j : j + 1]).squeeze(-1)
                with torch.set_grad_enabled(grad_h):
                    entropy = entropy - (logp_all.exp() * logp_all).sum(-1)
            return logp, entropy
        if self.kind == "bernoulli":
            a = actions.to(out.dtype)
            sp = F.softplus(out)
            logp = (a * out - sp).sum(-1)
            with torch.set_grad_enabled(grad_h):
                entropy = (sp - torch.sigmoid(out) * out).sum(-1)
            return logp, entropy
        assert log_std is not None, "a Gaussian policy needs log_std"
        z = (actions - out) * torch.exp(-log_std)
        logp = (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)
        entropy = (log_std + 0.5 + _HALF_LOG_2PI).sum().expand(logp.shape)
        return logp, entropy

    def sample(self, out: Tensor, log_std: Tensor | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(action, logprob)`` sampled with ``generator`` (shapes as in the module docstring)."""
        n = out.shape[0]
        if self.kind == "categorical":
            logp_all = out.log_softmax(-1)
            action = torch.multinomial(logp_all.exp(), 1, generator=generator)
            return action.squeeze(-1), logp_all.gather(-1, action).squeeze(-1)
        if self.kind == "multi_categorical":
            cols = [torch.multinomial(seg.softmax(-1), 1, generator=generator) for seg in self._segments(out)]
            action = torch.cat(cols, dim=1)
            return action, self.log_prob_entropy(out, None, action, with_grad_entropy=False)[0]
        if self.kind == "bernoulli":
            u = torch.rand(out.shape, generator=generator, dtype=out.dtype)
            action = (u < torch.sigmoid(out)).long()
            return action, self.log_prob_entropy(out, None, action, with_grad_entropy=False)[0]
        assert log_std is not None
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        action = out + log_std.exp() * noise
        logp = (-0.5 * noise.square() - log_std - _HALF_LOG_2PI).sum(-1)
        assert logp.shape == (n,)
        return action, logp

    def noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The random numbers :meth:`sample_from_noise` turns into ``n`` actions, drawn from ``rng`` (float32):
        uniforms ``(n,)`` (categorical), ``(n, k)`` (multi-categorical, Bernoulli) or standard normals ``(n, d)``.

        The rollout draws them for ALL envs of the job and each process keeps its envs' rows, so a sample is
        tied to its global env index (N processes sample what one process would); the numpy rollout policy
        (:class:`proxrl.control.policy.NumpyPolicy`) reads the same numbers.
        """
        if self.kind == "gaussian":
            return rng.standard_normal((n, self.size), dtype=np.float32)
        return rng.random(n if self.kind == "categorical" else (n, self.size), dtype=np.float32)

    def sample_from_noise(self, out: Tensor, log_std: Tensor | None, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(action, logprob)`` from :meth:`noise` (same device as ``out``): inverse CDF per categorical
        (``a = #{k : u > cdf_k}``), ``u < sigmoid(l)`` per Bernoulli, ``mu + sigma * eps`` for the Gaussian."""
        if self.kind == "categorical":
            logp_all = out.log_softmax(-1)
            cdf = logp_all.exp().cumsum(-1)
            action = (noise.unsqueeze(-1) > cdf).sum(-1).clamp_(max=out.shape[-1] - 1)
            return action, logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        if self.kind == "multi_categorical":
            cols = []
            for j, seg in enumerate(self._segments(out)):
                cdf = seg.softmax(-1).cumsum(-1)
                cols.append((noise[:, j : j + 1] > cdf).sum(-1).clamp_(max=seg.shape[-1] - 1))
            action = torch.stack(cols, dim=1)
            return action, self.log_prob_entropy(out, None, action, with_grad_entropy=False)[0]
        if self.kind == "bernoulli":
            action = (noise < torch.sigmoid(out)).long()
            return action, self.log_prob_entropy(out, None, action, with_grad_entropy=False)[0]
        assert log_std is not None
        action = out + log_std.exp() * noise
        logp = (-0.5 * noise.square() - log_std - _HALF_LOG_2PI).sum(-1)
        return action, logp

    def mode(self, out: Tensor) -> Tensor:
        """The most likely action: argmax per categorical, ``l > 0`` per Bernoulli, the Gaussian mean."""
        if self.kind == "categorical":
            return out.argmax(-1)
        if self.kind == "multi_categorical":
            return torch.stack([seg.argmax(-1) for seg in self._segments(out)], dim=1)
        if self.kind == "bernoulli":
            return (out > 0).long()
        return out

    def to_env(self, action: np.ndarray) -> np.ndarray:
        """A batch of stored actions as the vector env expects them (MultiDiscrete ``start`` added, MultiBinary int8)."""
        if self.kind == "multi_categorical" and self.start is not None:
            return action + np.asarray(self.start, dtype=action.dtype)
        if self.kind == "bernoulli":
            return action.astype(np.int8)
        return action


def action_dist_for(space: spaces.Space) -> ActionDist:
    """The :class:`ActionDist` of a single-env action space; UserError naming an unsupported space."""
    if isinstance(space, spaces.Discrete):
        if space.start != 0:
            raise UserError(f"unsupported action space {space}; Discrete actions must start at 0")
        return ActionDist("categorical", 1, (int(space.n),))
    if isinstance(space, spaces.MultiDiscrete):
        if space.nvec.ndim != 1:
            raise UserError(f"unsupported action space {space}; MultiDiscrete nvec must be 1-D (flatten it)")
        start = tuple(int(s) for s in space.start)
        return ActionDist("multi_categorical", len(space.nvec), tuple(int(n) for n in space.nvec),
                          start if any(start) else None)
    if isinstance(space, spaces.MultiBinary):
        shape = space.shape
        if len(shape) != 1:
            raise UserError(f"unsupported action space {space}; MultiBinary must be 1-D (flatten it)")
        return ActionDist("bernoulli", int(shape[0]))
    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        return ActionDist("gaussian", int(space.shape[0]))
    raise UserError(
        f"unsupported action space {type(space).__name__} {space}; proxrl control supports Discrete, "
        "MultiDiscrete, MultiBinary and 1-D Box actions"
    )
