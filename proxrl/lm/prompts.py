"""PPO's prompts: from a Python list, a data source, a built-in task or the copy a run keeps, to token ids.

A prompt is a string or, for a chat model, a list of messages ``[{"role": "user", "content": "..."}]`` (the
``{"prompt": [...messages]}`` layout TRL documents). With a chat template (``--chat-template``, resolved by
:func:`proxrl.lm.chat.resolve_chat_template`) every prompt is rendered with the generation prompt and tokenized
without added special tokens (the template writes its own BOS: no double BOS); without one a string prompt is
tokenized as before (``tokenizer(prompt)``, special tokens included) and a list of messages is its contents joined.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from proxrl.errors import UserError
from proxrl.lm import tasks
from proxrl.lm.chat import Prompt, check_messages, prompt_token_ids, render_prompt
from proxrl.lm.data import load_rows
from proxrl.runs import atomic_write

__all__ = ["PROMPTS_FILE", "load_prompts", "keep_prompts", "tokenize_prompts", "prompt_texts",
           "template_markers"]

PROMPTS_FILE = "prompts.jsonl"  # prompts given as a Python list are kept here so a CLI resume finds them
DATA_FORMATS = "JSONL, JSON, CSV, Parquet, a save_to_disk directory or a hub name org/name[:split]"


def load_prompts(source: str, prompts: Sequence[Prompt] | None = None, run_dir: str | Path | None = None,
                 column: str = "prompt", *, split: str = "train", what: str = "prompts") -> list[Prompt]:
    """The prompts (strings or lists of messages) of a run.

    ``prompts`` if given; else ``source`` (e.g. ``cfg.prompts``): a built-in task name (its ``split``), or a data
    source read by :func:`proxrl.lm.data.load_rows` (JSONL, JSON, CSV, Parquet, a ``save_to_disk`` directory or a hub
    name) whose ``column`` holds a string or a list of messages per row; else the copy a previous run kept in
    ``run_dir/prompts.jsonl``.

    Raises:
        UserError: no source, a missing file or column (the columns present are named), a row of the wrong kind,
        an empty source.
    """
    if prompts is not None:
        if isinstance(prompts, str):
            raise UserError("prompts is one string; give a list of prompts")
        out: list[Prompt] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                out.append(p)
            elif isinstance(p, (list, tuple)):
                out.append(check_messages(p, f"prompts[{i}]"))
            else:
                raise UserError(f"prompts[{i}] is a {type(p).__name__}, not a string or a list of messages")
        if not out:
            raise UserError("prompts is an empty list; give at least one prompt")
        return out
    src, col = source, column
    if not src and run_dir is not None and (Path(run_dir) / PROMPTS_FILE).is_file():
        src, col = str(Path(run_dir) / PROMPTS_FILE), "prompt"
    if not src:
        raise UserError(f"no {what}: give a data file ({DATA_FORMATS}) with a '{column}' column, or a built-in task "
                        f"({', '.join(tasks.TASKS)})")
    path = Path(src).expanduser()
    if src in tasks.TASKS and not path.exists():
        return list(tasks.task_prompts(src, split=split, n=100_000))
    if not path.exists() and not path.suffix and "/" not in src and ":" not in src:
        raise UserError(f"{what} {src!r} is neither an existing file nor a built-in task ({', '.join(tasks.TASKS)}); "
                        f"give a data file with a '{column}' column, a save_to_disk directory or a hub name org/name")
    rows = load_rows(src, columns={"prompt": col}, kinds={"prompt": "text_or_messages"}, what=what)
    return [r["prompt"] for r in rows]


def keep_prompts(run_dir: str | Path, prompts: Sequence[Prompt]) -> Path:
    """Write ``run_dir/prompts.jsonl`` (atomically), where :func:`load_prompts` finds them on a resume."""
    return atomic_write(Path(run_dir) / PROMPTS_FILE,
                        "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))


def template_markers(tokenizer: Any, template: str | None) -> list[str]:
    """The special tokens a chat template writes around a user turn and the generation prompt (e.g.
    ``<|im_start|>``); a string prompt holding one was rendered already. [] without a template."""
    if template is None:
        return []
    rendered = render_prompt(tokenizer, template, "x")
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials = {str(getattr(t, "content", t)) for t in decoder.values() if getattr(t, "special", True)}
    specials |= {str(s) for s in getattr(tokenizer, "all_special_tokens", ()) or ()}
    plain = {str(getattr(tokenizer, f"{k}_token", None)) for k in ("bos", "eos", "pad", "unk")}
    return sorted(s for s in specials - plain if s and s in rendered)


def tokenize_prompts(tokenizer: Any, prompts: Sequence[Prompt], max_len: int,
                     template: str | None = None) -> list[list[int]]:
    """Token ids of each prompt, keeping its last ``max_len`` tokens; an empty prompt starts from BOS (else EOS).

    With ``template`` each prompt is rendered with the generation prompt (a string as one user message) and
    encoded without added special tokens (:func:`proxrl.lm.chat.prompt_token_ids`); without one a string is
    ``tokenizer(prompt)`` and a list of messages its contents joined.

    Raises:
        UserError: malformed messages, a template that fails to render, a string prompt that already holds the
        template's special tokens (rendered in advance: pass ``--chat-template none``).
    """
    out = []
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    markers = template_markers(tokenizer, template)
    for i, p in enumerate(prompts):
        where = f"prompt {i + 1}"
        if template is not None:
            if isinstance(p, str):
                seen = next((m for m in markers if m in p), None)
                if seen is not None:
                    raise UserError(f"{where} already holds the chat template's {seen!r} (rendered in advance?); pass "
                                    f"--chat-template none for rendered prompts, or give the raw prompt text")
            ids = prompt_token_ids(tokenizer, template, p, where)
        else:
            text = p if isinstance(p, str) else render_prompt(tokenizer, None, p, where)
            ids = list(tokenizer(text)["input_ids"]) if text else []
        ids = ids[-max_len:]
        if not ids:
            if fallback is None:
                raise UserError(f"{where} ({p!r}) encodes to no tokens and the tokenizer has no BOS/EOS to start "
                                f"from")
            ids = [int(fallback)]
        out.append(ids)
    return out


def prompt_texts(tokenizer: Any, template: str | None, prompts: Sequence[Prompt]) -> list[str]:
    """The text of each prompt as a reward function and a sample table see it: a string as it is, a list of
    messages rendered with the generation prompt (``template`` None: the contents joined)."""
    return [p if isinstance(p, str) else render_prompt(tokenizer, template, p, f"prompt {i + 1}")
            for i, p in enumerate(prompts)]
