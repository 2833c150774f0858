"""Batched sampling from a causal LM with a hand-written KV-cache loop (the PPO rollout's generator).

One prefill forward over the left-padded prompts, then one single-token forward per step reusing the KV cache.
Position ids come from the attention mask (``cumsum(mask) - 1``), exactly as
:func:`proxrl.lm.logprobs.response_forward` and every later PPO forward compute them, so the log-probs recorded here
are reproduced by a full forward pass over the finished sequences (PPO's ratio is 1 before the first update).

With a :class:`~proxrl.lm.heads.PolicyWithValueHead` and ``return_values=True`` each step runs the trunk once and
applies both the LM head (at the last position) and the value head to the same hidden state, so the rollout gets
the values V(s_t) of every response token from the sampling pass itself (no second forward over the sequences);
they equal the full-forward values of :func:`proxrl.lm.logprobs.response_forward` up to float rounding.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from proxrl.errors import UserError
from proxrl.lm.heads import PolicyWithValueHead, model_trunk, unwrap_model
from proxrl.lm.logprobs import logprobs_from_logits
from proxrl.lm.positions import position_ids_from_mask


@dataclass
class GenerationOutput:
    """Result of :func:`generate` (B rows, P prompt columns, R <= max_new_tokens response columns).

    Attributes:
        sequences: (B, P + R) long, the left-padded prompts followed by the responses; response positions after
            a row finished hold ``pad_token_id``.
        attention_mask: (B, P + R) long, the prompt mask followed by ``response_mask``.
        prompt_len: P.
        response_mask: (B, R) long, 1 for generated tokens up to and including the first EOS / the token that
            completed a stop string, 0 after.
        logprobs: (B, R) float32, ``log_softmax(logits / temperature)`` of the tempered but UNFILTERED
            distribution at the sampled tokens (see :func:`generate`), 0 where ``response_mask`` is 0.
        finished: (B,) bool, the row emitted EOS or a stop string (False: it hit ``max_new_tokens``).
        values: (B, R) float32 values of the states before each response token (``return_values``), 0 where
            ``response_mask`` is 0; else None.
    """

    sequences: Tensor
    attention_mask: Tensor
    prompt_len: int
    response_mask: Tensor
    logprobs: Tensor
    finished: Tensor
    values: Tensor | None = None

    @property
    def responses(self) -> Tensor:
        """(B, R) the generated tokens (pad after a row finished)."""
        return self.sequences[:, self.prompt_len:]


def _filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then nucleus (top-p) filtering of (B, V) tempered logits -> new (B, V) with removed entries -inf.

    Nucleus is computed on the top-k-renormalised distribution (the HF warper order); a token is dropped when
    the probability mass of the tokens ranked before it already reaches ``top_p`` (the top token always stays).
    Only the k kept entries are sorted when top-k is on.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # sorted, descending
    elif top_p < 1.0:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    else:
        return logits.clone()
    if top_p < 1.0:
        probs = vals.softmax(-1)
        vals = vals.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)


_BAD_PROBS = ("the model produced NaN/inf or all-zero probabilities while sampling; check the policy weights (a "
              "diverged update?) and the temperature")


def _sample(probs: Tensor, generator: torch.Generator | None, uniform: Tensor | None = None,
            bad: Tensor | None = None) -> Tensor:
    """One draw per row of (B, V) probabilities (need not sum to 1) -> (B,) long, by inverse CDF.

    Exact up to float64 rounding: ``cdf = cumsum(probs)`` in float64, ``u ~ U[0, cdf[-1])``, token = first index
    with ``cdf > u`` (zero-probability tokens are never drawn). One uniform per row instead of
    ``torch.multinomial``'s per-entry randomness: ~20x faster on CPU for a 1k vocabulary. ``uniform``: the (B,)
    uniforms in [0, 1) to use instead of drawing from ``generator``. ``bad``: a (B,) bool tensor to mark rows with
    NaN/inf/all-zero probabilities in (checked by the caller later, without a host round trip here) instead of
    raising at once.
    """
    cdf = probs.to(torch.float64).cumsum_(-1)
    total = cdf[:, -1:]
    ok = (total > 0) & torch.isfinite(total)
    if bad is None:
        if not bool(ok.all()):
            raise UserError(_BAD_PROBS)
    else:
        bad |= ~ok.squeeze(-1)
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device)
    u = uniform.reshape(total.shape).to(torch.float64) * total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _is_sharded(model: Any) -> bool:
    """True for a model with FSDP2-sharded parts (its forwards gather parameters)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _cache_kw(model: Any) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _get_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def generate(model: Any, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             stop_strings: Sequence[str] = (), tokenizer: Any = None,
             generator: torch.Generator | None = None, return_values: bool = False,
             uniforms: Tensor | None = None, check_every: int = 1,
             all_done: Callable[[bool], bool] | None = None) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` tokens for each left-padded prompt.

    Args:
        model: a causal LM (HF, PEFT-wrapped, or :class:`~proxrl.lm.heads.PolicyWithValueHead`).
        input_ids: (B, P) long, LEFT-padded prompts.  attention_mask: (B, P) 0/1.
        max_new_tokens: R_max >= 1.
        temperature: > 0 samples from ``softmax(logits / temperature)`` (after top-k/top-p filtering);
            0 is greedy (argmax), and then ``logprobs`` are at temperature 1.
        top_k: keep the k most likely tokens (0 = off).  top_p: nucleus mass (1.0 = off). Both filter the
            tempered distribution.
        eos_token_id: an id or ids that finish a row (included in the response). None = no EOS stop.
        pad_token_id: written after a row finished; default ``tokenizer.pad_token_id``, else the model config's,
            else the (first) EOS id, else 0.
        stop_strings: a row finishes once its decoded response contains any of them (the completing token is
            included). Needs ``tokenizer``. Costs one decode per unfinished row per step.
        generator: a ``torch.Generator`` for reproducible sampling.
        return_values: with a :class:`~proxrl.lm.heads.PolicyWithValueHead`, also return the value head's values
            from the same trunk passes (see the module docstring); ignored for other models.
        uniforms: (max_new_tokens, B) uniforms in [0, 1) (row t for step t), used instead of drawing from
            ``generator``: a multi-process rollout takes its rows of the whole rollout's draws, so a sample does not
            depend on how the rollout is split.
        check_every: look whether every row has finished (a host round trip) every this many steps, not every
            step; the result is the same (trailing steps in which no row was alive are dropped), and NaN/inf
            probabilities are reported after the loop instead of at once.
        all_done: combines this process's "every row finished" over processes (e.g. FSDP, where every process
            must run the same number of forwards); called at the same steps on every process.

    Returns:
        :class:`GenerationOutput`; R is the number of steps run (< R_max if every row finished early).

    Log-probs choice: ``logprobs`` are ``log_softmax(logits / temperature)`` of the tempered but UNFILTERED
    distribution, gathered at the sampled tokens. PPO needs pi_old to be recomputable by a later full forward pass
    at the same temperature (which knows nothing of the top-k/top-p filter), and the ratio pi/pi_old must be
    exactly 1 before the first update; so with top-k/top-p on, these are the log-probs of the policy being
    optimised, not of the (filtered) sampling distribution.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0, got {top_k}")
    if stop_strings and tokenizer is None:
        raise UserError("stop_strings need a tokenizer to decode responses; pass tokenizer=")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         f"must both be (B, P)")
    value_model = model if return_values and isinstance(model, PolicyWithValueHead) else None
    if isinstance(model, PolicyWithValueHead):
        model = model.policy
    base = unwrap_model(model)
    cache_kw = _cache_kw(base)
    step_fn = _model_step(model, base, cache_kw) if value_model is None else _value_head_step(value_model)
    if eos_token_id is None:
        eos_ids: list[int] = []
    elif isinstance(eos_token_id, int):
        eos_ids = [eos_token_id]
    else:
        eos_ids = [int(e) for e in eos_token_id]
    if pad_token_id is None:
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            pad_token_id = tokenizer.pad_token_id
        elif getattr(base.config, "pad_token_id", None) is not None:
            pad_token_id = base.config.pad_token_id
        else:
            pad_token_id = eos_ids[0] if eos_ids else 0
    stop_strings = tuple(stop_strings)

    device = input_ids.device
    bsz, plen = input_ids.shape
    eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    mask = attention_mask.to(dtype=torch.long)
    positions = position_ids_from_mask(mask)
    next_pos = positions[:, -1:] + 1

    tokens: list[Tensor] = []
    logps: list[Tensor] = []
    valid: list[Tensor] = []
    vals: list[Tensor] = []
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    check_every = max(1, int(check_every))
    bad = torch.zeros(bsz, dtype=torch.bool, device=device) if check_every > 1 else None
    if uniforms is not None and (uniforms.dim() != 2 or uniforms.shape[1] != bsz
                                 or uniforms.shape[0] < max_new_tokens):
        raise ValueError(f"uniforms {tuple(uniforms.shape)} must be (max_new_tokens={max_new_tokens}, B={bsz})")
    was_training = model.training
    model.eval()
    try:
        # no inference tensors for an FSDP-sharded model: its gathered parameters are reused in training
        with torch.no_grad() if _is_sharded(model) else torch.inference_mode():
            logits, value, cache = step_fn(input_ids, mask, positions, None)
            for step in range(max_new_tokens):
                logits = logits.float()
                if temperature == 0:
                    tok = logits.argmax(dim=-1)
                    lp = logprobs_from_logits(logits, tok)
                else:
                    scaled = logits / temperature if temperature != 1.0 else logits
                    lp_all = torch.log_softmax(scaled, dim=-1)
                    if top_k or top_p < 1.0:
                        probs = _filter_logits(scaled, top_k, top_p).softmax(-1)
                    else:
                        probs = lp_all.exp()
                    tok = _sample(probs, generator, None if uniforms is None else uniforms[step], bad)
                    lp = lp_all.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
                alive = ~done
                tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
                lp = torch.where(alive, lp, torch.zeros_like(lp))
                tokens.append(tok)
                logps.append(lp)
                valid.append(alive)
                if value is not None:
                    vals.append(torch.where(alive, value.float(), torch.zeros_like(value, dtype=torch.float32)))
                if eos_t is not None:
                    done = done | (alive & torch.isin(tok, eos_t))
                if stop_strings:
                    resp = torch.stack(tokens, 1)
                    for i in alive.nonzero().flatten().tolist():
                        if not done[i]:
                            text = tokenizer.decode(resp[i].tolist(), skip_special_tokens=False)
                            if any(s in text for s in stop_strings):
                                done[i] = True
                if step == max_new_tokens - 1:
                    break
                if stop_strings or (step + 1) % check_every == 0:
                    finished = bool(done.all())
                    if all_done is not None:
                        finished = all_done(finished)
                    if finished:
                        break
                mask = torch.cat([mask, mask.new_ones(bsz, 1)], dim=1)
                logits, value, cache = step_fn(tok.unsqueeze(-1), mask, next_pos, cache)
                next_pos = next_pos + 1
    finally:
        model.train(was_training)

    if bad is not None and bool(bad.any()):
        raise UserError(_BAD_PROBS)
    if check_every > 1 or all_done is not None:  # drop the trailing steps in which no row was alive
        used = int(torch.stack(valid, 1).any(0).nonzero().max()) + 1 if len(valid) > 1 else len(valid)
        tokens, logps, valid, vals = tokens[:used], logps[:used], valid[:used], vals[:used]
    responses = torch.stack(tokens, 1)
    response_mask = torch.stack(valid, 1).long()
    return GenerationOutput(
        sequences=torch.cat([input_ids, responses], 1),
        attention_mask=torch.cat([attention_mask.long(), response_mask], 1),
        prompt_len=plen,
        response_mask=response_mask,
        logprobs=torch.stack(logps, 1),
        finished=done.clone(),
        values=torch.stack(vals, 1) if value_model is not None else None,
    )


StepFn = Callable[[Tensor, Tensor, Tensor, Any], tuple[Tensor, "Tensor | None", Any]]


def _model_step(model: Any, base: Any, cache_kw: str) -> StepFn:
    """One cached forward of a causal LM: ``(ids, mask, positions, cache) -> (last logits (B, V), None, cache)``."""
    fwd_kw: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        fwd_kw["logits_to_keep"] = 1

    def step(ids: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> tuple[Tensor, None, Any]:
        kw = {cache_kw: cache} if cache is not None else {}
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw, **fwd_kw)
        return out.logits[:, -1, :], None, _get_cache(out)

    return step


def _value_head_step(vh: PolicyWithValueHead) -> StepFn:
    """One cached trunk forward of a shared-trunk policy: the LM head and the value head on the last hidden state
    (as :meth:`PolicyWithValueHead.forward` computes them): ``-> (logits (B, V), values (B,), cache)``."""
    trunk = model_trunk(vh.policy)
    lm_head = unwrap_model(vh.policy).get_output_embeddings()
    kw_name = _cache_kw(trunk)

    def step(ids: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> tuple[Tensor, Tensor, Any]:
        kw = {kw_name: cache} if cache is not None else {}
        out = trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        h = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, -1]
        return lm_head(h), vh.value_head(h).squeeze(-1), _get_cache(out)

    return step
