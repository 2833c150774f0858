"""One PPO update of a causal LM on a rollout of scored completions (RLHF), written top to bottom.

The recipe of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and InstructGPT
(Ouyang et al. 2022), one update for three advantage estimators:

1. Advantages (:func:`compute_advantages`). Scores are shaped (clip, missing-EOS and length penalties), then
   * ``gae`` (default): per-token rewards ``-beta * KL_t`` plus the score at the last response token
     (:func:`token_rewards`), GAE over tokens with the episode terminating at each row's last response token
     (:func:`token_gae`), values from a critic;
   * ``grpo``: group-normalised sequence scores (Shao et al. 2024), no critic, KL as a k3 loss term;
   * ``rloo``: leave-one-out baseline over the group (Ahmadian et al. 2024), no critic.
2. ``epochs`` passes of shuffled minibatches (:func:`ppo_update`); each minibatch is ``grad_accum_steps``
   micro-batches whose losses (:func:`minibatch_loss`: clipped surrogate + ``value_coef`` x clipped value loss
   - ``entropy_coef`` x entropy + the KL loss term in loss mode) are averaged into one AdamW step, each model's
   gradient norm clipped to ``max_grad_norm``.
3. Target-KL early stop (:func:`proxrl.core.kl_early_stop`, the rule both front-ends use): when a minibatch's
   ``approx_kl`` (k3 estimate of KL(pi_old || pi)) exceeds ``target_kl``, its step is skipped and the update's
   remaining minibatches and epochs are stopped.
4. PPO-ptx (InstructGPT eq. 2, :mod:`proxrl.lm.ptx`): with ``ptx_coef`` > 0 every optimizer step also
   backpropagates ``ptx_coef * ptx_loss`` on the next batch of pretraining text (logged as ``ptx_loss``).

Several processes (torchrun, docs/distributed.md): ``ro`` is this rank's contiguous share of the rollout (whole
GRPO/RLOO groups). Whole-batch statistics are taken over all ranks (reward and advantage whitening, the logged
means, the KL the adaptive controller sees, explained variance). Every rank draws the same permutation of the whole
rollout and trains, in minibatch k, on its own rows of it (its rows in permutation order, cut into ``minibatch_size
/ N`` per minibatch), so the global minibatch has ``minibatch_size`` rows, the same on every rank for every N.
Every loss term is a token mean over the GLOBAL minibatch: a micro-batch's masked mean is weighted by its share of
the minibatch's tokens (summed over ranks, one all-reduce per epoch) times N, which DDP's / FSDP's gradient
average cancels; with one process and no gradient accumulation the weight is exactly 1. With one minibatch per
epoch, N processes therefore compute the 1-process update up to the order of float sums; with several, the
minibatches are a different (equally random) partition of the same rollout. The target-KL decision uses the
global ``approx_kl`` and is the same on every rank.

Host round trips: the statistics, losses and gradient norms stay on the device during the update and are read
(and checked for NaN/inf, naming the first bad position) once at its end; the exceptions are the response lengths
(one copy per update, to size the micro-batches) and, with ``target_kl``, the minibatch KL before each step.

Dropout is disabled everywhere, so the ratio on the first minibatch is exactly 1 up to float error (checked by
the tests). The first NaN/inf in a reward, value, advantage, loss or gradient stops the run with one line
(:class:`proxrl.runs.finite.NonFiniteError`). The run around the update (models, rollouts, KL controller,
checkpoints) is :mod:`proxrl.lm.ppo_trainer`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor, nn

from proxrl import distributed as D
from proxrl.core import (
    explained_variance,
    gae,
    group_advantages,
    kl_early_stop,
    kl_estimate,
    masked_mean,
    normalize,
    policy_loss,
    rloo_advantages,
    value_loss,
)
from proxrl.lm.logprobs import critic_values, response_forward
from proxrl.lm.positions import last_token_index
from proxrl.lm.ppo_config import PPOConfig, PPOSizes, ResolvedOptions
from proxrl.lm.ptx import PtxBatches, ptx_loss
from proxrl.lm.rollout import ModelSet, Rollout, autocast_ctx
from proxrl.runs.finite import check_finite

__all__ = ["ppo_update", "minibatch_loss", "compute_advantages", "token_rewards", "token_gae",
           "whiten_token_rewards", "per_token_kl", "LOSS_STATS"]

# per-minibatch statistics of minibatch_loss (means over the minibatches the update ran)
LOSS_STATS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "ratio_mean", "kl_loss")


def ppo_update(ro: Rollout, models: ModelSet, optimizer: torch.optim.Optimizer, cfg: PPOConfig, sizes: PPOSizes,
               opts: ResolvedOptions, kl_coef: float, generator: torch.Generator,
               where: str = "this update", ptx: PtxBatches | None = None) -> dict[str, float]:
    """Advantages, then ``epochs`` x shuffled minibatches of the PPO loss on ``ro``; returns the update's metrics.

    ``generator`` orders the minibatches; ``where`` (e.g. ``"update 3"``) starts the position a
    :class:`~proxrl.runs.finite.NonFiniteError` names. Fills ``ro.shaped_scores``, ``ro.rewards``,
    ``ro.advantages`` (and ``ro.returns`` for GAE). ``ptx``: the pretraining-text batches of PPO-ptx (one batch
    per optimizer step, weighted by ``cfg.ptx_coef``), or None.
    """
    for name, t in (("reward", ro.scores), ("reference log-prob", ro.ref_logprobs), ("value", ro.values)):
        if t is not None:
            check_finite(name, t, where)
    # 1. advantages (and value targets) from the scores, the KL to the reference and the critic's values
    metrics = compute_advantages(ro, cfg, opts, kl_coef)
    check_finite("advantage", ro.advantages, where)

    # 2. epochs of shuffled minibatches, one optimizer step each (gradient accumulation over micro-batches)
    info = D.dist_info() if D.is_distributed() else D.DistInfo(0, 1, 0, True)
    world, n_local = info.world_size, ro.response_mask.shape[0]
    first_row = info.rank * n_local  # this rank's rows are [first_row, first_row + n_local) of the rollout
    device = ro.input_ids.device
    lengths = ro.lengths.to(torch.float64).cpu()  # one device -> host copy: sizes the micro-batches below
    rows_per_mb = cfg.minibatch_size // world
    rows_per_micro = rows_per_mb // cfg.grad_accum_steps
    policy_params = [p for p in models.policy.parameters() if p.requires_grad]
    critic_params = [p for p in models.critic.parameters() if p.requires_grad] if models.critic is not None else []
    n_stats = len(LOSS_STATS)
    checks: list[tuple[str, str, Tensor]] = []  # (name, position, 0-d value) in the order they are checked
    step_rows: list[Tensor] = []  # per optimizer step: [LOSS_STATS (token-weighted, this rank's part), ptx]
    norm_rows: list[Tensor] = []  # per optimizer step: [grad_norm, critic_grad_norm]
    first: Tensor | None = None
    steps = epochs_done = 0
    early_stop = False
    for epoch in range(cfg.epochs):
        perm = torch.randperm(sizes.batch_size, generator=generator)
        own = perm if world == 1 else perm[(perm >= first_row) & (perm < first_row + n_local)] - first_row
        parts = own.split(rows_per_mb)
        tokens = D.all_reduce_sum(torch.stack([lengths[q].sum() for q in parts]))  # per global minibatch
        for mb, rows in enumerate(parts):
            at = f"{where}, epoch {epoch + 1}, minibatch {mb + 1}"
            optimizer.zero_grad(set_to_none=True)
            acc = torch.zeros(n_stats, dtype=torch.float64, device=device)
            micros = rows.split(rows_per_micro)
            for j, micro in enumerate(micros):
                share = float(lengths[micro].sum()) / float(tokens[mb])  # of the global minibatch's tokens
                with _gradient_sync(models, j == len(micros) - 1):
                    loss, stats = minibatch_loss(ro, micro.to(device), models, cfg, opts, kl_coef,
                                                 r_used=int(lengths[micro].max()))
                    (loss * (share * world) if share * world != 1.0 else loss).backward()
                checks.append(("loss", at, loss.detach()))
                acc += torch.stack([stats[k] for k in LOSS_STATS]).to(torch.float64) * share
            if epoch == 0 and mb == 0:  # before any step: the ratio is 1 (up to float error)
                first = acc
            # 3. target-KL early stop: no step on a minibatch whose KL(pi_old || pi) is already too large; the KL
            # of the global minibatch, so every rank takes the same decision (a host round trip per minibatch)
            if cfg.target_kl is not None:
                kl_now = float(D.all_reduce_sum(acc[LOSS_STATS.index("approx_kl")].reshape(1))[0])
                if kl_early_stop(kl_now, cfg.target_kl):
                    early_stop = True
                    break
            ptx_part = torch.zeros((), dtype=torch.float64, device=device)
            if ptx is not None:  # 4. PPO-ptx: the language-modelling loss on pretraining text
                ptx_loss_t = _ptx_backward(models.policy, next(ptx), cfg, device)
                checks.append(("ptx loss", at, ptx_loss_t))
                ptx_part = ptx_loss_t.to(torch.float64) / world
            norms = (_clip_grad_norm(policy_params, cfg.max_grad_norm, device),
                     _clip_grad_norm(critic_params, cfg.max_grad_norm, device))
            checks.append(("policy gradient norm", at, norms[0]))
            checks.append(("critic gradient norm", at, norms[1]))
            optimizer.step()
            steps += 1
            step_rows.append(torch.cat([acc, ptx_part.reshape(1)]))
            norm_rows.append(torch.stack(norms).to(torch.float64))
        if early_stop:
            break
        epochs_done += 1
    optimizer.zero_grad(set_to_none=True)

    # one read of everything the update queued: the first NaN/inf in the order the steps met them stops the run
    if checks:
        values = torch.stack([v.detach().reshape(()).to(torch.float64) for _, _, v in checks]).tolist()
        for (name, at, _), value in zip(checks, values):
            check_finite(name, value, at)
    stat_names = (*LOSS_STATS, "ptx_loss")
    summed = D.all_reduce_sum(torch.stack([*step_rows, torch.cat([first, first.new_zeros(1)])])
                              if first is not None else torch.zeros(1, len(stat_names), dtype=torch.float64))
    rows_host = summed.tolist()
    norms_host = torch.stack(norm_rows).tolist() if norm_rows else []
    if first is not None:
        fk = dict(zip(stat_names, rows_host[-1]))
        metrics.update(approx_kl_first=fk["approx_kl"], ratio_first=fk["ratio_mean"])
    names = (*stat_names, "grad_norm", "critic_grad_norm")
    sums = {k: sum(r[i] for r in (a + b for a, b in zip(rows_host[:steps], norms_host))) for i, k in enumerate(names)
            if k != "ptx_loss" or ptx is not None}
    metrics.update({k: v / steps if steps else math.nan for k, v in sums.items()})
    metrics.update(early_stopped=float(early_stop), epochs_done=float(epochs_done), optimizer_steps=float(steps))
    distributed = world > 1
    if ro.values is not None and ro.returns is not None:
        ev = D.explained_variance if distributed else explained_variance
        metrics["explained_variance"] = ev(ro.values, ro.returns, ro.response_mask)
        mean = D.masked_mean if distributed else masked_mean
        metrics["value_mean"] = float(mean(ro.values, ro.response_mask))
    metrics["advantage_mean"] = float((D.masked_mean if distributed else masked_mean)(ro.advantages,
                                                                                       ro.response_mask))
    return metrics


@contextlib.contextmanager
def _gradient_sync(models: ModelSet, sync: bool) -> Iterator[None]:
    """Inside: DDP / FSDP reduce gradients over ranks in ``backward()`` only if ``sync`` (the last micro-batch of a
    minibatch); the other micro-batches accumulate locally. No-op for plain modules."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for m in (models.policy, models.critic):
                if m is None:
                    continue
                if isinstance(m, nn.parallel.DistributedDataParallel):
                    stack.enter_context(m.no_sync())
                elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2
                    m.set_requires_gradient_sync(False)
                    stack.callback(m.set_requires_gradient_sync, True)
        yield


def _ptx_backward(policy: nn.Module, batch: dict[str, Tensor], cfg: PPOConfig, device: torch.device) -> Tensor:
    """Backpropagate ``cfg.ptx_coef * ptx_loss`` of one pretraining batch; returns the ptx loss (nats/token, 0-d).

    Under DDP the ptx forward runs on the bare model (every rank its own batch), so the policy's gradients, the
    DDP-averaged PPO part plus this rank's ptx part, are averaged over ranks once more here; FSDP averages them
    itself (the ptx forward runs through the sharded root)."""
    with autocast_ctx(cfg.bf16, device):
        lm = ptx_loss(policy, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    (cfg.ptx_coef * lm).backward()
    if isinstance(policy, nn.parallel.DistributedDataParallel):
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        D.all_reduce_mean_(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    return lm.detach()


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float | None, device: torch.device) -> Tensor:
    """Clip the gradient norm of ``params`` to ``max_norm`` (None: only measure it); the norm as a 0-d tensor on
    ``device`` (0 for no parameters; the whole model's norm for FSDP shards), not read here."""
    if not params:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def minibatch_loss(ro: Rollout, idx: Tensor, models: ModelSet, cfg: PPOConfig, opts: ResolvedOptions,
                   kl_coef: float, r_used: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO loss of the rollout rows ``idx`` (a micro-batch) and its detached statistics (:data:`LOSS_STATS`, 0-d
    tensors: reading them is left to the caller).

    ``loss = policy_loss + value_coef * value_loss - entropy_coef * entropy (+ kl_coef * KL in loss mode)``, every
    term a masked mean over the rows' response tokens. ``r_used``: the longest response among the rows (the caller
    knows it from the lengths without a host round trip); computed from the mask when None.
    """
    mask = ro.response_mask[idx]
    # trim response columns no row of this micro-batch uses (less compute, same result: causal attention)
    if r_used is None:
        r_used = int(mask.sum(dim=0).nonzero().max()) + 1 if mask.any() else 1
    p = ro.prompt_len
    ids = ro.input_ids[idx, : p + r_used]
    attn = ro.attention_mask[idx, : p + r_used]
    mask = mask[:, :r_used]
    with autocast_ctx(cfg.bf16, ids.device):
        logprobs, values, entropy = response_forward(models.policy, ids, attn, p, cfg.temperature,
                                                     want_entropy=True, entropy_grad=cfg.entropy_coef > 0)
        if models.critic is not None:
            values = critic_values(models.critic, ids, attn, p)
    pg_loss, info = policy_loss(logprobs, ro.logprobs[idx, :r_used], ro.advantages[idx, :r_used], cfg.clip_coef,
                                mask)
    loss = pg_loss
    v_loss = torch.zeros((), device=ids.device)
    if opts.uses_critic:
        assert values is not None and ro.values is not None and ro.returns is not None
        v_loss = value_loss(values, ro.values[idx, :r_used], ro.returns[idx, :r_used], cfg.value_clip_coef, mask)
        loss = loss + cfg.value_coef * v_loss
    ent = masked_mean(entropy, mask)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * ent
    kl_loss = torch.zeros((), device=ids.device)
    if opts.kl_mode == "loss" and kl_coef > 0:
        kl_loss = kl_coef * masked_mean(kl_estimate(logprobs, ro.ref_logprobs[idx, :r_used], opts.kl_estimator), mask)
        loss = loss + kl_loss
    stats = {"policy_loss": pg_loss, "value_loss": v_loss, "entropy": ent, "approx_kl": info["approx_kl"],
             "clipfrac": info["clipfrac"], "ratio_mean": info["ratio_mean"], "kl_loss": kl_loss}
    return loss, {k: v.detach().float().reshape(()) for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------- advantages


def compute_advantages(ro: Rollout, cfg: PPOConfig, opts: ResolvedOptions, kl_coef: float) -> dict[str, float]:
    """Fill ``ro.shaped_scores``, ``ro.rewards``, ``ro.advantages`` (and ``ro.returns`` for GAE) in place.

    Computed in the dtype of ``ro.scores`` (float32 in training; float64 inputs stay float64). Returns statistics
    of the rollout (scores, KL to the reference, lengths) for logging.
    """
    mask = ro.response_mask
    lengths = ro.lengths
    s = ro.scores
    if cfg.reward_clip is not None:
        s = s.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.missing_eos_penalty is not None:
        s = s - cfg.missing_eos_penalty * (~ro.finished).to(s.dtype)
    if cfg.length_penalty:
        s = s - cfg.length_penalty * lengths.to(s.dtype)
    ro.shaped_scores = s

    kl_tok = per_token_kl(ro.logprobs, ro.ref_logprobs, mask, opts.kl_estimator)        # penalised estimator
    kl_seq = kl_tok.sum(dim=1)
    kl3_seq = per_token_kl(ro.logprobs, ro.ref_logprobs, mask, "k3").sum(dim=1)
    in_reward = opts.kl_mode == "reward"

    if cfg.advantage_estimator == "gae":
        rewards = token_rewards(s, kl_tok if in_reward else None, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = whiten_token_rewards(rewards, mask)
        assert ro.values is not None
        adv, ret = token_gae(rewards, ro.values, mask, cfg.gamma, cfg.gae_lambda)
        if cfg.normalize_advantages:
            adv = _normalize(adv, mask)  # over the whole rollout (all ranks)
        ro.returns = ret
    else:
        seq = s - kl_coef * kl_seq if in_reward else s
        rewards = token_rewards(seq, None, mask, 0.0)
        if cfg.advantage_estimator == "grpo":
            a = group_advantages(seq, cfg.group_size)
        else:
            a = rloo_advantages(seq, cfg.group_size)
            if cfg.normalize_advantages:  # over the whole rollout: gather (B floats per rank), keep this rank's rows
                n, rank = a.shape[0], D.dist_info().rank if D.is_distributed() else 0
                a = normalize(D.all_gather_cat(a, equal_sizes=True))[rank * n:(rank + 1) * n]
        adv = a[:, None] * mask
    ro.rewards = rewards
    ro.advantages = adv
    # the logged statistics of the whole rollout: every rank's (B,) values in rank order (no-op with one process)
    gather = lambda t: D.all_gather_cat(t, equal_sizes=True)  # noqa: E731
    scores_all, s, kl_seq, kl3_seq, lengths = (gather(t) for t in (ro.scores, s, kl_seq, kl3_seq, lengths))
    finished = gather(ro.finished)
    return {
        "score": float(scores_all.mean()),
        "score_std": float(scores_all.std()) if scores_all.numel() > 1 else 0.0,
        "reward": float(s.mean()),
        "reward_std": float(s.std()) if s.numel() > 1 else 0.0,
        "non_score_reward": float((-kl_coef * kl_seq).mean()) if in_reward else 0.0,
        "ref_kl": float(kl_seq.mean()),
        "ref_kl_k3": float(kl3_seq.mean()),
        "response_length": float(lengths.mean()),
        "eos_rate": float(finished.float().mean()),
    }


def token_rewards(scores: Tensor, kl: Tensor | None, response_mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (Ziegler et al. 2019): ``-kl_coef * kl_t`` at every response token plus the score
    at the LAST response token (found from ``response_mask``, never from the pad id).

    Args: scores (B,), kl (B, R) per-token KL estimate or None, response_mask (B, R) 0/1.
    Returns: (B, R) in the dtype of ``scores`` (and ``kl``).
    """
    dtype = scores.dtype if kl is None else torch.promote_types(scores.dtype, kl.dtype)
    mask = response_mask.to(dtype)
    rewards = torch.zeros_like(mask) if kl is None else -kl_coef * kl.to(dtype) * mask
    last = last_token_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(dtype) * mask[rows, last]
    return rewards


def token_gae(rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float,
              lam: float) -> tuple[Tensor, Tensor]:
    """GAE over the response tokens of each sequence with :func:`proxrl.core.gae`.

    Time is the token axis: the (B, R) tensors are transposed to (R, B). The episode terminates at each row's
    last response token (``terminated = 1`` there), so nothing after EOS (padding) leaks into the advantages.

    Returns ``(advantages, returns)``, both (B, R) in the dtype of ``rewards``, 0 where the mask is 0.
    """
    dtype = rewards.dtype
    mask = response_mask.to(dtype)
    v = values.to(dtype) * mask
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    terminated = torch.zeros_like(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    terminated[rows, last_token_index(mask)] = 1.0
    adv, ret = gae((rewards * mask).T, v.T, next_v.T, terminated.T, torch.zeros_like(terminated).T, gamma, lam)
    return adv.T.contiguous() * mask, ret.T.contiguous() * mask


def whiten_token_rewards(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """Scale per-token rewards by their masked std (no mean shift, so the sign of each reward is kept); the std of
    the whole rollout (all ranks) under torchrun."""
    return _normalize(rewards, response_mask, shift_mean=False)


def _normalize(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True) -> Tensor:
    """:func:`proxrl.core.normalize` with one process; with several, the same with the statistics of every rank's
    entries (:func:`proxrl.distributed.global_normalize`, equal up to the order of float sums)."""
    if D.is_distributed():
        return D.global_normalize(x, mask, shift_mean=shift_mean)
    return normalize(x, mask, shift_mean=shift_mean)


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, kind: str) -> Tensor:
    """(B, R) KL estimate ``kind`` of KL(pi || ref) per response token, 0 where masked."""
    return kl_estimate(logprobs, ref_logprobs, kind) * response_mask
