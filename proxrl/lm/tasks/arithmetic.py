"""Built-in verifiable task: multi-digit addition, ``"12+345="`` -> ``"357"`` + EOS, checked by exact match.

Everything is generated locally (no download). The tokenizer is character level (digits, ``+``, ``=``, space)
with ``<pad>`` (id 0) and ``<eos>`` (id 1), saved as a HF fast tokenizer so every stage loads it with
``AutoTokenizer.from_pretrained``. The reward :func:`reward_fn` is 1.0 for an exactly correct completion
(the decoded completion, EOS stripped, equals the sum) and 0.0 otherwise; PPO loads it as
``"proxrl.lm.tasks.arithmetic:reward_fn"``.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Sequence

CHARS = "0123456789+= "
_PROMPT = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def build_char_tokenizer(out_dir: str | Path | None = None, chars: str = CHARS) -> Any:
    """A character-level ``PreTrainedTokenizerFast``: ``<pad>``=0, ``<eos>``=1, ``<unk>``=2, then one id per char.

    Decoding concatenates characters (no spaces inserted). Padding side is left (generation convention).
    Saved with ``save_pretrained`` to ``out_dir`` if given.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

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


def make_problems(n: int, seed: int = 0, min_digits: int = 1, max_digits: int = 3,
                  exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """``n`` distinct operand pairs (a, b); each operand's digit count uniform in [min_digits, max_digits].

    Pairs in ``exclude`` are skipped (keeps held-out problems out of training). Deterministic given ``seed``.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(seed)
    space = (10 ** max_digits) ** 2
    if n > space // 2:
        raise ValueError(f"{n} problems requested from a space of about {space}; use more digits")
    seen = set(exclude or ())
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


EVAL_POOL = 1000     # size of the fixed held-out problem set
MAX_TRAIN = 200_000  # cap on training problems drawn at once


def held_out_problems(seed: int = 0, n: int = EVAL_POOL) -> list[tuple[int, int]]:
    """The task's fixed held-out problems (never used for training by :func:`proxrl.lm.tasks.task_prompts`)."""
    return make_problems(n, seed=seed + 1_000_003)


def sft_records(pairs: Sequence[tuple[int, int]]) -> list[dict[str, str]]:
    """Prompt/completion records ``{"prompt": "a+b=", "completion": "a+b"}`` for SFT (EOS appended by SFT)."""
    return [{"prompt": format_prompt(a, b), "completion": str(a + b)} for a, b in pairs]


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
