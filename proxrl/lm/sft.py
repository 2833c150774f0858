"""Supervised fine-tuning (SFT) of a causal LM: plain text, prompt/completion pairs or conversations.

Data (``SFTConfig.data``, read by :func:`proxrl.lm.data.load_table`: a .txt/.txt.gz file, JSONL, JSON, CSV,
Parquet, a ``save_to_disk`` directory or a hub name), one example per row, by the columns it has:

* ``messages`` (``--messages-column``): a conversation ``[{"role", "content"}, ...]``, rendered with the chat
  template; loss on the assistant turns only (their content and end-of-turn marker; :func:`proxrl.lm.chat.sft_example`).
* ``prompt`` and ``completion`` (``--prompt-column``, ``--completion-column``): loss on the completion tokens (and
  the appended EOS) only; prompt and padding positions get label -100. Prompt and completion are tokenized
  separately and concatenated, exactly as PPO later sees them (a tokenized prompt followed by generated tokens).
  With a chat template, a string prompt is one user message rendered with the generation prompt and the
  completion ends with the template's end-of-turn marker (either may also be a list of messages).
* ``text`` (``--text-column``; every line of a .txt file): loss on every token. ``text_mode="line"``: each row +
  EOS is one example, cut at ``max_length`` tokens; ``"chunk"``: rows joined with EOS and cut into blocks of
  ``max_length`` tokens.

Batches are RIGHT-padded with explicit ``attention_mask`` and ``labels``; position ids come from the mask. The
model is either a local HF directory or ``"tiny-gpt2"``: a randomly initialised GPT-2 sized by
``n_layer``/``n_embd``/``n_head`` with the tokenizer from ``tokenizer`` (or a byte-level BPE trained on the data),
so "SFT" from scratch is plain language-model pretraining. Training runs in the loop of
:mod:`proxrl.lm.supervised`.

The output directory is a run directory (``config.yaml``, ``metrics.jsonl``, ``plots/``, ``checkpoints/``) that is
also a HF model directory: ``AutoModelForCausalLM.from_pretrained(run_dir)`` and
``AutoTokenizer.from_pretrained(run_dir)`` load the final model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from proxrl import distributed as D
from proxrl.errors import UserError
from proxrl.lm.builders import build_tiny_gpt2
from proxrl.lm.chat import (
    encode,
    is_conversational,
    preference_texts,
    require_template,
    resolve_chat_template,
    sft_example,
)
from proxrl.lm.data import check_value, load_table
from proxrl.lm.heads import model_device
from proxrl.lm.layers import disable_dropout
from proxrl.lm.loading import load_causal_lm
from proxrl.lm.positions import position_ids_from_mask
from proxrl.lm.supervised import Prepared, StepResult, split_indices, train_supervised, write_result
from proxrl.lm.supervised_config import TINY_MODEL, SFTConfig
from proxrl.lm.tokenization import check_tokenizer_fits, load_tokenizer, train_bpe_tokenizer

__all__ = ["SFTConfig", "Example", "load_records", "tokenize_records", "build_batch", "lm_loss", "evaluate_loss",
           "train_sft"]

BPE_DIR = "tokenizer"  # a BPE trained at the start of a run is kept here so a resumed run uses the very same one


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    """One tokenized training example.

    ``ids``: the token ids; the loss is on ``ids[n_prompt:]``, or where ``loss_mask`` is 1 when it is given
    (a conversation: assistant turns only). A loss position t is predicted from position t - 1.
    """

    ids: tuple[int, ...]
    n_prompt: int = 0
    loss_mask: tuple[int, ...] | None = None


def load_records(spec: str | Path, prompt_column: str = "prompt", completion_column: str = "completion",
                 text_column: str = "text", messages_column: str = "messages") -> list[dict[str, Any]]:
    """Training records of a data source, one per row: ``{"messages": [...]}``, ``{"prompt", "completion"}`` or
    ``{"text"}`` (whichever of those columns the row has a value in, in that order), plus its ``"row"`` number.

    Raises:
        UserError: none of the columns is there (naming the columns present), a row with none of them or with a
        value of the wrong type (naming the file and row), or what :func:`proxrl.lm.data.load_table` raises.
    """
    table = load_table(spec, "data")
    if not {messages_column, prompt_column, completion_column, text_column} & set(table.columns):
        have = ", ".join(repr(c) for c in table.columns)
        raise UserError(f"{table.source} has none of the columns {messages_column!r}, {prompt_column!r} + "
                        f"{completion_column!r} or {text_column!r} (columns: {have}); pass --messages-column, "
                        f"--prompt-column/--completion-column or --text-column")
    out: list[dict[str, Any]] = []
    for i, row in enumerate(table.rows, start=1):
        where = f"{table.source} row {i}"
        if row.get(messages_column) is not None:
            check_value(row[messages_column], "messages", where, messages_column)
            out.append({"row": i, "messages": row[messages_column]})
        elif row.get(prompt_column) is not None or row.get(completion_column) is not None:
            for col in (prompt_column, completion_column):
                check_value(row.get(col), "text_or_messages", where, col)
            out.append({"row": i, "prompt": row[prompt_column], "completion": row[completion_column]})
        elif row.get(text_column) is not None:
            check_value(row[text_column], "text", where, text_column)
            out.append({"row": i, "text": row[text_column]})
        else:
            raise UserError(f"{where}: no value in {messages_column!r}, {prompt_column!r}/{completion_column!r} or "
                            f"{text_column!r}; fill it in or remove the row")
    return out


def _record_text(r: dict[str, Any]) -> str:
    """Plain text of a record (to train a BPE tokenizer on)."""
    if "messages" in r:
        return "".join(m["content"] for m in r["messages"])
    if "text" in r:
        return r["text"]
    parts = [r["prompt"], r["completion"]]
    return "".join(p if isinstance(p, str) else "".join(m["content"] for m in p) for p in parts)


def _encode_record(r: dict[str, Any], tokenizer: Any, template: str | None, max_length: int, tail: list[int],
                   where: str) -> tuple[list[int], int, list[int] | None]:
    """``(ids, n_prompt, loss_mask or None)`` of one record; text records are not cut (chunk mode joins them)."""
    if "text" in r:
        return encode(tokenizer, r["text"]) + tail, 0, None
    if "messages" in r:
        ids, mask = sft_example(tokenizer, template, r["messages"], max_length, where)
        return ids, 0, mask
    prompt, completion = r["prompt"], r["completion"]
    if template is not None or not (isinstance(prompt, str) and isinstance(completion, str)):
        prompt, completion, _ = preference_texts(tokenizer, template, prompt, completion, completion, where)
    p = encode(tokenizer, prompt)
    return (p + encode(tokenizer, completion) + (tail if template is None else []))[:max_length], len(p), None


def tokenize_records(records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, add_eos: bool = True,
                     text_mode: str = "line", template: str | None = None, source: str = "data") -> list[Example]:
    """Tokenize records (see :func:`load_records`) into :class:`Example` s.

    Prompt and completion are tokenized separately, then joined (plus EOS without a chat template when
    ``add_eos``); conversations through :func:`proxrl.lm.chat.sft_example`. ``text_mode="chunk"`` joins all
    ``text`` records (each followed by EOS) into one stream cut into blocks of ``max_length``. Examples left
    without a loss token by truncation are dropped.
    """
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise UserError("the tokenizer has no EOS token; pass --add-eos false or use a tokenizer with an EOS token")
    tail = [eos] if add_eos else []
    out: list[Example] = []
    stream: list[int] = []
    for k, r in enumerate(records, start=1):
        where = f"{source} row {r.get('row', k)}"
        ids, n_prompt, mask = _encode_record(r, tokenizer, template, max_length, tail, where)
        if "text" in r and text_mode == "chunk":
            stream.extend(ids)
        elif mask is not None:
            if any(mask[1:]):
                out.append(Example(tuple(ids), 0, tuple(mask)))
        elif "text" in r:
            if len(ids) >= 2:
                out.append(Example(tuple(ids[:max_length]), 0))
        elif len(ids) > n_prompt:
            out.append(Example(tuple(ids), n_prompt))
    for i in range(0, len(stream) - 1, max_length):
        block = stream[i:i + max_length]
        if len(block) >= 2:
            out.append(Example(tuple(block), 0))
    return out


def build_batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """RIGHT-padded training batch from examples.

    Returns:
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (1 on real tokens), ``labels`` (B, T) long equal
        to ``input_ids`` on loss positions and -100 on prompt tokens, masked-out tokens and padding,
        ``loss_mask`` (B, T) float (labels != -100). Labels are NOT shifted; the loss predicts ``labels[:, t+1]``
        from position t.
    """
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        t = torch.tensor(e.ids, dtype=torch.long)
        ids[i, :n] = t
        mask[i, :n] = 1
        if e.loss_mask is None:
            labels[i, e.n_prompt:n] = t[e.n_prompt:]
        else:
            labels[i, :n] = torch.where(torch.tensor(e.loss_mask, dtype=torch.bool), t, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss_mask": (labels != -100).float()}


def lm_loss(model: Any, batch: dict[str, torch.Tensor], reduction: str = "mean") -> Any:
    """Next-token cross-entropy of ``model`` on a :func:`build_batch` batch (positions from the mask).

    ``reduction="mean"``: mean over target tokens (0-d); ``"sum"``: (sum of token losses, number of tokens).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    n = (targets != -100).sum()
    if reduction == "sum":
        return loss, n
    return loss / torch.clamp(n, min=1)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a :func:`build_batch` batch on ``device`` (the same dict when already there)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate_loss(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 64) -> float:
    """Mean next-token loss (nats per target token) of ``model`` over ``examples``; nan if there are none. Batches
    go to the model's device; the sum is read once at the end."""
    if not examples:
        return math.nan
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = build_batch(examples[i:i + batch_size], pad_id)
            loss, _ = lm_loss(model, to_device(batch, device), reduction="sum")
            total += loss.to(torch.float64)
            count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return float(total) / max(count, 1)


# ----------------------------------------------------------------------------------------------- training


def _load_model_and_tokenizer(cfg: SFTConfig, train_texts: list[str], saved_tokenizer: Path | None = None
                              ) -> tuple[Any, Any]:
    if cfg.model == TINY_MODEL:
        if cfg.tokenizer:
            tok = load_tokenizer(cfg.tokenizer)
        elif saved_tokenizer is not None:
            tok = load_tokenizer(saved_tokenizer)  # resuming: the BPE the run trained at its start
        else:
            tok = train_bpe_tokenizer(train_texts, cfg.vocab_size)
        model = build_tiny_gpt2(tok, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                n_positions=cfg.n_positions, seed=cfg.seed)
        return model, tok
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    model = load_causal_lm(cfg.model)
    check_tokenizer_fits(model, tok, cfg.model if not cfg.tokenizer else None)
    disable_dropout(model)
    return model, tok


def _prepare(cfg: SFTConfig, resume: bool) -> tuple[Prepared, list[Example]]:
    """Read and split the data, build the model and tokenizer, tokenize: the SFT stage ready to train, and the
    held-out examples."""
    records = load_records(cfg.data, cfg.prompt_column, cfg.completion_column, cfg.text_column, cfg.messages_column)
    source = Path(cfg.data).name
    held_idx, train_idx = split_indices(len(records), cfg.eval_fraction, cfg.seed, cfg.max_eval_examples,
                                        source=source, unit="records")
    eval_recs = [records[i] for i in held_idx]
    train_recs = [records[i] for i in train_idx]
    bpe_dir = Path(cfg.run_dir) / BPE_DIR
    model, tok = _load_model_and_tokenizer(cfg, [_record_text(r) for r in train_recs],
                                           bpe_dir if resume and bpe_dir.is_dir() else None)
    conversational = any(is_conversational(r.get(k)) for r in records for k in ("messages", "prompt", "completion"))
    template = require_template(resolve_chat_template(tok, cfg.chat_template), cfg.chat_template, conversational)
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and cfg.max_length > ctx:
        raise UserError(f"max_length={cfg.max_length} exceeds the model's context of {ctx} tokens; lower --max-length")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = tokenize_records(train_recs, tok, cfg.max_length, cfg.add_eos, cfg.text_mode, template, source)
    held = tokenize_records(eval_recs, tok, cfg.max_length, cfg.add_eos, cfg.text_mode, template, source)
    if not train:
        raise UserError(f"{cfg.data}: no usable training examples (all empty or truncated away); check the data")

    def step(module: Any, idx: list[int]) -> StepResult:
        batch = build_batch([train[i] for i in idx], pad_id)
        targets = int((batch["labels"][:, 1:] != -100).sum())  # what the mean loss averages over
        return StepResult(lm_loss(module, to_device(batch, model_device(module))),
                          totals={"tokens": int(batch["loss_mask"].sum())}, weight=targets)

    def save_bpe(run_path: Path) -> None:
        tok.save_pretrained(str(run_path / BPE_DIR))

    trained_bpe = cfg.model == TINY_MODEL and not cfg.tokenizer and cfg.checkpoint_every
    return Prepared(model, tok, len(train), step, lambda m: {"eval_loss": evaluate_loss(m, held, pad_id)},
                    outputs=(BPE_DIR,) if trained_bpe else (), on_create=save_bpe if trained_bpe else None), held


def train_sft(cfg: SFTConfig, progress: bool | None = None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune a causal LM on ``cfg.data``; save it (and its tokenizer) to ``cfg.run_dir``.

    ``resume=True`` continues ``cfg.run_dir`` from its latest checkpoint (``checkpoint_every`` > 0); the final
    model and metrics equal those of an uninterrupted run with the same config (see
    :func:`proxrl.lm.supervised.load_run_config`).

    Returns:
        dict with ``train_loss`` (mean of the last logged window), ``eval_loss`` (held-out, nats/token; nan with
        no held-out data), ``eval_loss_initial``, ``steps``, ``tokens``, ``train_examples``, ``eval_examples``,
        ``seconds``, ``run_dir``.
    """
    t_start = time.perf_counter()
    sizes: dict[str, int] = {}

    def prepare() -> Prepared:
        stage, held = _prepare(cfg, resume)
        sizes.update(train=stage.n_train, held=len(held))
        return stage

    out = train_supervised(cfg, prepare, resume=resume, name="sft", progress=progress,
                           plot=(["train_loss", "eval_loss", "lr", "grad_norm"], "sft.png", "SFT"))
    eval0, eval_loss = out.eval_initial["eval_loss"], out.eval["eval_loss"]
    result = {"train_loss": out.train_loss, "eval_loss": eval_loss, "eval_loss_initial": eval0, "steps": out.steps,
              "tokens": out.totals.get("tokens", 0), "train_examples": sizes["train"], "eval_examples": sizes["held"],
              "seconds": time.perf_counter() - t_start, "run_dir": str(out.run_dir)}
    if not D.is_main():  # under torchrun rank 0 writes and reports
        return result
    write_result(out.run_dir, "sft", result)
    print(f"sft: {out.steps} steps, held-out loss {eval0:.3f} -> {eval_loss:.3f} nats/token "
          f"({sizes['held']} examples), {result['seconds']:.0f}s; model saved to {out.run_dir}")
    return result
