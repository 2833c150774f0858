"""Log-probs of response tokens (and the values and entropy aligned with them) from one forward pass.

Token ``P + t`` of a prompt (P columns, left-padded) + response sequence is predicted from position ``P + t - 1``,
so the response log-probs, the values of the states before each response token and the entropies all come from
positions ``[P - 1, P + R - 1)``. Position ids come from the attention mask, exactly as in generation, so these
log-probs reproduce the ones :func:`proxrl.lm.generation.generate` records while sampling.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from torch import Tensor, nn

from proxrl.core import entropy_from_logits
from proxrl.lm.heads import is_value_head_policy, token_values, unwrap_model
from proxrl.lm.positions import position_ids_from_mask

__all__ = ["logprobs_from_logits", "ResponseForward", "response_forward", "critic_values"]


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``tokens``: (..., V) and (...) long -> (...) float32.

    Memory: computed as ``logit[token] - logsumexp(logits)`` one batch row at a time, so no (…, V) log-prob
    tensor is materialised or kept for backward (logsumexp's backward reuses ``logits``); a temperature other
    than 1 costs one scaled copy. Low-precision logits (bf16/fp16) are upcast to float32 row by row.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree")
    if temperature != 1.0:
        logits = logits / temperature
    tokens = tokens.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, tokens).squeeze(-1)
        if logits.dim() > 2:
            lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        else:
            lse = torch.logsumexp(logits, dim=-1)
        return picked - lse
    if logits.dim() > 2:
        return torch.stack([torch.log_softmax(row.float(), -1).gather(-1, t).squeeze(-1)
                            for row, t in zip(logits, tokens)])
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens).squeeze(-1)


class ResponseForward(NamedTuple):
    """What :func:`response_forward` returns (R response columns)."""

    logprobs: Tensor            # (B, R) float32 log-probs of the response tokens at the temperature
    values: Tensor | None       # (B, R) float32 values V(s_t) from a shared-trunk value head, else None
    entropy: Tensor | None      # (B, R) entropy of softmax(logits / temperature), only when asked for


def response_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    *,
    want_entropy: bool = False,
    entropy_grad: bool = True,
) -> ResponseForward:
    """One forward over prompt + response, keeping the response part only.

    Args:
        model: a causal LM (HF / PEFT) or a :class:`~proxrl.lm.heads.PolicyWithValueHead` (then the values come
            from the same trunk pass).
        input_ids, attention_mask: (B, P + R) left-padded prompt followed by the response.
        prompt_len: P.
        temperature: the log-probs are those of ``softmax(logits / temperature)`` (the sampling temperature).
        want_entropy: also return the entropy per response position; with ``entropy_grad=False`` it is computed
            without keeping a (B, R, V) softmax for backward (logged, not optimised).

    Returns:
        :class:`ResponseForward` ``(logprobs, values, entropy)``; mask them with the response mask.
    """
    pos = position_ids_from_mask(attention_mask)
    values = None
    if is_value_head_policy(model):  # also inside DDP
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
    if want_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits.float() / temperature)
    return ResponseForward(logprobs, values, entropy)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def critic_values(critic: nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """(B, R) float32 values V(s_t) of the states before each response token, from a seq-cls critic."""
    v = token_values(critic, input_ids, attention_mask)  # (B, P+R), head at every position
    return v[:, prompt_len - 1 : -1].float()
