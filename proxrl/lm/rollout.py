"""Rollouts for PPO on a causal LM: sample completions, score them, and run the no-grad forwards PPO needs.

One rollout costs exactly:

* one KV-cached generation (``proxrl.lm.generation.generate``), which also returns the policy's log-probs
  of the sampled tokens at the sampling temperature. Those ARE the "old" log-probs of PPO: the weights
  have not changed since sampling, so a second policy forward would only recompute them (at the cost of
  a full forward pass). The first minibatch of every update therefore sees ratio == 1 up to float error;
* one batched no-grad forward of the reference model (log-probs at the same temperature);
* one batched no-grad forward of the critic (per-token values); when the value head sits on the policy trunk
  none: the generation pass applies the value head to the same hidden states it samples from;
* scoring: one reward-model forward (head read at the explicit last index) or one reward-function call.

``forward_batch_size`` splits the reference / critic forwards into chunks of rows (bounded memory on long
completions; the results equal the one-batch forward up to float rounding).

Layout: prompts are LEFT padded to a common length ``P``; responses follow at ``[P, P + R)``.
``attention_mask`` (B, P+R) and ``response_mask`` (B, R) are explicit everywhere and never derived from the
pad id (pad may equal eos). The response mask includes the EOS token itself. Turning scores into per-token
rewards and advantages is the update's first step (:func:`proxrl.lm.ppo.compute_advantages`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from proxrl import distributed as D
from proxrl.lm.generation import generate
from proxrl.lm.heads import is_value_head_policy
from proxrl.lm.logprobs import critic_values, response_forward
from proxrl.lm.positions import last_token_index
from proxrl.lm.reference import reference_context

__all__ = ["Rollout", "ModelSet", "collect_rollout", "autocast_ctx"]


def autocast_ctx(bf16: bool, device: torch.device | str | None = None) -> contextlib.AbstractContextManager:
    """``torch.autocast(<device type>, bfloat16)`` (CUDA, else the CPU; default the CPU) when ``bf16`` else a no-op
    context."""
    if not bf16:
        return contextlib.nullcontext()
    kind = torch.device(device).type if device is not None else "cpu"
    return torch.autocast(kind if kind == "cuda" else "cpu", dtype=torch.bfloat16)


@dataclass
class ModelSet:
    """The models PPO needs.

    policy: causal LM (maybe PEFT LoRA), or a :class:`~proxrl.lm.heads.PolicyWithValueHead` (shared-trunk
    critic: one forward gives logits and values). ref: the reference model from
    :func:`~proxrl.lm.reference.reference_from_policy`, always called inside
    :func:`~proxrl.lm.reference.reference_context` (which disables LoRA adapters when ref is the LoRA policy).
    critic: separate seq-cls model read at every position, or None (no critic, or value head on the policy).
    Under torchrun policy and critic are DDP-wrapped (the critic as a :class:`~proxrl.lm.heads.TokenValues`) or
    FSDP-sharded; the rollout's no-grad forwards use :func:`proxrl.distributed.unwrap_model` of them.
    """

    policy: nn.Module
    ref: nn.Module
    critic: nn.Module | None = None

    @property
    def value_head_on_policy(self) -> bool:
        return is_value_head_policy(self.policy)


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
    prompts: list[Any]         # as given: strings, or lists of messages for a chat model
    completions: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    score_parts: dict[str, Tensor] = field(default_factory=dict)  # raw (B,) scores of each reward component
    # filled by the update (proxrl.lm.ppo.compute_advantages)
    shaped_scores: Tensor | None = None   # (B,) scores after clipping / penalties
    rewards: Tensor | None = None         # (B, R)
    advantages: Tensor | None = None      # (B, R)
    returns: Tensor | None = None         # (B, R)

    @property
    def last_index(self) -> Tensor:
        """(B,) index of each row's last response token (EOS included)."""
        return last_token_index(self.response_mask)

    @property
    def lengths(self) -> Tensor:
        """(B,) number of response tokens per row."""
        return self.response_mask.sum(dim=1)


@torch.no_grad()
def collect_rollout(
    models: ModelSet,
    tokenizer: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompts: list[Any],
    score_fn: Callable[[Tensor, Tensor, int, Tensor, list[Any], list[str]], Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    generator: torch.Generator | None = None,
    bf16: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    forward_batch_size: int = 0,
    uniforms: Tensor | None = None,
    check_every: int = 1,
    all_done: Callable[[bool], bool] | None = None,
) -> Rollout:
    """Sample one completion per row of ``prompt_ids`` (B, P) and run the no-grad forwards listed above.

    ``score_fn(input_ids, attention_mask, prompt_len, response_mask, prompts, completions) -> (B,)`` scores
    the completed sequences (reward model or reward function); when it has ``last_components`` (a
    :class:`proxrl.lm.scoring.Scorer`) they are kept in ``Rollout.score_parts``. ``eos_token_id``: the id(s) that end
    a completion (a chat template's end-of-turn token and EOS; default ``tokenizer.eos_token_id``).
    ``forward_batch_size``: rows per reference / critic forward (0: all at once). ``uniforms``, ``check_every``,
    ``all_done``: see :func:`proxrl.lm.generation.generate`. Everything stays on ``prompt_ids``' device except
    the completions (decoded once) and what a reward function sees (strings).
    """
    t0 = time.perf_counter()
    device = prompt_ids.device
    policy = D.unwrap_model(models.policy)  # no DDP hooks in no-grad passes (an FSDP module is itself)
    with autocast_ctx(bf16, device):
        gen = generate(
            policy,
            prompt_ids,
            prompt_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
            stop_strings=tuple(stop_strings),
            tokenizer=tokenizer,
            generator=generator,
            return_values=models.value_head_on_policy,
            uniforms=uniforms,
            check_every=check_every,
            all_done=all_done,
        )
    t1 = time.perf_counter()
    # clone: generation runs under inference_mode, and inference tensors cannot be saved for backward later
    ids, attn, p = gen.sequences.clone(), gen.attention_mask.long().clone(), int(gen.prompt_len)
    rmask = gen.response_mask.float().clone()
    old_logprobs = gen.logprobs.float().clone() * rmask

    step = forward_batch_size if forward_batch_size > 0 else max(ids.shape[0], 1)
    chunks = [slice(i, i + step) for i in range(0, ids.shape[0], step)]
    with autocast_ctx(bf16, device):
        with reference_context(models.ref) as ref:
            ref_logprobs = torch.cat([response_forward(ref, ids[c], attn[c], p, temperature).logprobs
                                      for c in chunks])
        values = None
        if models.value_head_on_policy:
            # the value head shares the policy trunk: the generation pass computed the values
            values = gen.values.float().clone()
        elif models.critic is not None:
            critic = D.unwrap_model(models.critic)
            values = torch.cat([critic_values(critic, ids[c], attn[c], p) for c in chunks])
    ref_logprobs = ref_logprobs * rmask
    if values is not None:
        values = values * rmask
    t2 = time.perf_counter()

    resp, resp_mask = ids[:, p:].cpu().tolist(), rmask.bool().cpu().tolist()  # one device -> host copy
    completions = [tokenizer.decode([t for t, m in zip(r, rm) if m], skip_special_tokens=True)
                   for r, rm in zip(resp, resp_mask)]
    scores = score_fn(ids, attn, p, rmask, list(prompts), completions).detach().float().reshape(-1).to(device)
    parts = getattr(score_fn, "last_components", None)
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
        score_parts=dict(parts) if isinstance(parts, dict) else {},
    )
