"""Supervised fine-tuning (SFT) of a causal LM: plain text or prompt/completion pairs, next-token loss.

Data (``SFTConfig.data``):

* ``.txt`` / ``.txt.gz``: one document per line (``text_mode="line"``: each line + EOS is one example, cut at
  ``max_length`` tokens) or one token stream (``text_mode="chunk"``: lines joined with EOS and cut into blocks of
  ``max_length`` tokens). Loss on every token.
* ``.jsonl``: ``{"prompt": ..., "completion": ...}`` per line (loss on the completion tokens and the appended EOS
  only; prompt and padding positions get label -100), or ``{"text": ...}`` (loss on every token).

Prompt and completion are tokenized separately and concatenated, exactly as PPO later sees them (a tokenized
prompt followed by generated tokens). Batches are RIGHT-padded with explicit ``attention_mask`` and ``labels``;
position ids come from the mask. The model is either a local HF directory or ``"tiny-gpt2"``: a randomly
initialised GPT-2 sized by ``n_layer``/``n_embd``/``n_head`` with the tokenizer from ``tokenizer`` (or a byte-level
BPE trained on the data) — so "SFT" from scratch is plain language-model pretraining.

The output directory is a run directory (``config.yaml``, ``metrics.jsonl``, ``plots/``, ``checkpoints/``) that is
also a HF model directory: ``AutoModelForCausalLM.from_pretrained(run_dir)`` and
``AutoTokenizer.from_pretrained(run_dir)`` load the final model.
"""
from __future__ import annotations

import gzip
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from proxrl.config import check, opt, to_dict
from proxrl.errors import UserError

TINY_MODEL = "tiny-gpt2"


@dataclass
class SFTConfig:
    """Options of :func:`train_sft` (one ``proxrl sft --flag`` each)."""

    data: str = opt("", "training data: .txt/.txt.gz (one document per line) or .jsonl ({prompt, completion} or {text})")
    model: str = opt(TINY_MODEL, "local HF causal-LM directory to fine-tune, or 'tiny-gpt2' for a fresh tiny GPT-2 (see --n-layer etc.)")
    tokenizer: str | None = opt(None, "tokenizer directory; default: the model directory, or for tiny-gpt2 a byte-level BPE trained on --data")
    run_dir: str = opt("runs/sft", "run directory; the final model and tokenizer are saved at its top level (from_pretrained-loadable)")
    overwrite: bool = opt(False, "allow writing into an existing run directory")
    # tiny model (model == 'tiny-gpt2')
    vocab_size: int = opt(2048, "BPE vocabulary size when a tokenizer is trained (tiny-gpt2 without --tokenizer)")
    n_layer: int = opt(4, "tiny-gpt2: transformer blocks")
    n_embd: int = opt(128, "tiny-gpt2: hidden size")
    n_head: int = opt(4, "tiny-gpt2: attention heads (must divide n_embd)")
    n_positions: int = opt(128, "tiny-gpt2: context length (must be >= max_length and leave room for generation)")
    # data handling
    text_mode: Literal["line", "chunk"] = opt("line", "plain text: 'line' = one example per line; 'chunk' = one stream cut into max_length blocks")
    max_length: int = opt(128, "tokens per example (longer examples are truncated)")
    prompt_key: str = opt("prompt", "JSONL key of the prompt")
    completion_key: str = opt("completion", "JSONL key of the completion (loss only on these tokens + EOS)")
    add_eos: bool = opt(True, "append the EOS token to every document / completion (teaches the model to stop)")
    eval_fraction: float = opt(0.05, "fraction of examples held out for the eval loss")
    max_eval_examples: int = opt(512, "cap on held-out examples")
    # optimisation
    epochs: float = opt(1.0, "passes over the training examples (fractional allowed); ignored if --max-steps > 0")
    max_steps: int = opt(0, "optimizer steps; 0 = derived from --epochs")
    batch_size: int = opt(32, "examples per optimizer step")
    learning_rate: float = opt(1e-3, "peak AdamW learning rate (1e-3 suits tiny models from scratch; ~2e-5 for pretrained ones)")
    lr_schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "decay after warmup")
    warmup_steps: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases/LayerNorm)")
    max_grad_norm: float | None = opt(1.0, "gradient-norm clip; None = off")
    # bookkeeping
    eval_every: int = opt(100, "evaluate held-out loss every N steps (and at the end)")
    log_every: int = opt(10, "log train loss every N steps")
    checkpoint_every: int = opt(0, "save a resumable checkpoint (weights, optimizer, data order) to checkpoints/ every N steps; 0 = only the final model")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints (0 = all)")
    seed: int = opt(0, "random seed (init, data split, order)")
    threads: int = opt(0, "torch CPU threads; 0 = leave torch's setting")
    progress: bool = opt(True, "show a progress bar (on a terminal)")

    def __post_init__(self) -> None:
        check(bool(self.data), "data is empty; give --data FILE (.txt, .txt.gz or .jsonl)")
        check(bool(self.model), "model is empty; give a model directory or 'tiny-gpt2'")
        check(bool(self.run_dir), "run_dir is empty; give --run-dir")
        check(self.vocab_size >= 260, f"vocab_size={self.vocab_size} must be >= 260 (byte-level BPE)")
        check(self.n_layer >= 1 and self.n_embd >= 1 and self.n_head >= 1,
              f"n_layer={self.n_layer}, n_embd={self.n_embd}, n_head={self.n_head} must all be >= 1")
        check(self.n_embd % self.n_head == 0, f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        check(self.max_length >= 2, f"max_length={self.max_length} must be >= 2")
        check(self.model != TINY_MODEL or self.n_positions >= self.max_length,
              f"n_positions={self.n_positions} must be >= max_length={self.max_length}")
        check(0.0 <= self.eval_fraction < 1.0, f"eval_fraction={self.eval_fraction} must be in [0, 1)")
        check(self.max_eval_examples >= 1, f"max_eval_examples={self.max_eval_examples} must be >= 1")
        check(self.epochs > 0 and math.isfinite(self.epochs), f"epochs={self.epochs} must be > 0")
        check(self.max_steps >= 0, f"max_steps={self.max_steps} must be >= 0")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.learning_rate > 0 and math.isfinite(self.learning_rate), f"learning_rate={self.learning_rate} must be > 0")
        check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm={self.max_grad_norm} must be > 0 (or None)")
        check(self.eval_every >= 1, f"eval_every={self.eval_every} must be >= 1")
        check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        check(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0")
        check(self.keep_checkpoints >= 0, f"keep_checkpoints={self.keep_checkpoints} must be >= 0")
        check(self.threads >= 0, f"threads={self.threads} must be >= 0")
        check(bool(self.prompt_key) and bool(self.completion_key), "prompt_key and completion_key must be non-empty")


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    """One tokenized training example: ``ids`` and how many leading tokens are prompt (no loss)."""

    ids: tuple[int, ...]
    n_prompt: int = 0


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a .txt or .txt.gz file (UTF-8). UserError if missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file {str(path)!r} does not exist; give a .txt, .txt.gz or .jsonl file")
    try:
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {str(path)!r} as UTF-8 text ({type(e).__name__}); give a UTF-8 .txt or .txt.gz file") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def load_records(path: str | Path, prompt_key: str = "prompt", completion_key: str = "completion") -> list[dict[str, str]]:
    """Training records from a file: ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}`` dicts.

    JSONL lines must hold either ``prompt_key`` and ``completion_key`` or ``text`` (string values); a bad line is a
    UserError naming its line number.
    """
    p = Path(path)
    if p.suffix != ".jsonl":
        return [{"text": t} for t in read_text_lines(p)]
    from proxrl.lm.data import read_jsonl

    rows = read_jsonl(p, ())
    out: list[dict[str, str]] = []
    for i, row in enumerate(rows, start=1):
        if prompt_key in row or completion_key in row:
            missing = [k for k in (prompt_key, completion_key) if k not in row]
            if missing or not all(isinstance(row[k], str) for k in (prompt_key, completion_key)):
                raise UserError(f"{p} record {i}: needs string values for both {prompt_key!r} and {completion_key!r}"
                                f" (or a single 'text'); fix the record")
            out.append({"prompt": row[prompt_key], "completion": row[completion_key]})
        elif isinstance(row.get("text"), str):
            out.append({"text": row["text"]})
        else:
            raise UserError(f"{p} record {i}: expected keys {prompt_key!r} and {completion_key!r}, or 'text'; "
                            f"got {sorted(row)[:5]}")
    if not out:
        raise UserError(f"{p} holds no records; give a non-empty data file")
    return out


def tokenize_records(records: Sequence[dict[str, str]], tokenizer: Any, max_length: int, add_eos: bool = True,
                     text_mode: str = "line") -> list[Example]:
    """Tokenize records into :class:`Example` s (prompt and completion tokenized separately, then joined).

    ``text_mode="chunk"`` joins all ``text`` records (each followed by EOS) into one stream cut into blocks of
    ``max_length``. Examples whose completion is truncated away entirely are dropped.
    """
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise UserError("the tokenizer has no EOS token; pass add_eos=False or use a tokenizer with an EOS token")
    tail = [eos] if add_eos else []

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    out: list[Example] = []
    stream: list[int] = []
    for r in records:
        if "text" in r:
            ids = enc(r["text"]) + tail
            if text_mode == "chunk":
                stream.extend(ids)
                continue
            if len(ids) >= 2:
                out.append(Example(tuple(ids[:max_length]), 0))
        else:
            p = enc(r["prompt"])
            ids = (p + enc(r["completion"]) + tail)[:max_length]
            if len(ids) > len(p):
                out.append(Example(tuple(ids), len(p)))
    for i in range(0, len(stream) - 1, max_length):
        block = stream[i:i + max_length]
        if len(block) >= 2:
            out.append(Example(tuple(block), 0))
    return out


def build_batch(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """RIGHT-padded training batch from examples.

    Returns:
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (1 on real tokens), ``labels`` (B, T) long equal
        to ``input_ids`` except -100 on prompt tokens and padding, ``loss_mask`` (B, T) float (labels != -100).
        Labels are NOT shifted; the loss predicts ``labels[:, t+1]`` from position t.
    """
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        t = torch.tensor(e.ids, dtype=torch.long)
        ids[i, :n] = t
        mask[i, :n] = 1
        labels[i, e.n_prompt:n] = t[e.n_prompt:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss_mask": (labels != -100).float()}


def lm_loss(model: Any, batch: dict[str, Any], reduction: str = "mean") -> Any:
    """Next-token cross-entropy of ``model`` on a :func:`build_batch` batch (positions from the mask).

    ``reduction="mean"``: mean over target tokens (0-d); ``"sum"``: (sum of token losses, number of tokens).
    """
    import torch
    import torch.nn.functional as F

    from proxrl.lm.models import position_ids_from_mask

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    n = (targets != -100).sum()
    if reduction == "sum":
        return loss, n
    return loss / torch.clamp(n, min=1)


def evaluate_loss(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 64) -> float:
    """Mean next-token loss (nats per target token) of ``model`` over ``examples``; nan if there are none."""
    import torch

    if not examples:
        return math.nan
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            loss, n = lm_loss(model, build_batch(examples[i:i + batch_size], pad_id), reduction="sum")
            total += float(loss)
            count += int(n)
    model.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------- training


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak LR at optimizer step ``s`` (0-based): linear warmup then cosine/linear/constant."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def make_optimizer(model: Any, learning_rate: float, weight_decay: float) -> Any:
    """AdamW with weight decay on matrices only (not biases, LayerNorm weights or embeddings' 1-d params)."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate)


def _load_model_and_tokenizer(cfg: SFTConfig, train_texts: list[str], saved_tokenizer: Path | None = None
                              ) -> tuple[Any, Any]:
    from proxrl.lm import models as M

    if cfg.model == TINY_MODEL:
        if cfg.tokenizer:
            tok = M.load_tokenizer(cfg.tokenizer)
        elif saved_tokenizer is not None:
            tok = M.load_tokenizer(saved_tokenizer)  # resuming: the BPE the run trained at its start
        else:
            tok = M.train_bpe_tokenizer(train_texts, cfg.vocab_size)
        model = M.build_tiny_gpt2(tok, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                  n_positions=cfg.n_positions, seed=cfg.seed)
        return model, tok
    tok = M.load_tokenizer(cfg.tokenizer or cfg.model)
    model = M.load_causal_lm(cfg.model)
    M.check_tokenizer_fits(model, tok, cfg.model if not cfg.tokenizer else None)
    M.disable_dropout(model)
    return model, tok


def load_run_config(run_dir: str | Path) -> SFTConfig:
    """The :class:`SFTConfig` saved in ``run_dir/config.yaml`` (to resume that run)."""
    from proxrl.config import from_dict
    from proxrl.runs import RunDir

    run = RunDir(run_dir)
    saved = {k: v for k, v in run.read_config().items() if k != "stage"}
    return from_dict(SFTConfig, {**saved, "run_dir": str(run_dir)}, source=str(run.config_path))


def train_sft(cfg: SFTConfig, progress: bool | None = None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune a causal LM on ``cfg.data``; save it (and its tokenizer) to ``cfg.run_dir``.

    ``resume=True`` continues ``cfg.run_dir`` from its latest checkpoint (``checkpoint_every`` > 0); the final
    model and metrics equal those of an uninterrupted run with the same config (see :func:`load_run_config`).

    Returns:
        dict with ``train_loss`` (mean of the last logged window), ``eval_loss`` (held-out, nats/token; nan with
        no held-out data), ``eval_loss_initial``, ``steps``, ``tokens``, ``seconds``, ``run_dir``.
    """
    import torch

    from proxrl.lm import models as M
    from proxrl.lm.train_state import load_train_state, resume_checkpoint, save_train_state
    from proxrl.runs import MetricsLogger, RunDir, plot_metrics, progress_bar

    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.run_dir)
    start_ckpt = resume_checkpoint(run) if resume else None
    records = load_records(cfg.data, cfg.prompt_key, cfg.completion_key)  # validate before creating anything
    run.create(exist_ok=cfg.overwrite or resume)
    if not resume:
        run.write_config({"stage": "sft", **to_dict(cfg)})
    rng = random.Random(cfg.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    n_eval = min(cfg.max_eval_examples, int(round(len(records) * cfg.eval_fraction)))
    if cfg.eval_fraction > 0 and len(records) >= 2:
        n_eval = max(1, n_eval)
    eval_recs = [records[i] for i in order[:n_eval]]
    train_recs = [records[i] for i in order[n_eval:]]
    if not train_recs:
        raise UserError(f"{cfg.data}: no training records left after holding out {n_eval}; lower --eval-fraction")

    texts = [r.get("text", "") or (r.get("prompt", "") + r.get("completion", "")) for r in train_recs]
    bpe_dir = run.path / "tokenizer"  # a BPE trained here is kept so a resumed run uses the very same one
    model, tok = _load_model_and_tokenizer(cfg, texts, bpe_dir if resume and bpe_dir.is_dir() else None)
    if cfg.model == TINY_MODEL and not cfg.tokenizer and cfg.checkpoint_every and not resume:
        tok.save_pretrained(str(bpe_dir))
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and cfg.max_length > ctx:
        raise UserError(f"max_length={cfg.max_length} exceeds the model's context of {ctx} tokens; lower --max-length")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = tokenize_records(train_recs, tok, cfg.max_length, cfg.add_eos, cfg.text_mode)
    held = tokenize_records(eval_recs, tok, cfg.max_length, cfg.add_eos, cfg.text_mode)
    if not train:
        raise UserError(f"{cfg.data}: no usable training examples (all empty or truncated away); check the data")

    steps_per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    opt_ = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total_steps))
    gen = torch.Generator().manual_seed(cfg.seed)

    perm: list[int] = []
    window: list[float] = []
    tokens, start = 0, 0
    if start_ckpt is not None:
        start, loop = load_train_state(start_ckpt, model, opt_, sched, gen)
        perm, window, tokens = loop["perm"], loop["window"], loop["tokens"]
        eval0, eval_loss = loop["eval_loss_initial"], loop["eval_loss"]
    logger = MetricsLogger(run.path, resume_from_step=start if resume else None)
    if start_ckpt is None:
        eval0 = evaluate_loss(model, held, pad_id)
        eval_loss = eval0
        logger.log(0, {"eval_loss": eval0})
    model.train()
    show = cfg.progress if progress is None else progress
    bar = progress_bar(total_steps, desc="sft", unit="step", disable=None if show else True)
    bar.update(start)
    try:
        for step in range(start + 1, total_steps + 1):
            if len(perm) < cfg.batch_size:
                perm += torch.randperm(len(train), generator=gen).tolist()
            idx, perm = perm[:cfg.batch_size], perm[cfg.batch_size:]
            batch = build_batch([train[i] for i in idx], pad_id)
            loss = lm_loss(model, batch)
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
            opt_.step()
            sched.step()
            tokens += int(batch["loss_mask"].sum())
            window.append(loss.item())
            if not math.isfinite(window[-1]):
                raise UserError(f"SFT loss became {window[-1]} at step {step}; lower --learning-rate")
            metrics: dict[str, float] = {}
            if step % cfg.log_every == 0 or step == total_steps:
                metrics.update(train_loss=sum(window) / len(window), grad_norm=float(gnorm),
                               lr=sched.get_last_lr()[0], tokens=tokens)
                bar.set_postfix({"loss": metrics["train_loss"]})
                window = []
            if step % cfg.eval_every == 0 or step == total_steps:
                eval_loss = evaluate_loss(model, held, pad_id)
                metrics["eval_loss"] = eval_loss
            if metrics:
                logger.log(step, metrics)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != total_steps:
                save_train_state(run, step, model, opt_, sched, gen, keep=cfg.keep_checkpoints, loop={
                    "perm": perm, "window": window, "tokens": tokens, "eval_loss": eval_loss,
                    "eval_loss_initial": eval0})
            bar.update(1)
    finally:
        bar.close()
        logger.close()
    model.eval()
    M.save_model_and_tokenizer(model, tok, run.path)
    rows = [r for r in __import__("proxrl.runs", fromlist=["read_metrics"]).read_metrics(run.path) if "train_loss" in r]
    train_loss = rows[-1]["train_loss"] if rows else math.nan
    try:
        plot_metrics(run.path, "step", ["train_loss", "eval_loss", "lr", "grad_norm"], "sft.png", "SFT")
    except UserError:
        pass
    result = {"train_loss": train_loss, "eval_loss": eval_loss, "eval_loss_initial": eval0, "steps": total_steps,
              "tokens": tokens, "train_examples": len(train), "eval_examples": len(held),
              "seconds": time.perf_counter() - t_start, "run_dir": str(run.path)}
    (run.path / "sft_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"sft: {total_steps} steps, held-out loss {eval0:.3f} -> {eval_loss:.3f} nats/token "
          f"({len(held)} examples), {result['seconds']:.0f}s; model saved to {run.path}")
    return result
