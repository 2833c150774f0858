"""Built-in verifiable task: multi-digit addition, ``"12+34="`` -> ``"46"`` + EOS, checked by exact match.

Everything is generated locally (no download). The tokenizer is character level (digits, ``+``, ``=``, space)
with ``<pad>`` (id 0) and ``<eos>`` (id 1), saved as a HF fast tokenizer so every stage loads it with
``AutoTokenizer.from_pretrained``. The reward :func:`reward_fn` is 1.0 for an exactly correct completion
(the decoded completion, EOS stripped, equals the sum) and 0.0 otherwise; PPO loads it as
``"proxrl.lm.tasks.arithmetic:reward_fn"``; :func:`evaluate_arithmetic` measures a policy against its SFT model.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Sequence

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from proxrl.lm.evaluation import mean, sample

CHARS = "0123456789+= "
_PROMPT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def build_char_tokenizer(out_dir: str | Path | None = None, chars: str = CHARS) -> Any:
    """A character-level ``PreTrainedTokenizerFast``: ``<pad>``=0, ``<eos>``=1, ``<unk>``=2, then one id per char.

    Decoding concatenates characters (no spaces inserted). Padding side is left (generation convention).
    Saved with ``save_pretrained`` to ``out_dir`` if given.
    """
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>",
                                  unk_token="<unk>")
    tok.padding_side = "left"
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def format_prompt(a: int, b: int) -> str:
    """``"a+b="``."""
    return f"{a}+{b}="


def make_problems(n: int, seed: int = 0, min_digits: int = 1, max_digits: int = 2,
                  exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """``n`` distinct operand pairs (a, b), each operand with ``min_digits``..``max_digits`` digits.

    With ``max_digits <= 2`` all pairs are enumerated and shuffled (uniform over pairs); otherwise each operand's
    digit count is drawn uniformly and pairs are drawn until ``n`` distinct ones are found. Pairs in ``exclude``
    are skipped (keeps held-out problems out of training). Deterministic given ``seed``.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(seed)
    lo = 0 if min_digits == 1 else 10 ** (min_digits - 1)
    exclude = exclude or set()
    if max_digits <= 2:
        values = range(lo, 10 ** max_digits)
        pool = [(a, b) for a in values for b in values if (a, b) not in exclude]
        if n > len(pool):
            raise ValueError(f"{n} problems requested but only {len(pool)} exist with <= {max_digits} digits")
        rng.shuffle(pool)
        return pool[:n]
    if n > (10 ** max_digits) ** 2 // 2:
        raise ValueError(f"{n} problems requested from a space of about {(10 ** max_digits) ** 2}; use more digits")
    seen = set(exclude)
    out: list[tuple[int, int]] = []

    def operand() -> int:
        d = rng.randint(min_digits, max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)

    while len(out) < n:
        pair = (operand(), operand())
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


DIGITS = 2           # operands of the built-in task: 0..99 ("12+34=" -> "46")
EVAL_POOL = 1000     # size of the fixed held-out problem set (of the 10,000 possible)


def held_out_problems(seed: int = 0, n: int = EVAL_POOL, max_digits: int = DIGITS) -> list[tuple[int, int]]:
    """The task's fixed held-out problems (never used for training by :func:`proxrl.lm.tasks.task_prompts`)."""
    return make_problems(n, seed=seed + 1_000_003, max_digits=max_digits)


def train_problems(n: int, seed: int = 0, max_digits: int = DIGITS) -> list[tuple[int, int]]:
    """Up to ``n`` training problems: every problem not in :func:`held_out_problems`, shuffled."""
    held = set(held_out_problems(seed, max_digits=max_digits))
    avail = (10 ** max_digits) ** 2 - len(held) if max_digits <= 2 else n
    return make_problems(min(n, avail), seed=seed, max_digits=max_digits, exclude=held)


def carryless_sum(a: int, b: int) -> int:
    """The sum with every carry dropped, digit by digit: ``57 + 68 -> 15`` ((5+6)%10, (7+8)%10)."""
    out, place = 0, 1
    while a or b:
        out += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return out


def has_carry(a: int, b: int) -> bool:
    """True if adding a and b carries in some digit (then :func:`carryless_sum` differs from the sum)."""
    return carryless_sum(a, b) != a + b


def sft_records(pairs: Sequence[tuple[int, int]], carry_error: float = 0.0, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion records ``{"prompt": "a+b=", "completion": "<sum>"}`` for SFT (EOS appended by SFT).

    ``carry_error`` simulates a sloppy labeller: on problems that carry, the completion is the carry-less sum
    (:func:`carryless_sum`) with this probability. SFT on such data gives a model that is right on problems
    without carries and often wrong on the others; PPO with the exact-match checker then fixes the systematic
    error (the built-in demo's setting).
    """
    if not 0.0 <= carry_error <= 1.0:
        raise ValueError(f"carry_error must be in [0, 1], got {carry_error}")
    rng = random.Random(seed)
    out = []
    for a, b in pairs:
        wrong = carry_error > 0 and has_carry(a, b) and rng.random() < carry_error
        out.append({"prompt": format_prompt(a, b), "completion": str(carryless_sum(a, b) if wrong else a + b)})
    return out


def parse_prompt(prompt: str) -> tuple[int, int] | None:
    """(a, b) from ``"a+b="`` (spaces allowed), or None if the prompt is not an addition."""
    m = _PROMPT.match(prompt)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_answer(prompt: str, completion: str) -> bool:
    """True iff ``completion`` (surrounding whitespace and a trailing ``<eos>`` ignored) is exactly the sum."""
    ab = parse_prompt(prompt)
    if ab is None:
        return False
    text = completion.strip()
    if text.endswith("<eos>"):
        text = text[: -len("<eos>")].rstrip()
    return text.isdigit() and text == str(ab[0] + ab[1])


def reward_fn(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Exact-match reward: 1.0 where the completion is the correct sum, else 0.0 (one float per sample)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [1.0 if check_answer(p, c) else 0.0 for p, c in zip(prompts, completions)]


def accuracy(prompts: Sequence[str], completions: Sequence[str]) -> float:
    """Fraction of exactly correct completions (nan for none)."""
    r = reward_fn(prompts, completions)
    return sum(r) / len(r) if r else float("nan")


def evaluate_arithmetic(policy: Any, ref: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                        temperature: float, seed: int) -> dict[str, Any]:
    """Exact-match accuracy of ``ref`` (the SFT model, "before") and ``policy`` ("after") on ``prompts``.

    Per model: greedy accuracy (``accuracy_greedy``), accuracy of samples at ``temperature`` (seed ``seed + 7``,
    ``accuracy_sampled``) and k1 KL(model || ref) of those samples in nats per completion (``kl_to_sft``).
    Returns ``{"before": metrics, "after": metrics, "completions": {name: greedy completions},
    "correct": {name: 0/1 per prompt}}``.
    """
    out: dict[str, Any] = {"completions": {}, "correct": {}}
    for name, model in (("before", ref), ("after", policy)):
        g = sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
        s = sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                   seed=seed + 7, ref_model=ref)
        correct = reward_fn(prompts, g["completions"])
        out[name] = {"accuracy_greedy": mean(correct), "accuracy_sampled": accuracy(prompts, s["completions"]),
                     "kl_to_sft": mean(s["kl"])}
        out["completions"][name] = g["completions"]
        out["correct"][name] = correct
    return out
