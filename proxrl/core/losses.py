"""PPO losses and diagnostics (Schulman et al. 2017, "Proximal Policy Optimization Algorithms").

* :func:`policy_loss` — clipped surrogate objective L^CLIP (eq. 7), with clipfrac / approx_kl diagnostics.
* :func:`value_loss` — squared error to the returns, optionally clipped around the old values.
* :func:`entropy_from_logits` — the entropy bonus S[pi] of eq. 9.
* :func:`explained_variance` — how much of the returns' variance the value function explains.
* :func:`kl_early_stop` — the one target-KL early-stop rule both front-ends use.

The full PPO objective (eq. 9) is maximised; as a loss to minimise it reads
``policy_loss + value_coef * value_loss - entropy_coef * entropy``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .advantages import _check_mask, _check_same_shape, masked_mean, masked_var

__all__ = ["policy_loss", "value_loss", "entropy_from_logits", "explained_variance", "kl_early_stop"]


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_coef: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative PPO clipped surrogate (Schulman et al. 2017, eqs. 6-7).

    .. math::
        r_t(\\theta) = \\frac{\\pi_\\theta(a_t|s_t)}{\\pi_{\\theta_{old}}(a_t|s_t)}
                     = \\exp(\\log\\pi_\\theta - \\log\\pi_{\\theta_{old}})

        L^{CLIP}(\\theta) = \\hat{\\mathbb E}_t\\big[\\min(r_t \\hat A_t,
                            \\mathrm{clip}(r_t, 1-\\epsilon, 1+\\epsilon) \\hat A_t)\\big]

    Returns ``-L^CLIP`` (a loss to minimise). Where the clipped term is the smaller one (ratio above
    ``1 + eps`` with ``A > 0`` or below ``1 - eps`` with ``A < 0``) the gradient is exactly zero.
    Default clip_coef in the paper: eps = 0.2 (best in Table 1; Atari uses 0.1 x alpha, Table 5).

    Args:
        logprobs: (*S) ``log pi_theta(a|s)`` of the taken actions, with gradient.
        old_logprobs: (*S) log-probs under the policy that collected the data (no gradient needed).
        advantages: (*S), or the same number of dims with size-1 axes (e.g. (B, 1) for one advantage per
            sequence against (B, T) token log-probs).
        clip_coef: epsilon > 0.
        mask: ``None`` or (*S)-broadcastable 0/1 mask of valid entries (e.g. response tokens).

    Returns:
        ``(loss, info)``: 0-d loss; info holds detached 0-d tensors
        ``clipfrac`` (fraction of valid entries with ``|r - 1| > eps``),
        ``approx_kl`` (k3 estimate of KL(pi_old || pi_theta) = mean((r - 1) - log r), see :mod:`.kl`), and
        ``ratio_mean``.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    _check_mask(logprobs, advantages, "logprobs")
    if mask is not None:
        _check_mask(logprobs, mask, "logprobs")
    if not clip_coef > 0:
        raise ValueError(f"clip_coef must be > 0, got {clip_coef}")
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef) * advantages
    surrogate = torch.min(unclipped, clipped)
    loss = -masked_mean(surrogate, mask)
    with torch.no_grad():
        log_ratio_d = log_ratio.detach()
        ratio_d = ratio.detach()
        info = {
            "clipfrac": masked_mean(((ratio_d - 1.0).abs() > clip_coef).to(ratio_d.dtype), mask),
            "approx_kl": masked_mean((ratio_d - 1.0) - log_ratio_d, mask),
            "ratio_mean": masked_mean(ratio_d, mask),
        }
    return loss, info


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    clip_coef: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Value-function loss, optionally clipped around the old predictions.

    .. math::
        L^{VF} = \\tfrac12 \\hat{\\mathbb E}_t\\big[\\max\\big((V_\\theta(s_t) - \\hat R_t)^2,\\;
                 (V_{old} + \\mathrm{clip}(V_\\theta - V_{old}, -c, c) - \\hat R_t)^2\\big)\\big]

    The PPO paper (eq. 9) only has the unclipped squared error ``(V - R)^2``; the clipped variant comes from
    OpenAI baselines' ppo2 (Engstrom et al. 2020 and Andrychowicz et al. 2021 found it does not help, so it
    is off by default here: ``clip_coef=None``). The 0.5 factor follows baselines/CleanRL.

    Args:
        values: (*S) current predictions V_theta(s_t), with gradient.
        old_values: (*S) predictions at rollout time.
        returns: (*S) targets R_t (e.g. GAE lambda-returns).
        clip_coef: c > 0, or None for the plain squared error.
        mask: ``None`` or (*S)-broadcastable 0/1 mask.

    Returns:
        0-d loss.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns)
    if mask is not None:
        _check_mask(values, mask, "values")
    returns = returns.detach()
    loss_unclipped = (values - returns) ** 2
    if clip_coef is None:
        per_entry = loss_unclipped
    else:
        if not clip_coef > 0:
            raise ValueError(f"value clip_coef must be > 0 or None, got {clip_coef}")
        old_values = old_values.detach()
        v_clipped = old_values + torch.clamp(values - old_values, -clip_coef, clip_coef)
        per_entry = torch.max(loss_unclipped, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(per_entry, mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution softmax(logits) over the last axis.

    .. math::  H[\\pi](s) = -\\sum_a \\pi(a|s) \\log \\pi(a|s)

    Numerically stable (log_softmax) and safe with ``-inf`` logits (masked actions contribute 0 and no NaN
    gradients).

    Args:
        logits: (..., V).

    Returns:
        (...) entropies in nats.
    """
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor | None = None,
                       var_fn: Callable[..., Tensor] = masked_var) -> float:
    """Explained variance of the value predictions: ``1 - Var[R - V] / Var[R]``.

    1 = perfect predictions, 0 = no better than predicting the mean return, < 0 = worse than that.
    The same (biased) estimator is used for both variances so the normalisation cancels.
    Returns ``nan`` when ``Var[R] == 0`` (as baselines / SB3 do).

    Args:
        values: (*S) predictions V(s_t). returns: (*S) targets. mask: optional (*S)-broadcastable mask.
        var_fn: the masked variance ``var_fn(x, mask, unbiased=False)``; :func:`proxrl.distributed.masked_var`
            makes this the explained variance over all processes' data.

    Returns:
        A Python float.
    """
    _check_same_shape(values=values, returns=returns)
    if mask is not None:
        _check_mask(values, mask, "values")
    with torch.no_grad():
        v = values.detach().to(torch.float64)
        r = returns.detach().to(torch.float64)
        var_r = float(var_fn(r, mask, unbiased=False))
        if var_r == 0.0 or math.isnan(var_r):
            return float("nan")
        return 1.0 - float(var_fn(r - v, mask, unbiased=False)) / var_r


def kl_early_stop(approx_kl: float, target_kl: float | None) -> bool:
    """True when an update should stop its remaining minibatches and epochs: ``approx_kl > target_kl``.

    ``approx_kl`` is the k3 estimate of ``KL(pi_old || pi_theta)`` on the minibatch just used (the
    ``approx_kl`` of :func:`policy_loss`). The rule is CleanRL's threshold (no factor), checked after every
    minibatch as Stable-Baselines3 does; SB3 compares against ``1.5 * target_kl`` instead, so proxrl's
    ``target_kl=t`` stops where SB3's ``target_kl=t/1.5`` would. ``target_kl=None`` never stops early.
    """
    if target_kl is None:
        return False
    if not target_kl > 0:
        raise ValueError(f"target_kl must be > 0 or None, got {target_kl}")
    return float(approx_kl) > target_kl
