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

Dropout is disabled everywhere, so the ratio on the first minibatch is exactly 1 up to float error (checked by
the tests). The first NaN/inf in a reward, value, advantage, loss or gradient stops the run with one line
(:class:`proxrl.runs.finite.NonFiniteError`). The run around the update (models, rollouts, KL controller,
checkpoints) is :mod:`proxrl.lm.ppo_trainer`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

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
    policy_params = [p for p in models.policy.parameters() if p.requires_grad]
    critic_params = [p for p in models.critic.parameters() if p.requires_grad] if models.critic is not None else []
    stats = (*LOSS_STATS, "grad_norm", "critic_grad_norm") + (("ptx_loss",) if ptx is not None else ())
    sums = dict.fromkeys(stats, 0.0)
    steps = epochs_done = 0
    early_stop = False
    for epoch in range(cfg.epochs):
        perm = torch.randperm(sizes.batch_size, generator=generator)
        for mb in range(sizes.num_minibatches):
            at = f"{where}, epoch {epoch + 1}, minibatch {mb + 1}"
            optimizer.zero_grad(set_to_none=True)
            acc = dict.fromkeys(LOSS_STATS, 0.0)
            for micro in perm[mb * cfg.minibatch_size:(mb + 1) * cfg.minibatch_size].split(sizes.micro_batch_size):
                loss, stats = minibatch_loss(ro, micro, models, cfg, opts, kl_coef)
                check_finite("loss", loss, at)
                (loss / cfg.grad_accum_steps).backward()
                for k in acc:
                    acc[k] += stats[k] / cfg.grad_accum_steps
            if epoch == 0 and mb == 0:  # before any step: the ratio is 1 (up to float error)
                metrics.update(approx_kl_first=acc["approx_kl"], ratio_first=acc["ratio_mean"])
            # 3. target-KL early stop: no step on a minibatch whose KL(pi_old || pi) is already too large
            if kl_early_stop(acc["approx_kl"], cfg.target_kl):
                early_stop = True
                break
            if ptx is not None:  # 4. PPO-ptx: the language-modelling loss on pretraining text
                acc["ptx_loss"] = _ptx_backward(models.policy, next(ptx), cfg, ro.input_ids.device, at)
            acc["grad_norm"] = _clip_grad_norm(policy_params, cfg.max_grad_norm, "policy gradient", at)
            acc["critic_grad_norm"] = _clip_grad_norm(critic_params, cfg.max_grad_norm, "critic gradient", at)
            optimizer.step()
            steps += 1
            for k, v in acc.items():
                sums[k] += v
        if early_stop:
            break
        epochs_done += 1
    optimizer.zero_grad(set_to_none=True)

    metrics.update({k: v / steps if steps else math.nan for k, v in sums.items()})
    metrics.update(early_stopped=float(early_stop), epochs_done=float(epochs_done), optimizer_steps=float(steps))
    if ro.values is not None and ro.returns is not None:
        metrics["explained_variance"] = explained_variance(ro.values, ro.returns, ro.response_mask)
        metrics["value_mean"] = float(masked_mean(ro.values, ro.response_mask))
    metrics["advantage_mean"] = float(masked_mean(ro.advantages, ro.response_mask))
    return metrics


def _ptx_backward(policy: nn.Module, batch: dict[str, Tensor], cfg: PPOConfig, device: torch.device,
                  where: str) -> float:
    """Backpropagate ``cfg.ptx_coef * ptx_loss`` of one pretraining batch; returns the ptx loss (nats/token)."""
    with autocast_ctx(cfg.bf16):
        lm = ptx_loss(policy, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    check_finite("ptx loss", lm, where)
    (cfg.ptx_coef * lm).backward()
    return lm.item()


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float | None, what: str, where: str) -> float:
    """Clip the gradient norm of ``params`` to ``max_norm`` (None: only measure it); 0.0 for no parameters."""
    if not params:
        return 0.0
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf))
    check_finite(what + " norm", norm, where)
    return norm


def minibatch_loss(ro: Rollout, idx: Tensor, models: ModelSet, cfg: PPOConfig, opts: ResolvedOptions,
                   kl_coef: float) -> tuple[Tensor, dict[str, float]]:
    """The PPO loss of the rollout rows ``idx`` (a micro-batch) and its detached statistics (:data:`LOSS_STATS`).

    ``loss = policy_loss + value_coef * value_loss - entropy_coef * entropy (+ kl_coef * KL in loss mode)``, every
    term a masked mean over the rows' response tokens.
    """
    mask = ro.response_mask[idx]
    # trim response columns no row of this micro-batch uses (less compute, same result: causal attention)
    r_used = int(mask.sum(dim=0).nonzero().max()) + 1 if mask.any() else 1
    p = ro.prompt_len
    ids = ro.input_ids[idx, : p + r_used]
    attn = ro.attention_mask[idx, : p + r_used]
    mask = mask[:, :r_used]
    with autocast_ctx(cfg.bf16):
        logprobs, values, entropy = response_forward(models.policy, ids, attn, p, cfg.temperature,
                                                     want_entropy=True, entropy_grad=cfg.entropy_coef > 0)
        if models.critic is not None:
            values = critic_values(models.critic, ids, attn, p)
    pg_loss, info = policy_loss(logprobs, ro.logprobs[idx, :r_used], ro.advantages[idx, :r_used], cfg.clip_coef,
                                mask)
    loss = pg_loss
    v_loss = torch.zeros(())
    if opts.uses_critic:
        assert values is not None and ro.values is not None and ro.returns is not None
        v_loss = value_loss(values, ro.values[idx, :r_used], ro.returns[idx, :r_used], cfg.value_clip_coef, mask)
        loss = loss + cfg.value_coef * v_loss
    ent = masked_mean(entropy, mask)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * ent
    kl_loss = torch.zeros(())
    if opts.kl_mode == "loss" and kl_coef > 0:
        kl_loss = kl_coef * masked_mean(kl_estimate(logprobs, ro.ref_logprobs[idx, :r_used], opts.kl_estimator), mask)
        loss = loss + kl_loss
    stats = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": ent.item(),
             "approx_kl": float(info["approx_kl"]), "clipfrac": float(info["clipfrac"]),
             "ratio_mean": float(info["ratio_mean"]), "kl_loss": kl_loss.item()}
    return loss, stats


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
            adv = normalize(adv, mask)
        ro.returns = ret
    else:
        seq = s - kl_coef * kl_seq if in_reward else s
        rewards = token_rewards(seq, None, mask, 0.0)
        if cfg.advantage_estimator == "grpo":
            a = group_advantages(seq, cfg.group_size)
        else:
            a = rloo_advantages(seq, cfg.group_size)
            if cfg.normalize_advantages:
                a = normalize(a)
        adv = a[:, None] * mask
    ro.rewards = rewards
    ro.advantages = adv
    return {
        "score": float(ro.scores.mean()),
        "score_std": float(ro.scores.std()) if ro.scores.numel() > 1 else 0.0,
        "reward": float(s.mean()),
        "reward_std": float(s.std()) if s.numel() > 1 else 0.0,
        "non_score_reward": float((-kl_coef * kl_seq).mean()) if in_reward else 0.0,
        "ref_kl": float(kl_seq.mean()),
        "ref_kl_k3": float(kl3_seq.mean()),
        "response_length": float(lengths.mean()),
        "eos_rate": float(ro.finished.float().mean()),
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
    """Scale per-token rewards by their masked std (no mean shift, so the sign of each reward is kept)."""
    return normalize(rewards, response_mask, shift_mean=False)


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, kind: str) -> Tensor:
    """(B, R) KL estimate ``kind`` of KL(pi || ref) per response token, 0 where masked."""
    return kl_estimate(logprobs, ref_logprobs, kind) * response_mask
