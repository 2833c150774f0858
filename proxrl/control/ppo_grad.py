"""The PPO minibatch loss and its exact gradient in closed form, in numpy (the fast path of :mod:`.ppo`).

Computes what :func:`proxrl.control.ppo.ppo_loss` computes with :mod:`proxrl.core` (the specification),
then its gradient with respect to the network outputs by the formulas below, then through the MLPs with
:class:`~proxrl.control.mlp_grad.NumpyMLP`. On CartPole-sized batches the loss graph alone costs more with
torch + autograd (~30 tiny ops and ~20 backward nodes, each paying a per-op dispatch) than both MLPs'
forward and backward; here it is ~40 numpy ops on the minibatch (figures: benchmarks/README.md).
``tests/test_control_mlp_grad.py`` checks loss terms and gradients against the autograd reference (float64).
It runs only proxrl's MLP :class:`~proxrl.control.policy.ActorCritic` (:func:`numpy_unsupported`).

Notation: minibatch of ``M`` transitions, ``A`` the (normalised) advantages, ``r = exp(logp - logp_old)``::

    L = -mean(min(r A, clip(r, 1-eps, 1+eps) A))                      policy_loss
        + value_coef * 0.5 * mean((V - R)^2)                           value_loss (or its clipped variant)
        - entropy_coef * mean(H)

    dL/dlogp_i = -(1/M) r_i A_i (w_i + (1 - w_i) [1-eps <= r_i <= 1+eps])
        w_i = 1 if the unclipped term is the smaller, 0 if the clipped one is, 1/2 on a tie (autograd's
        convention for min; clamp passes the gradient on its closed interval)
    dL/dV_i    = value_coef (1/M) (V_i - R_i)                          unclipped value loss;
        clipped: value_coef (1/M) (u_i (V_i - R_i) + (1 - u_i) [|V_i - V_old_i| <= c] (V^clip_i - R_i)),
        u_i the same min/max tie weight for the unclipped squared error being the larger

Categorical head (logits ``z``, ``p = softmax(z)``, ``logp = log_softmax(z)[a]``, ``H = -sum_k p_k log p_k``)::

    dlogp/dz_k = [k = a] - p_k          dH/dz_k = -p_k (log p_k + H)

Gaussian head (mean ``mu``, state-independent ``log sigma``, ``x = (a - mu) / sigma``)::

    dlogp/dmu_d = x_d / sigma_d         dlogp/dlog sigma_d = x_d^2 - 1        dH/dlog sigma_d = 1
"""
from __future__ import annotations

import math
import weakref

import numpy as np
from torch import nn

from proxrl.control.config import ControlConfig
from proxrl.control.mlp_grad import NumpyMLP, PairedMLP, mlp_activation, storage_key
from proxrl.control.policy import ActorCritic

__all__ = ["NumpyPPOGradient", "STAT_NAMES", "normalized_advantages", "numpy_unsupported"]

STAT_NAMES = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def numpy_unsupported(policy: nn.Module) -> str | None:
    """Why :class:`NumpyPPOGradient` cannot run ``policy`` (one line), or None when it can.

    It runs exactly :class:`~proxrl.control.policy.ActorCritic` (not a subclass, which may change the outputs
    or the loss) whose ``actor`` and ``critic`` are MLPs :func:`~proxrl.control.mlp_grad.mlp_activation`
    accepts; anything else (a CNN, a custom policy) needs the autograd backend.
    """
    if type(policy) is not ActorCritic:
        return f"the policy is a {type(policy).__name__}; the numpy gradient supports only proxrl's MLP ActorCritic"
    for name in ("actor", "critic"):
        try:
            mlp_activation(getattr(policy, name))
        except ValueError as e:
            return f"its {name}: {e}"
    return None


_BY_POLICY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # policy -> its NumpyPPOGradient (for_policy)


def normalized_advantages(adv: np.ndarray) -> np.ndarray:
    """``core.normalize`` in numpy: ``(A - mean) / (unbiased std + 1e-8)`` of ``adv`` ``(M,)``, as a new array."""
    m = adv.shape[0]
    out = adv - adv.sum() / m
    out /= np.sqrt(out @ out / max(m - 1, 1)) + 1e-8
    return out


def _min_weight(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """d min(a, b) / da as autograd defines it: 1 where a < b, 0 where a > b, 1/2 on ties (dtype of ``a``)."""
    w = np.sign(b - a)
    w += 1.0
    w *= 0.5
    return w


class NumpyPPOGradient:
    """``grad(obs, actions, old_logprobs, old_values, advantages, returns) -> stats``: the PPO loss of one
    minibatch, with its gradient written into the policy's (flat) gradient; all arrays ``(M,)`` except
    ``obs`` ``(M, obs_dim)`` and Box actions ``(M, d)``. ``stats``: float64 ``(5,)`` in :data:`STAT_NAMES` order.

    Works in the parameters' dtype (float32 in training; float64 in the gradient tests).
    """

    def __init__(self, policy: ActorCritic, cfg: ControlConfig, clip_coef: float) -> None:
        reason = numpy_unsupported(policy)
        if reason is not None:
            raise ValueError(f"NumpyPPOGradient cannot run this policy: {reason}")
        self.actor = NumpyMLP(policy.actor)
        self.critic = NumpyMLP(policy.critic)
        self.pair = PairedMLP.build(self.actor, self.critic)  # both at once where their hidden layers are large
        self.discrete = policy.discrete
        if not self.discrete:
            self.log_std = policy.log_std.detach().numpy()
            self.log_std_grad = policy.log_std.grad.numpy()
        self._storage = storage_key(policy)
        self._rows: np.ndarray = np.arange(0)
        self.configure(cfg, clip_coef)

    def configure(self, cfg: ControlConfig, clip_coef: float) -> None:
        """Take the loss settings of ``cfg`` and the clip range ``clip_coef`` (which a schedule may change)."""
        self.normalize_advantages = cfg.normalize_advantages
        self.value_coef = cfg.value_coef
        self.entropy_coef = cfg.entropy_coef
        self.value_clip_coef = cfg.value_clip_coef
        self.clip_coef = clip_coef

    @classmethod
    def for_policy(cls, policy: ActorCritic, cfg: ControlConfig, clip_coef: float) -> NumpyPPOGradient:
        """A :class:`NumpyPPOGradient` of ``policy`` configured with ``cfg`` and ``clip_coef``: the one made for it
        before while its layers, parameters and gradients are the same (:func:`~proxrl.control.mlp_grad.storage_key`;
        building one costs ~0.25 ms, 2-3% of a CartPole update), else a new one."""
        cached = _BY_POLICY.get(policy)
        if cached is None or cached._storage != storage_key(policy):
            cached = _BY_POLICY[policy] = cls(policy, cfg, clip_coef)
        else:
            cached.configure(cfg, clip_coef)
        return cached

    def __call__(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        old_logprobs: np.ndarray,
        old_values: np.ndarray,
        advantages: np.ndarray,
        returns: np.ndarray,
    ) -> np.ndarray:
        m = obs.shape[0]
        eps = self.clip_coef
        pair = self.pair if self.pair is not None and m >= self.pair.min_batch else None
        if pair is not None:
            out, value_out = pair.forward(obs)
            out_t, values = out.T, value_out[:, 0]
        else:
            out_t = self.actor.forward(obs).T  # (n | d, M): one contiguous row per logit / mean coordinate
            values = self.critic.forward(obs)[:, 0]

        # log pi(a|s) and entropy of the policy head
        if self.discrete:
            z = out_t - out_t.max(axis=0)
            logp_all = z - np.log(np.exp(z).sum(axis=0))
            probs = np.exp(logp_all)
            rows = self._rows if self._rows.shape[0] == m else np.arange(m)
            self._rows = rows
            logp = logp_all[actions, rows]
            entropy_each = -(probs * logp_all).sum(axis=0)
            entropy = entropy_each.sum() / m
        else:
            inv_std = np.exp(-self.log_std)[:, None]
            x = (actions.T - out_t) * inv_std  # (d, M)
            logp = (-0.5 * x * x - (self.log_std + _HALF_LOG_2PI)[:, None]).sum(axis=0)
            entropy = (self.log_std + 0.5 + _HALF_LOG_2PI).sum()

        # clipped surrogate (core.policy_loss) and its gradient w.r.t. logp
        adv = advantages
        if self.normalize_advantages:  # core.normalize: (A - mean) / (unbiased std + 1e-8)
            adv = normalized_advantages(adv)
        log_ratio = logp - old_logprobs
        ratio = np.exp(log_ratio)
        unclipped = ratio * adv
        clipped = np.minimum(np.maximum(ratio, 1.0 - eps), 1.0 + eps)  # clip(r, 1-eps, 1+eps), minus np.clip's overhead
        clipped *= adv
        surrogate = np.minimum(unclipped, clipped)
        # w + (1 - w) [1-eps <= r <= 1+eps] is exactly [unclipped <= clipped]: in the clip range the two terms
        # are equal (w = 1/2, indicator 1: weight 1); outside it they differ unless A = 0 (then the gradient is
        # 0 either way), and the weight is 1 where the unclipped term is the smaller, 0 where it is the larger
        g_logp = unclipped * (unclipped <= clipped)
        g_logp *= -1.0 / m

        # value loss (core.value_loss) and its gradient w.r.t. V
        diff = values - returns
        if self.value_clip_coef is None:
            per_entry = diff * diff
            g_values = diff
        else:
            c = self.value_clip_coef
            delta = values - old_values
            diff_clipped = old_values + np.minimum(np.maximum(delta, -c), c) - returns
            sq, sq_clipped = diff * diff, diff_clipped * diff_clipped
            per_entry = np.maximum(sq, sq_clipped)
            u = _min_weight(sq_clipped, sq)  # weight of the unclipped term in the max
            g_values = u * diff + (1.0 - u) * ((delta >= -c) & (delta <= c)) * diff_clipped
        g_values *= self.value_coef / m

        # back to the network outputs, then through the MLPs
        if self.discrete:
            g_out_t = probs * -g_logp
            g_out_t[actions, rows] += g_logp
            if self.entropy_coef > 0:
                g_out_t += (self.entropy_coef / m) * probs * (logp_all + entropy_each)
        else:
            g_out_t = g_logp * inv_std * x
            g_log_std = (g_logp * (x * x - 1.0)).sum(axis=1)
            if self.entropy_coef > 0:
                g_log_std -= self.entropy_coef
            self.log_std_grad[...] = g_log_std
        if pair is not None:
            pair.backward(g_out_t.T, g_values[:, None])
        else:
            self.actor.backward(g_out_t.T)
            self.critic.backward(g_values[:, None])

        return np.array([
            -surrogate.sum() / m,
            0.5 * per_entry.sum() / m,
            entropy,
            (ratio - 1.0 - log_ratio).sum() / m,
            np.count_nonzero(np.abs(ratio - 1.0) > eps) / m,
        ], dtype=np.float64)
