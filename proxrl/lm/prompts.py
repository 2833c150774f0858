"""PPO's prompts: from a Python list, a JSONL file, a built-in task or the copy a run keeps, to token ids."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from proxrl.errors import UserError
from proxrl.lm import tasks
from proxrl.lm.data import read_jsonl
from proxrl.runs import atomic_write

__all__ = ["PROMPTS_FILE", "load_prompts", "keep_prompts", "tokenize_prompts"]

PROMPTS_FILE = "prompts.jsonl"  # prompts given as a Python list are kept here so a CLI resume finds them


def load_prompts(source: str, prompts: Sequence[str] | None = None, run_dir: str | Path | None = None) -> list[str]:
    """The prompt strings: ``prompts`` if given, else ``source`` (a JSONL path with a ``prompt`` key per line or a
    built-in task name, e.g. ``cfg.prompts``), else the copy a previous run kept in ``run_dir/prompts.jsonl``."""
    if prompts is not None:
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise UserError(f"prompts[{bad[0]}] is a {type(prompts[bad[0]]).__name__}, not a string")
        if not prompts:
            raise UserError("prompts is an empty list; give at least one prompt")
        return list(prompts)
    src = source
    if not src and run_dir is not None and (Path(run_dir) / PROMPTS_FILE).is_file():
        src = str(Path(run_dir) / PROMPTS_FILE)
    if not src:
        raise UserError("no prompts: give --prompts FILE.jsonl (one {\"prompt\": ...} per line) or a task name")
    path = Path(src).expanduser()
    if path.suffix in (".jsonl", ".json") or path.exists():
        out = [str(r["prompt"]) for r in read_jsonl(path, ["prompt"])]
    elif src in tasks.TASKS:
        out = tasks.task_prompts(src, split="train", n=100_000)
    else:
        raise UserError(f"prompts {src!r} is neither an existing file nor a built-in task "
                        f"({', '.join(tasks.TASKS)}); give a JSONL file with a 'prompt' key per line")
    if not out:
        raise UserError(f"prompts {src!r} holds no prompts; add lines like {{\"prompt\": \"Hello\"}}")
    return out


def keep_prompts(run_dir: str | Path, prompts: Sequence[str]) -> Path:
    """Write ``run_dir/prompts.jsonl`` (atomically), where :func:`load_prompts` finds them on a resume."""
    return atomic_write(Path(run_dir) / PROMPTS_FILE, "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each prompt, keeping its last ``max_len`` tokens; an empty prompt starts from BOS (else EOS)."""
    out = []
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for p in prompts:
        ids = list(tokenizer(p)["input_ids"])[-max_len:]
        if not ids:
            if fallback is None:
                raise UserError(f"prompt {p!r} encodes to no tokens and the tokenizer has no BOS/EOS to start from")
            ids = [int(fallback)]
        out.append(ids)
    return out
