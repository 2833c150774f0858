"""Verifiable task for a real instruct model: short arithmetic word problems, checked by the final number.

``"Tom has 7 apples. He buys 5 more. How many apples does Tom have now?"`` -> ``12``. Everything is generated
offline and deterministically from a seed (:func:`make_problems`). A problem is a *start* sentence (``x = n``, or
``x = n * m`` for "n boxes with m in each"), zero to two *step* sentences (``x += n`` / ``x -= n``) and a question.
Numbers are small and no intermediate count goes below zero. The ``train`` and ``eval`` (held-out) splits use
disjoint names and objects, so no held-out problem text can occur in training; the sentence templates are
shared, so what PPO learns on one split is measurable on the other.

Prompts are chat messages (:func:`messages`): a system turn asking for only the final number with one solved
example (:data:`SYSTEM`), then the problem as the user turn; :func:`plain_prompt` is the plain-text fallback for a
run without a chat template.

Reward (:func:`reward_fn`): 1.0 when the LAST integer in the completion (:func:`extract_final_number`) equals the
answer, else 0.0; no format bonus (a completion "12" and "The answer is 12." score the same). The answer is not
looked up in a table: :func:`solve` parses the problem sentences back out of the prompt text with the same
templates that wrote them, so the reward works on any rendering of the prompt (plain text, a ChatML-rendered
``<|im_start|>user ...`` string, even ``str()`` of the message list) in any process, and an explicit ``answers``
list (e.g. a data column) takes precedence when given. PPO loads it as
``"proxrl.lm.tasks.word_problems:reward_fn"``.

Command line::

    python -m proxrl.lm.tasks.word_problems write OUT_DIR [--n-train 2000] [--n-eval 200] [--render-with MODEL_DIR]
    python -m proxrl.lm.tasks.word_problems zero-shot MODEL_DIR [--n 100] [--temperature 0] [--plain]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "ProblemSpec", "DEFAULT_SPEC", "SPECS", "INSTRUCTION", "SYSTEM", "messages", "make_problems", "problem_text",
    "plain_prompt", "solve", "extract_final_number", "reward_fn", "accuracy", "write_prompt_files", "zero_shot",
]

INSTRUCTION = "Reply with only the final number, nothing else."
EXAMPLE = 'Example: "Kim has 3 pens. She buys 2 more. How many pens does Kim have now?" Reply: 5'
SYSTEM = f"You solve math word problems. {INSTRUCTION} {EXAMPLE}"
SPLITS = ("train", "eval")

# ----------------------------------------------------------------------------------------------- vocabulary
# (name, subject pronoun, object pronoun). Train and eval pools are disjoint (names and objects).
_NAMES: dict[str, list[tuple[str, str, str]]] = {
    "train": [("Tom", "he", "him"), ("Anna", "she", "her"), ("Ben", "he", "him"), ("Lucy", "she", "her"),
              ("Sam", "he", "him"), ("Mia", "she", "her"), ("Jack", "he", "him"), ("Emma", "she", "her"),
              ("Leo", "he", "him"), ("Zoe", "she", "her"), ("Max", "he", "him"), ("Lily", "she", "her")],
    "eval": [("Omar", "he", "him"), ("Sara", "she", "her"), ("Ivan", "he", "him"), ("Nina", "she", "her"),
             ("Paul", "he", "him"), ("Rosa", "she", "her"), ("Hugo", "he", "him"), ("Ella", "she", "her")],
}
_OBJECTS: dict[str, list[str]] = {
    "train": ["apples", "pencils", "marbles", "stickers", "cookies", "books", "stamps", "shells"],
    "eval": ["oranges", "crayons", "cards", "candies", "coins", "balloons", "buttons", "eggs"],
}
_BOXES = [("boxes", "box"), ("bags", "bag"), ("packs", "pack"), ("jars", "jar")]

# Sentence templates by operation. Placeholders: {name} {other} (capitalised names), {Pron}/{pron} (he/she),
# {him} (him/her), {obj} (plural object), {box}/{box1} (container plural/singular), {n} {m} (numbers).
# Semantics: start x = n; start_mul x = n * m; add x += n; sub x -= n.
_TEMPLATES: dict[str, list[str]] = {
    "start": ["{name} has {n} {obj}.",
              "{name} had {n} {obj} this morning.",
              "There are {n} {obj} in {name}'s bag."],
    "start_mul": ["{name} has {n} {box} of {obj}, and each {box1} holds {m} {obj}.",
                  "{name} buys {n} {box} with {m} {obj} in each {box1}."],
    "add": ["{Pron} buys {n} more.",
            "{Pron} finds {n} more {obj}.",
            "{other} gives {him} {n} more {obj}.",
            "Then {pron} gets {n} more {obj}."],
    "sub": ["{Pron} gives {n} {obj} to {other}.",
            "{Pron} loses {n} of them.",
            "Then {pron} sells {n} {obj}.",
            "{other} takes {n} {obj} from {him}."],
}
_QUESTIONS = ["How many {obj} does {name} have now?", "How many {obj} does {name} have in the end?"]

_FIELD_RE = {"name": r"[A-Z][a-z]+", "other": r"[A-Z][a-z]+", "Pron": r"(?:He|She)", "pron": r"(?:he|she)",
             "him": r"(?:him|her)", "obj": r"[a-z]+", "box": r"[a-z]+", "box1": r"[a-z]+", "n": r"(\d+)",
             "m": r"(\d+)"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(_FIELD_RE[part] if i % 2 else re.escape(part))
    return re.compile(r"(?<!\w)" + "".join(out))


_PATTERNS: list[tuple[str, re.Pattern[str]]] = [(op, _compile(t)) for op, ts in _TEMPLATES.items() for t in ts]


# ----------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class ProblemSpec:
    """Difficulty of generated problems.

    Attributes:
        kinds: problem shapes drawn uniformly; each is a tuple of operations after the start sentence, the start
            being ``"start"`` or ``"start_mul"`` (first element). E.g. ``("start", "add")`` = one addition.
        start_range: inclusive range of the starting count (``start``).
        step_range: inclusive range of the number added or removed by a step.
        factor_range: inclusive range of both factors of ``start_mul`` (n boxes, m per box).
    """

    kinds: tuple[tuple[str, ...], ...] = (("start", "add"), ("start", "sub"), ("start_mul",))
    start_range: tuple[int, int] = (3, 15)
    step_range: tuple[int, int] = (2, 8)
    factor_range: tuple[int, int] = (2, 5)

    def __post_init__(self) -> None:
        for name in ("start_range", "step_range", "factor_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
        if not self.kinds:
            raise ValueError("kinds is empty")
        for kind in self.kinds:
            if not kind or kind[0] not in ("start", "start_mul") or any(op not in ("add", "sub") for op in kind[1:]):
                raise ValueError(f"bad kind {kind!r}: ('start'|'start_mul', then 'add'/'sub' steps)")


DEFAULT_SPEC = ProblemSpec()
SPECS: dict[str, ProblemSpec] = {
    # the task's default: one operation (SmolLM2-135M-Instruct zero-shot: see docs/smollm2.md)
    "one_step": DEFAULT_SPEC,
    # harder: also two steps (add then sub, ...) and a product followed by a step; larger numbers
    "two_step": ProblemSpec(kinds=(("start", "add"), ("start", "sub"), ("start", "add", "sub"),
                                   ("start", "sub", "add"), ("start_mul",), ("start_mul", "add"),
                                   ("start_mul", "sub")),
                            start_range=(5, 30), step_range=(2, 15), factor_range=(2, 9)),
}


def _one_problem(rng: random.Random, split: str, spec: ProblemSpec) -> tuple[str, int, str]:
    """(problem text, answer, kind label) drawn from ``rng``."""
    kind = rng.choice(spec.kinds)
    (name, pron, him), (other, _, _) = rng.sample(_NAMES[split], 2)
    obj = rng.choice(_OBJECTS[split])
    box, box1 = rng.choice(_BOXES)
    fields = dict(name=name, other=other, Pron=pron.capitalize(), pron=pron, him=him, obj=obj, box=box, box1=box1)
    sentences = []
    if kind[0] == "start":
        x = rng.randint(*spec.start_range)
        sentences.append(rng.choice(_TEMPLATES["start"]).format(n=x, **fields))
    else:
        a, b = rng.randint(*spec.factor_range), rng.randint(*spec.factor_range)
        x = a * b
        sentences.append(rng.choice(_TEMPLATES["start_mul"]).format(n=a, m=b, **fields))
    for op in kind[1:]:
        lo, hi = spec.step_range
        if op == "sub":
            hi = min(hi, x - 1)  # keep at least one left
            if hi < lo:
                op, hi = "add", spec.step_range[1]
        k = rng.randint(lo, hi)
        x = x + k if op == "add" else x - k
        sentences.append(rng.choice(_TEMPLATES[op]).format(n=k, **fields))
    sentences.append(rng.choice(_QUESTIONS).format(**fields))
    return " ".join(sentences), x, "+".join(kind)


def make_problems(n: int, seed: int = 0, split: str = "train",
                  spec: ProblemSpec = DEFAULT_SPEC) -> list[dict[str, Any]]:
    """``n`` distinct word problems of ``split`` ("train" or "eval"), deterministic given ``seed`` and ``spec``.

    Returns rows ``{"prompt": messages(text), "answer": int, "text": problem text, "kind": "start+add"...}``
    (:func:`messages`: the :data:`SYSTEM` instruction, then the problem as the user turn). The two splits share no
    name and no object, hence no text.

    Raises:
        ValueError: unknown split, ``n < 0``, or fewer than ``n`` distinct problems found.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"word_problems/{split}/{seed}")
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    misses = 0  # draws in a row that gave an already-seen problem
    while len(rows) < n:
        text, answer, kind = _one_problem(rng, split, spec)
        if text in seen:
            misses += 1
            if misses > 5000:
                raise ValueError(f"only {len(rows)} distinct problems found for n={n}; widen the spec's ranges")
            continue
        misses = 0
        seen.add(text)
        rows.append({"prompt": messages(text), "answer": answer, "text": text, "kind": kind})
    return rows


def messages(text: str) -> list[dict[str, str]]:
    """The chat prompt of a problem: ``[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]``.

    The system turn asks for the bare number and shows one solved example (its name and object are in neither
    split); without it SmolLM2's template would insert its default system prompt.
    """
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def problem_text(row: dict[str, Any]) -> str:
    """The problem statement of a row from :func:`make_problems` (the user turn)."""
    return str(row["text"])


def plain_prompt(row: dict[str, Any]) -> str:
    """Plain-text fallback prompt (no chat template): ``SYSTEM + "\\n\\nQuestion: <problem>\\nAnswer:"``."""
    return f"{SYSTEM}\n\nQuestion: {problem_text(row)}\nAnswer:"


# ----------------------------------------------------------------------------------------------- checking


def solve(prompt: str) -> int | None:
    """The answer of the LAST word problem written in ``prompt`` (any rendering), or None if there is none.

    Every template sentence is located in the text; the last ``start``/``start_mul`` sentence and the step
    sentences after it give the answer. Text between them (chat markup, the instruction) is ignored.
    """
    hits: list[tuple[int, str, list[int]]] = []
    for op, pat in _PATTERNS:
        for m in pat.finditer(prompt):
            hits.append((m.start(), op, [int(g) for g in m.groups()]))
    hits.sort(key=lambda h: h[0])
    starts = [i for i, (_, op, _) in enumerate(hits) if op.startswith("start")]
    if not starts:
        return None
    x: int | None = None
    for _, op, nums in hits[starts[-1]:]:
        if op == "start":
            x = nums[0]
        elif op == "start_mul":
            x = nums[0] * nums[1]
        elif x is not None:
            x = x + nums[0] if op == "add" else x - nums[0]
    return x


_NUMBER = re.compile(r"(?<![\d.])([-\u2212]?)(\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.(\d+))?")


def extract_final_number(text: str) -> int | None:
    """The last number in ``text`` as an int, or None if there is none or the last one is not a whole number.

    Tolerates "12", "The answer is 12.", "= 12", "**12**", "$1,234" (thousands commas), "12.0" (-> 12) and a
    leading minus ("-3", "= -3"; in "7-3" the minus is subtraction). "12.5" as the last number gives None.
    Number words ("twelve") are not read.
    """
    last = None
    for m in _NUMBER.finditer(text):
        last = m
    if last is None:
        return None
    sign, digits, frac = last.group(1), last.group(2), last.group(3)
    if frac and frac.strip("0"):
        return None
    value = int(digits.replace(",", ""))
    if sign:
        before = text[last.start() - 1] if last.start() > 0 else " "
        if not (before.isalnum() or before == ")"):
            value = -value
    return value


def reward_fn(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Any] | None = None,
              **columns: Any) -> list[float]:
    """1.0 where the completion's last integer equals the problem's answer, else 0.0 (one float per sample).

    The answer is ``answers[i]`` if given (or an ``answer`` column passed by keyword), otherwise :func:`solve`
    parses it from ``prompts[i]`` (the prompt as rendered, with or without a chat template).

    Raises:
        ValueError: the lengths differ, or a prompt holds no word problem and no answer was given.
    """
    if answers is None and "answer" in columns:
        answers = columns["answer"]
    if len(prompts) != len(completions) or (answers is not None and len(answers) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions"
                         + (f", {len(answers)} answers" if answers is not None else ""))
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        target = int(answers[i]) if answers is not None else solve(p)
        if target is None:
            raise ValueError(f"prompt {i} holds no word problem of proxrl.lm.tasks.word_problems: {p[:80]!r}; use "
                             f"this reward with the prompts from write_prompt_files")
        out.append(1.0 if extract_final_number(c) == target else 0.0)
    return out


def accuracy(prompts: Sequence[str], completions: Sequence[str]) -> float:
    """Fraction of correct completions (nan for none)."""
    r = reward_fn(prompts, completions)
    return sum(r) / len(r) if r else float("nan")


# ----------------------------------------------------------------------------------------------- files


def write_prompt_files(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                       spec: ProblemSpec = DEFAULT_SPEC, chat_tokenizer: Any = None) -> dict[str, Path]:
    """Write the task's prompt files into ``out_dir`` (atomically) and return their paths by name.

    * ``train.jsonl`` / ``eval.jsonl``: conversational rows ``{"prompt": [messages], "answer": int}`` (the layout
      ``proxrl ppo --chat-template auto`` takes);
    * ``train_plain.jsonl`` / ``eval_plain.jsonl``: the same problems as plain-text rows
      ``{"prompt": SYSTEM + "...Question: ...\\nAnswer:", "answer": int}`` for a run without a chat template;
    * with ``chat_tokenizer`` (a tokenizer or a model directory holding one with a chat template):
      ``train_rendered.jsonl`` / ``eval_rendered.jsonl``, the conversational prompts rendered by that template
      with the generation prompt, as plain strings. These give a plain-text PPO run (no ``--chat-template``)
      exactly the tokens the chat template would: rendered text tokenizes to the same ids as
      ``apply_chat_template`` when the tokenizer adds no BOS of its own (true of SmolLM2's).

    Raises:
        ValueError: ``chat_tokenizer`` has no chat template.
    """
    tok = chat_tokenizer
    if isinstance(tok, (str, Path)):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok))
    if tok is not None and not getattr(tok, "chat_template", None):
        raise ValueError("chat_tokenizer has no chat template; leave it out (the plain files need none)")
    renders: list[tuple[str, Any]] = [("", lambda r: r["prompt"]), ("_plain", plain_prompt)]
    if tok is not None:
        renders.append(("_rendered", lambda r: tok.apply_chat_template(r["prompt"], tokenize=False,
                                                                      add_generation_prompt=True)))
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = make_problems(n, seed=seed, split=split, spec=spec)
        for suffix, render in renders:
            path = out / f"{split}{suffix}.jsonl"
            tmp = path.with_suffix(".jsonl.tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps({"prompt": render(r), "answer": r["answer"]}, ensure_ascii=False) + "\n")
            tmp.replace(path)
            paths[f"{split}{suffix}"] = path
    return paths


# ----------------------------------------------------------------------------------------------- zero-shot


def zero_shot(model_dir: str | Path, n: int = 100, *, seed: int = 0, temperature: float = 0.0,
              max_new_tokens: int = 24, batch_size: int = 25, chat: bool = True, threads: int = 1,
              spec: ProblemSpec = DEFAULT_SPEC, sample_seed: int = 1234,
              stop_newline: bool = False) -> dict[str, Any]:
    """Accuracy of the model in ``model_dir`` on the first ``n`` held-out problems, one completion each.

    ``chat``: render with the tokenizer's chat template (generation prompt added), else :func:`plain_prompt`.
    ``temperature`` 0 is greedy. Generation stops at EOS or the template's ``<|im_end|>``; ``stop_newline``
    also cuts each completion at its first newline after some text (as ``--stop-strings '\\n'`` does in PPO).
    Returns accuracy, per-kind accuracy, seconds per generation batch, and (problem, answer, completion) rows.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = make_problems(n, seed=seed, split="eval", spec=spec)
    if chat:
        texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    else:
        texts = [plain_prompt(r) for r in rows]
    stop = [tok.eos_token_id] + [t for t in (tok.convert_tokens_to_ids("<|im_end|>"),)
                                 if isinstance(t, int) and t != tok.unk_token_id]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(sample_seed)
    completions: list[str] = []
    batch_s: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=not chat)
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                                 eos_token_id=stop, pad_token_id=pad)
        batch_s.append(time.perf_counter() - t0)
        completions += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    if stop_newline:
        completions = [c[: len(c) - len(c.lstrip())] + c.lstrip().split("\n", 1)[0] for c in completions]
    rewards = reward_fn(texts, completions)
    by_kind: dict[str, list[float]] = {}
    for r, x in zip(rows, rewards):
        by_kind.setdefault(r["kind"], []).append(x)
    return {
        "n": len(rows), "accuracy": sum(rewards) / len(rewards) if rewards else float("nan"),
        "accuracy_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
        "count_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
        "temperature": temperature, "max_new_tokens": max_new_tokens, "chat": chat, "stop_newline": stop_newline,
        "batch_size": batch_size,
        "seconds_per_batch": batch_s, "threads": torch.get_num_threads(),
        "samples": [{"text": r["text"], "answer": r["answer"], "completion": c}
                    for r, c in zip(rows, completions)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``write OUT_DIR [...]`` | ``zero-shot MODEL_DIR [...]`` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m proxrl.lm.tasks.word_problems", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write train/eval prompt JSONL files (chat and plain)")
    w.add_argument("out_dir")
    w.add_argument("--n-train", type=int, default=2000)
    w.add_argument("--n-eval", type=int, default=200)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--spec", choices=sorted(SPECS), default="one_step", help="problem difficulty")
    w.add_argument("--render-with", default=None, metavar="MODEL_DIR",
                   help="also write *_rendered.jsonl: prompts rendered by this tokenizer's chat template")
    z = sub.add_parser("zero-shot", help="held-out accuracy of a model directory")
    z.add_argument("model_dir")
    z.add_argument("--n", type=int, default=100)
    z.add_argument("--temperature", type=float, default=0.0)
    z.add_argument("--max-new-tokens", type=int, default=24)
    z.add_argument("--batch-size", type=int, default=25)
    z.add_argument("--spec", choices=sorted(SPECS), default="one_step", help="problem difficulty")
    z.add_argument("--plain", action="store_true", help="plain-text prompts instead of the chat template")
    z.add_argument("--stop-newline", action="store_true", help="cut completions at their first newline")
    z.add_argument("--threads", type=int, default=1)
    z.add_argument("--samples", type=int, default=8, help="print this many samples")
    z.add_argument("--json", default=None, help="also write the full result here")
    a = p.parse_args(argv)
    if a.cmd == "write":
        for name, path in write_prompt_files(a.out_dir, a.n_train, a.n_eval, a.seed, SPECS[a.spec],
                                             chat_tokenizer=a.render_with).items():
            print(f"{name}: {path}")
        return 0
    res = zero_shot(a.model_dir, a.n, temperature=a.temperature, max_new_tokens=a.max_new_tokens,
                    batch_size=a.batch_size, chat=not a.plain, threads=a.threads, spec=SPECS[a.spec],
                    stop_newline=a.stop_newline)
    for s in res["samples"][: a.samples]:
        print(f"[{s['answer']}] {s['text']}\n    -> {s['completion']!r}")
    bs = res["seconds_per_batch"]
    print(f"accuracy {res['accuracy']:.3f} on {res['n']} held-out problems (T={a.temperature}, "
          f"max_new_tokens={a.max_new_tokens}, {'plain' if a.plain else 'chat'}); by kind {res['accuracy_by_kind']}; "
          f"{sum(bs) / len(bs):.1f} s per batch of {a.batch_size} (threads={res['threads']})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
