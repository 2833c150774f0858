"""Evaluating a policy on prompts: sample completions (with KL to a reference), and measure their diversity."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch

from proxrl.lm.generation import generate
from proxrl.lm.logprobs import response_forward
from proxrl.lm.positions import left_pad

__all__ = ["sample", "diversity", "mean"]


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence."""
    return sum(xs) / len(xs) if xs else math.nan


def sample(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
           seed: int, batch_size: int = 64, ref_model: Any = None) -> dict[str, Any]:
    """Sample one completion per prompt (temperature 0 = greedy), in batches of left-padded prompts.

    Returns ``{"completions": list[str], "finished": list[bool], "kl": list[float]}``; ``kl`` (only with
    ``ref_model``) is the per-sequence k1 estimate ``sum_t log pi(y_t) - log ref(y_t)`` at the sampling temperature
    (temperature 1 for greedy), whose mean over samples from pi estimates KL(pi || ref) in nats.
    """
    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, list] = {"completions": [], "finished": [], "kl": []}
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk], pad)
        g = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                     eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer, generator=gen)
        rm = g.response_mask
        out["completions"] += [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                               for r, m in zip(g.responses, rm)]
        out["finished"] += g.finished.tolist()
        if ref_model is not None:
            with torch.no_grad():
                ref_lp = response_forward(ref_model, g.sequences, g.attention_mask.long(), g.prompt_len,
                                          temperature if temperature > 0 else 1.0).logprobs
            out["kl"] += ((g.logprobs - ref_lp) * rm).sum(1).tolist()
    return out


def diversity(texts: Sequence[str]) -> dict[str, Any]:
    """Diversity of a set of completions (word level, case-folded, punctuation kept as part of words).

    Returns ``distinct_1`` / ``distinct_2``: unique word unigrams / bigrams over all unigrams / bigrams of the set
    (Li et al. 2016, corpus level); ``unique``: fraction of distinct completions; ``top_trigram`` and
    ``top_trigram_fraction``: the word 3-gram found in the most completions and the fraction of completions
    containing it (a policy collapsing onto one stock phrase drives it up).
    """
    toks = [t.lower().split() for t in texts]
    uni = [w for t in toks for w in t]
    bi = [b for t in toks for b in zip(t, t[1:])]
    tri = Counter(g for t in toks for g in set(zip(t, t[1:], t[2:])))
    top, top_n = tri.most_common(1)[0] if tri else ((), 0)
    n = max(len(texts), 1)
    return {"distinct_1": len(set(uni)) / max(len(uni), 1), "distinct_2": len(set(bi)) / max(len(bi), 1),
            "unique": len({" ".join(t) for t in toks}) / n, "top_trigram": " ".join(top),
            "top_trigram_fraction": top_n / n}
