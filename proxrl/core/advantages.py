"""Advantage estimation and masked statistics.

* :func:`gae` — Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
  Using Generalized Advantage Estimation", eqs. 11-16), with termination and truncation kept apart.
* :func:`masked_mean`, :func:`masked_var`, :func:`normalize` — reductions over the valid entries of a tensor
  (padding tokens in language-model batches are excluded by a 0/1 ``mask``).
* :func:`group_advantages` (GRPO, Shao et al. 2024) and :func:`rloo_advantages` (RLOO, Ahmadian et al. 2024) —
  critic-free advantages from several scored samples per prompt.

Every function is a pure function of tensors; bad shapes raise ``ValueError`` naming the shapes.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "gae",
    "masked_mean",
    "masked_var",
    "normalize",
    "group_advantages",
    "rloo_advantages",
]


def _check_same_shape(**tensors: Tensor) -> None:
    """Raise ValueError unless every tensor has the same shape, naming each argument's shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}{shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}; all must have the same shape")


def _check_mask(x: Tensor, mask: Tensor, x_name: str = "x") -> None:
    """A mask must have x's number of dims and broadcast to x (so (B, 1) is fine, (T,) against (B, T) is not)."""
    ok = mask.dim() == x.dim() and all(m in (1, s) for m, s in zip(mask.shape, x.shape))
    if not ok:
        raise ValueError(
            f"shape mismatch: mask{tuple(mask.shape)} does not match {x_name}{tuple(x.shape)}; "
            "the mask needs the same number of dims and sizes equal (or 1)"
        )


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is non-zero.

    ``mean = sum_i m_i x_i / sum_i m_i``. With ``mask=None`` this is ``x.mean(dim)``.

    Args:
        x: any shape ``S``.
        mask: ``None`` or a bool/float tensor with ``x``'s number of dims that broadcasts to ``S``
            (1 = keep, 0 = ignore; fractional values act as weights). Entries of ``x`` where the mask is 0
            never reach the result, even if they are NaN or inf.
        dim: dims to reduce; ``None`` reduces everything to a 0-d tensor.

    Returns:
        The mean, ``S`` with ``dim`` removed. An all-zero mask gives NaN (like the mean of an empty tensor).
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    _check_mask(x, mask)
    m = mask.to(x.dtype).expand_as(x)
    total = torch.where(m != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return total.sum() / m.sum()
    return total.sum(dim=dim) / m.sum(dim=dim)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of ``x`` (all dims reduced), as a 0-d tensor.

    ``var = sum_i m_i (x_i - mean)^2 / n``, ``n = sum_i m_i``, times ``n / (n - 1)`` when ``unbiased``
    (Bessel's correction, matching ``torch.var``'s default). Fewer than 2 valid entries with
    ``unbiased=True`` gives NaN, like ``torch.var``.

    Args:
        x: any shape. mask: ``None`` or broadcastable to ``x`` with the same number of dims.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = x.new_tensor(float(x.numel())) if mask is None else mask.to(x.dtype).expand_as(x).sum()
        var = var * n / (n - 1) if n > 1 else torch.full_like(var, float("nan"))
    return var


def normalize(x: Tensor, mask: Tensor | None = None, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """Standardise ``x`` with statistics of its valid entries: ``(x - mean) / (std + eps)``.

    This is PPO's per-minibatch advantage normalisation (not in the PPO paper's pseudo-code, but in the
    reference ``baselines`` ppo2 code and every popular re-implementation; eps = 1e-8 as in CleanRL).
    ``std`` is the unbiased (Bessel-corrected) standard deviation, like ``torch.std``; with a single valid
    entry it is taken as 0.

    Args:
        x: any shape ``S``.
        mask: ``None`` or broadcastable to ``S`` (same number of dims). Statistics use only valid entries and
            entries where the mask is 0 come back as 0.
        eps: added to the standard deviation.
        shift_mean: if False only scale, ``x / (std + eps)`` (keeps the sign of every entry, e.g. for reward
            scaling). Note TRL's ``masked_whiten(shift_mean=False)`` instead adds the mean back after whitening.

    Returns:
        Tensor of shape ``S``.
    """
    mean = masked_mean(x, mask)
    n = x.numel() if mask is None else int((mask.to(x.dtype).expand_as(x) != 0).sum())
    std = masked_var(x, mask, unbiased=n > 1).sqrt()
    out = (x - mean) / (std + eps) if shift_mean else x / (std + eps)
    if mask is not None:
        out = torch.where(mask.expand_as(x) != 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16), terminated and truncated apart.

    .. math::
        \\delta_t = r_t + \\gamma (1 - \\text{terminated}_t) V(s_{t+1}) - V(s_t)

        \\hat A_t = \\delta_t + \\gamma \\lambda (1 - \\text{done}_t) \\hat A_{t+1},
        \\quad \\text{done}_t = \\text{terminated}_t \\lor \\text{truncated}_t

        \\hat R_t = \\hat A_t + V(s_t)   (the lambda-return, the value target)

    Termination (a true terminal state) means ``V(s_{t+1}) = 0``. Truncation (time limit) does not end the
    MDP, so the TD error still bootstraps from the real final observation's value; only the recursion is cut
    because ``t + 1`` in the buffer belongs to the next episode. ``A_{T} = 0`` past the buffer end, so the last
    step's advantage is its TD error and bootstrapping is carried by ``next_values[T-1]``.
    Common defaults: gamma = 0.99, lam = 0.95 (PPO paper, Tables 3 and 5).

    Args:
        rewards: (T, *B) reward ``r_t`` received after action ``a_t``.
        values: (T, *B) ``V(s_t)``.
        next_values: (T, *B) ``V(s_{t+1})`` with ``s_{t+1}`` the TRUE next observation (on truncation the
            final observation before the reset, not the reset observation).
        terminated: (T, *B) bool/float, 1 where ``s_{t+1}`` is terminal.
        truncated: (T, *B) bool/float, 1 where the episode was cut after step ``t`` (time limit).
        gamma: discount. lam: GAE lambda (0 = one-step TD, 1 = Monte Carlo minus baseline).

    Returns:
        ``(advantages, returns)``, both (T, *B), computed without gradient.
    """
    _check_same_shape(
        rewards=rewards, values=values, next_values=next_values, terminated=terminated, truncated=truncated
    )
    if rewards.dim() < 1 or rewards.shape[0] == 0:
        raise ValueError(f"gae needs a time axis of length >= 1 at dim 0, got rewards{tuple(rewards.shape)}")
    with torch.no_grad():
        dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
        rewards = rewards.to(dtype)
        values = values.detach().to(dtype)
        next_values = next_values.detach().to(dtype)
        term = terminated.to(dtype)
        done = (terminated.bool() | truncated.bool()).to(dtype)
        deltas = rewards + gamma * (1.0 - term) * next_values - values
        carry = gamma * lam * (1.0 - done)
        delta_t, carry_t = deltas.unbind(0), carry.unbind(0)  # views, cheaper than indexing in the loop
        out = [delta_t[-1]]
        for t in range(len(delta_t) - 2, -1, -1):
            out.append(torch.addcmul(delta_t[t], carry_t[t], out[-1]))
        advantages = torch.stack(out[::-1])
        returns = advantages + values
    return advantages, returns


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-d (B,), got scores{tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size != 0:
        raise ValueError(
            f"scores{tuple(scores.shape)} cannot be split into groups of group_size={group_size}; "
            "B must be a positive multiple of group_size"
        )
    return scores.reshape(-1, group_size)


def group_advantages(scores: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2 outcome supervision).

    .. math::  \\hat A_i = \\frac{r_i - \\mathrm{mean}(r_{g})}{\\mathrm{std}(r_{g}) + \\varepsilon}

    over the ``group_size`` completions ``g`` of the same prompt. ``std`` is unbiased (``torch.std``, as in
    TRL's GRPOTrainer); ``normalize_std=False`` drops the division (Dr. GRPO, Liu et al. 2025).
    eps guards groups whose scores are all equal (they get advantage 0). ``group_size=1`` gives zeros.

    Epsilon: 1e-6 here, 1e-4 in TRL's GRPOTrainer. It only matters for groups whose scores barely differ: with a
    std of 1e-3, TRL divides by 1.1e-3 and proxrl by 1.001e-3. The smaller value keeps the advantages of
    low-variance groups close to the paper's formula (std alone); pass ``eps=1e-4`` to match TRL exactly.

    Args:
        scores: (B,) one scalar score per completion; groups are contiguous:
            rows ``[k*G, (k+1)*G)`` are the G samples of prompt ``k``.
        group_size: G, must divide B.

    Returns:
        (B,) advantages.
    """
    g = _grouped(scores, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if normalize_std:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, eq. 5; Kool et al. 2019).

    .. math::  \\hat A_i = r_i - \\frac{1}{G - 1} \\sum_{j \\ne i} r_j = \\frac{G}{G-1}(r_i - \\bar r_g)

    The baseline for each sample is the mean score of the other G-1 samples of the same prompt, so it is
    independent of sample i and the estimator stays unbiased.

    No epsilon here: this is a difference, not a ratio. When ``normalize_advantages`` is on, ``proxrl.lm``
    then whitens these advantages over the rollout with :func:`normalize` and its eps = 1e-8 (as CleanRL and
    ``baselines`` for PPO), where TRL's RLOOTrainer adds 1e-4 to the std. The two agree unless the rollout's
    advantages have a std near 1e-4 or below (nearly equal scores), where TRL's shrink towards 0 and proxrl's
    keep unit scale; call ``normalize(a, eps=1e-4)`` to match TRL.

    Args:
        scores: (B,) with contiguous groups as in :func:`group_advantages`.
        group_size: G >= 2, must divide B.

    Returns:
        (B,) advantages.
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2 (leave-one-out), got group_size={group_size}")
    g = _grouped(scores, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)
