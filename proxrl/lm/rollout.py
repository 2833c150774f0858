"""Rollouts for PPO on a causal LM: sample, score, and turn scores into per-token rewards and advantages.

One rollout costs exactly:

* one KV-cached generation (``proxrl.lm.generation.generate``), which also returns the policy's log-probs
  of the sampled tokens at the sampling temperature. Those ARE the "old" log-probs of PPO: the weights
  have not changed since sampling, so a second policy forward would only recompute them (at the cost of
  a full forward pass). The first minibatch of every update therefore sees ratio == 1 up to float error;
* one batched no-grad forward of the reference model (log-probs at the same temperature);
* one batched no-grad forward of the critic (per-token values), or — when the value head sits on the
  policy trunk — one forward of the policy that yields values (its logits are not needed again);
* scoring: one reward-model forward (head read at the explicit last index) or one reward-function call.

Layout: prompts are LEFT padded to a common length ``P``; responses follow at ``[P, P + R)``.
``attention_mask`` (B, P+R) and ``response_mask`` (B, R) are explicit everywhere and never derived from the
pad id (pad may equal eos). The response mask includes the EOS token itself.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from proxrl.core import gae, kl_estimate, normalize

__all__ = [
    "Rollout",
    "ModelSet",
    "left_pad",
    "last_response_index",
    "response_forward",
    "critic_values",
    "collect_rollout",
    "token_rewards",
    "token_gae",
    "whiten_token_rewards",
    "per_token_kl",
    "autocast_ctx",
]


def autocast_ctx(bf16: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast("cpu", bfloat16)`` when ``bf16`` else a no-op context."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@dataclass
class ModelSet:
    """The models PPO needs.

    policy: causal LM (maybe PEFT LoRA), or a :class:`~proxrl.lm.models.PolicyWithValueHead` (shared-trunk
    critic: one forward gives logits and values). ref: the reference model from
    :func:`~proxrl.lm.models.reference_from_policy`, always called inside
    :func:`~proxrl.lm.models.reference_context` (which disables LoRA adapters when ref is the LoRA policy).
    critic: separate seq-cls model read at every position, or None (no critic, or value head on the policy).
    """

    policy: nn.Module
    ref: nn.Module
    critic: nn.Module | None = None

    @property
    def value_head_on_policy(self) -> bool:
        from proxrl.lm.models import PolicyWithValueHead

        return isinstance(self.policy, PolicyWithValueHead)


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists. Returns ``(input_ids (B, P) long, attention_mask (B, P) long)``."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if len(toks):
            ids[i, width - len(toks):] = torch.as_tensor(list(toks), dtype=torch.long)
            mask[i, width - len(toks):] = 1
    return ids, mask


def last_response_index(response_mask: Tensor) -> Tensor:
    """(B,) index of the last 1 in each row of ``response_mask`` (B, R) (0 for an all-zero row)."""
    from proxrl.lm.models import last_token_index

    return last_token_index(response_mask)


def response_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    temperature: float,
    *,
    want_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One forward over prompt+response, keeping the response part only.

    Token ``P + t`` is predicted from position ``P + t - 1``, so the response log-probs and the values of the
    states before each response token both come from positions ``[P - 1, P + R - 1)``. Position ids come
    from the attention mask, exactly as in generation.

    Args:
        model: causal LM (HF / PEFT) or PolicyWithValueHead (then values come from the same forward).
        input_ids, attention_mask: (B, P+R).
    Returns:
        ``(logprobs (B, R) float32 of input_ids[:, P:] under softmax(logits / temperature),
        values (B, R) float32 or None, entropy (B, R) of softmax(logits / temperature) or None)``.
    """
    from proxrl.core import entropy_from_logits
    from proxrl.lm.models import PolicyWithValueHead, logprobs_from_logits, position_ids_from_mask

    pos = position_ids_from_mask(attention_mask)
    values = None
    if isinstance(model, PolicyWithValueHead):
        logits, all_values = model(input_ids, attention_mask, pos)
        values = all_values[:, prompt_len - 1 : -1].float()
        logits = logits[:, prompt_len - 1 : -1]
    else:
        kw = {}
        if _accepts_logits_to_keep(model):
            # the LM head only at the R + 1 last positions: prompt positions' logits are never needed
            kw["logits_to_keep"] = input_ids.shape[1] - prompt_len + 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                       **kw).logits
        logits = logits[:, -(input_ids.shape[1] - prompt_len + 1) : -1]
    logprobs = logprobs_from_logits(logits, input_ids[:, prompt_len:], temperature)
    entropy = None
    if want_entropy:  # without entropy_grad no (B, R, V) softmax is kept for backward (entropy only logged)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits.float() / temperature)
    return logprobs, values, entropy


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    from proxrl.lm.models import _unwrap

    try:
        return "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def critic_values(critic: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """(B, R) values V(s_t) of the states before each response token, from a seq-cls critic."""
    from proxrl.lm.models import token_values

    v = token_values(critic, input_ids, attention_mask)  # (B, P+R), head at every position
    return v[:, prompt_len - 1 : -1].float()


@dataclass
class Rollout:
    """One batch of sampled completions and everything PPO needs about them (B sequences, R response slots)."""

    input_ids: Tensor          # (B, P+R) long: left-padded prompt then response (pad after EOS)
    attention_mask: Tensor     # (B, P+R) long
    prompt_len: int            # P
    response_mask: Tensor      # (B, R) float, 1 up to and including EOS
    logprobs: Tensor           # (B, R) old log-probs at the sampling temperature (from generation), 0 where masked
    ref_logprobs: Tensor       # (B, R) reference log-probs at the same temperature, 0 where masked
    values: Tensor | None      # (B, R) critic values, 0 where masked; None without a critic
    scores: Tensor             # (B,) raw scores from the reward model / function
    finished: Tensor           # (B,) bool: emitted EOS or a stop string
    prompts: list[str]
    completions: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    # filled by the trainer
    shaped_scores: Tensor | None = None   # (B,) scores after clipping / penalties
    rewards: Tensor | None = None         # (B, R)
    advantages: Tensor | None = None      # (B, R)
    returns: Tensor | None = None         # (B, R)

    @property
    def last_index(self) -> Tensor:
        return last_response_index(self.response_mask)

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(dim=1)


@torch.no_grad()
def collect_rollout(
    models: ModelSet,
    tokenizer: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompts: list[str],
    score_fn: Callable[[Tensor, Tensor, int, Tensor, list[str], list[str]], Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    generator: torch.Generator | None = None,
    bf16: bool = False,
) -> Rollout:
    """Sample one completion per row of ``prompt_ids`` (B, P) and run the no-grad forwards listed above.

    ``score_fn(input_ids, attention_mask, prompt_len, response_mask, prompts, completions) -> (B,)`` scores
    the completed sequences (reward model or reward function).
    """
    from proxrl.lm.generation import generate
    from proxrl.lm.models import reference_context

    t0 = time.perf_counter()
    with autocast_ctx(bf16):
        gen = generate(
            models.policy,
            prompt_ids,
            prompt_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=tokenizer.eos_token_id,
            stop_strings=tuple(stop_strings),
            tokenizer=tokenizer,
            generator=generator,
        )
    t1 = time.perf_counter()
    # clone: generation runs under inference_mode, and inference tensors cannot be saved for backward later
    ids, attn, p = gen.sequences.clone(), gen.attention_mask.long().clone(), int(gen.prompt_len)
    rmask = gen.response_mask.float().clone()
    old_logprobs = gen.logprobs.float().clone() * rmask

    with autocast_ctx(bf16):
        with reference_context(models.ref) as ref:
            ref_logprobs, _, _ = response_forward(ref, ids, attn, p, temperature)
        values = None
        if models.value_head_on_policy:
            # the value head shares the policy trunk: one forward gives the values (logits are not needed)
            _, values, _ = response_forward(models.policy, ids, attn, p, temperature)
        elif models.critic is not None:
            values = critic_values(models.critic, ids, attn, p)
    ref_logprobs = ref_logprobs * rmask
    if values is not None:
        values = values * rmask
    t2 = time.perf_counter()

    resp = ids[:, p:]
    completions = [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(resp, rmask)]
    scores = score_fn(ids, attn, p, rmask, list(prompts), completions).detach().float().reshape(-1)
    t3 = time.perf_counter()
    return Rollout(
        input_ids=ids,
        attention_mask=attn,
        prompt_len=p,
        response_mask=rmask,
        logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        finished=gen.finished.bool().clone(),
        prompts=list(prompts),
        completions=completions,
        timings={"generation": t1 - t0, "forward": t2 - t1, "scoring": t3 - t2},
    )


def token_rewards(scores: Tensor, kl: Tensor | None, response_mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (Ziegler et al. 2019): ``-kl_coef * kl_t`` at every response token plus the score
    at the LAST response token (found from ``response_mask``, never from the pad id).

    Args: scores (B,), kl (B, R) per-token KL estimate or None, response_mask (B, R). Returns (B, R).
    """
    mask = response_mask.float()
    rewards = torch.zeros_like(mask) if kl is None else -kl_coef * kl.float() * mask
    last = last_response_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.float() * mask[rows, last]
    return rewards


def token_gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over the response tokens of each sequence with :func:`proxrl.core.gae`.

    Time is the token axis: the (B, R) tensors are transposed to (R, B). The episode terminates at each row's
    last response token (``terminated = 1`` there), so nothing after EOS (padding) leaks into the advantages.

    Returns ``(advantages, returns)``, both (B, R), 0 where the mask is 0.
    """
    mask = response_mask.float()
    v = values.float() * mask
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    terminated = torch.zeros_like(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    terminated[rows, last_response_index(mask)] = 1.0
    adv, ret = gae(
        (rewards.float() * mask).T, v.T, next_v.T, terminated.T, torch.zeros_like(terminated).T, gamma, lam
    )
    return adv.T.contiguous() * mask, ret.T.contiguous() * mask


def whiten_token_rewards(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """Scale per-token rewards by their masked std (no mean shift, so the sign of each reward is kept)."""
    return normalize(rewards, response_mask, shift_mean=False)


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, kind: str) -> Tensor:
    """(B, R) KL estimate ``kind`` of KL(pi || ref) per response token, 0 where masked."""
    return kl_estimate(logprobs, ref_logprobs, kind) * response_mask
