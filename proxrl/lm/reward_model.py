"""Pairwise reward-model training (Bradley-Terry): ``loss = -log sigmoid(r(chosen) - r(rejected))``.

Data: JSONL, one preference per line, either ``{"prompt", "chosen", "rejected"}`` (the sequences scored are
prompt + chosen and prompt + rejected, prompt and completion tokenized separately then joined, as PPO sees them)
or ``{"chosen", "rejected"}`` full texts. A bad line is a UserError naming its line number.

Model: ``AutoModelForSequenceClassification`` with ``num_labels=1``. From a causal-LM directory its trunk is copied
(:func:`proxrl.lm.models.scalar_model_from_causal`) and a fresh linear head added; from a saved reward model
training continues. The score of a sequence is the head at its last real token, found from the explicit
attention mask (:func:`proxrl.lm.models.sequence_scores`), never from ``pad_token_id`` (pad may equal EOS).

The output directory is a run directory that is also a HF model directory:
``AutoModelForSequenceClassification.from_pretrained(run_dir)`` loads the trained reward model.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from proxrl.config import check, opt, to_dict
from proxrl.errors import UserError


@dataclass
class RewardModelConfig:
    """Options of :func:`train_reward_model` (one ``proxrl reward-model --flag`` each)."""

    data: str = opt("", "preference JSONL: {prompt, chosen, rejected} or {chosen, rejected} per line")
    model: str = opt("", "local causal-LM directory whose trunk initialises the reward model (or a saved reward model)")
    tokenizer: str | None = opt(None, "tokenizer directory; default: the model directory")
    run_dir: str = opt("runs/reward_model", "run directory; the final reward model + tokenizer are saved at its top level")
    overwrite: bool = opt(False, "allow writing into an existing run directory")
    max_length: int = opt(128, "tokens per scored sequence (longer ones keep their first max_length tokens)")
    append_eos: bool = opt(True, "append EOS to each completion (PPO scores finished responses at their EOS token)")
    eval_fraction: float = opt(0.1, "fraction of pairs held out for accuracy")
    epochs: float = opt(1.0, "passes over the training pairs (fractional allowed); ignored if --max-steps > 0")
    max_steps: int = opt(0, "optimizer steps; 0 = derived from --epochs")
    batch_size: int = opt(16, "pairs per optimizer step")
    learning_rate: float = opt(1e-4, "peak AdamW learning rate (InstructGPT RM ~9e-6 for large models; small models tolerate more)")
    lr_schedule: str = opt("cosine", "'cosine', 'linear' or 'constant' decay after warmup")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, "gradient-norm clip; None = off")
    center_coef: float = opt(0.01, "weight of the (r_chosen + r_rejected)^2 penalty keeping scores centred at 0 (TRL center_rewards_coefficient)")
    eval_every: int = opt(50, "evaluate held-out accuracy every N steps (and at the end)")
    log_every: int = opt(10, "log training loss every N steps")
    checkpoint_every: int = opt(0, "save a resumable checkpoint (weights, optimizer, data order) to checkpoints/ every N steps; 0 = only the final model")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints (0 = all)")
    seed: int = opt(0, "random seed (head init, split, order)")
    threads: int = opt(0, "torch CPU threads; 0 = leave torch's setting")
    progress: bool = opt(True, "show a progress bar (on a terminal)")

    def __post_init__(self) -> None:
        check(bool(self.data), "data is empty; give --data PAIRS.jsonl")
        check(bool(self.model), "model is empty; give --model DIR (a causal LM, e.g. an SFT output directory)")
        check(bool(self.run_dir), "run_dir is empty; give --run-dir")
        check(self.max_length >= 2, f"max_length={self.max_length} must be >= 2")
        check(0.0 <= self.eval_fraction < 1.0, f"eval_fraction={self.eval_fraction} must be in [0, 1)")
        check(self.epochs > 0 and math.isfinite(self.epochs), f"epochs={self.epochs} must be > 0")
        check(self.max_steps >= 0, f"max_steps={self.max_steps} must be >= 0")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.learning_rate > 0 and math.isfinite(self.learning_rate), f"learning_rate={self.learning_rate} must be > 0")
        check(self.lr_schedule in ("cosine", "linear", "constant"),
              f"lr_schedule={self.lr_schedule!r} must be 'cosine', 'linear' or 'constant'")
        check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm={self.max_grad_norm} must be > 0 (or None)")
        check(self.center_coef >= 0 and math.isfinite(self.center_coef), f"center_coef={self.center_coef} must be >= 0")
        check(self.eval_every >= 1, f"eval_every={self.eval_every} must be >= 1")
        check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        check(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0")
        check(self.keep_checkpoints >= 0, f"keep_checkpoints={self.keep_checkpoints} must be >= 0")
        check(self.threads >= 0, f"threads={self.threads} must be >= 0")


def load_run_config(run_dir: str | Path) -> RewardModelConfig:
    """The :class:`RewardModelConfig` saved in ``run_dir/config.yaml`` (to resume that run)."""
    from proxrl.config import from_dict
    from proxrl.runs import RunDir

    run = RunDir(run_dir)
    saved = {k: v for k, v in run.read_config().items() if k != "stage"}
    return from_dict(RewardModelConfig, {**saved, "run_dir": str(run_dir)}, source=str(run.config_path))


# ----------------------------------------------------------------------------------------------- data


def load_pairs(path: str | Path) -> list[dict[str, str]]:
    """Preference records ``{"prompt", "chosen", "rejected"}`` (prompt "" for full-text pairs) from JSONL.

    UserError naming the line for invalid JSON, missing keys or non-string values.
    """
    from proxrl.lm.data import read_jsonl

    rows = read_jsonl(path, ("chosen", "rejected"))
    out = []
    for i, row in enumerate(rows, start=1):
        vals = {k: row.get(k, "") for k in ("prompt", "chosen", "rejected")}
        bad = [k for k, v in vals.items() if not isinstance(v, str)]
        if bad:
            raise UserError(f"{path} record {i}: {bad[0]!r} must be a string, got {type(vals[bad[0]]).__name__}")
        out.append(vals)
    if not out:
        raise UserError(f"{path} holds no preference pairs; give a non-empty JSONL file")
    return out


def encode_pair_side(tokenizer: Any, prompt: str, completion: str, max_length: int, append_eos: bool) -> list[int]:
    """Token ids of prompt + completion (+ EOS), prompt and completion tokenized separately, cut at max_length."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    ids += list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids[:max_length] if ids else [tokenizer.eos_token_id or 0]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """Right-pad id lists -> ``(input_ids (B, T) long, attention_mask (B, T) long, last_index (B,) long)``.

    ``last_index[b]`` is the position of the last real token of row b, computed from the attention mask.
    """
    import torch

    from proxrl.lm.models import last_token_index

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask, last_token_index(mask)


def score_sequences(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> Any:
    """Reward-model scores (B,) float32 of token id lists, read at each row's last real token (no grad)."""
    import torch

    from proxrl.lm.models import sequence_scores

    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask, last = pad_right(seqs[i:i + batch_size], pad_id)
            out.append(sequence_scores(model, ids, mask, last))
    return torch.cat(out) if out else torch.zeros(0)


def score_texts(model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
                max_length: int = 128, append_eos: bool = True, batch_size: int = 64) -> list[float]:
    """Reward-model scores of prompt + completion texts, encoded as in training (see :func:`encode_pair_side`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [encode_pair_side(tokenizer, p, c, max_length, append_eos) for p, c in zip(prompts, completions)]
    return [float(x) for x in score_sequences(model, seqs, pad, batch_size)]


def pair_loss(model: Any, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_id: int,
              center_coef: float = 0.0) -> tuple[Any, Any, Any]:
    """Bradley-Terry loss of a batch of pairs; chosen and rejected rows scored in ONE forward pass.

    Returns ``(loss 0-d, r_chosen (B,), r_rejected (B,))`` with
    ``loss = mean(-logsigmoid(r_c - r_r)) + center_coef * mean((r_c + r_r)^2)``.
    """
    import torch.nn.functional as F

    from proxrl.lm.models import sequence_scores

    n = len(chosen)
    ids, mask, last = pad_right(list(chosen) + list(rejected), pad_id)
    r = sequence_scores(model, ids, mask, last)
    rc, rr = r[:n], r[n:]
    loss = -F.logsigmoid(rc - rr).mean()
    if center_coef:
        loss = loss + center_coef * ((rc + rr) ** 2).mean()
    return loss, rc, rr


def preference_accuracy(model: Any, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                        pad_id: int) -> dict[str, float]:
    """Held-out metrics: ``accuracy`` (fraction with r_c > r_r; ties count half), ``loss``, ``margin``."""
    import torch
    import torch.nn.functional as F

    if not chosen:
        return {"accuracy": math.nan, "loss": math.nan, "margin": math.nan}
    was = model.training
    model.eval()
    rc = score_sequences(model, chosen, pad_id)
    rr = score_sequences(model, rejected, pad_id)
    model.train(was)
    d = rc - rr
    acc = float(((d > 0).float() + 0.5 * (d == 0).float()).mean())
    return {"accuracy": acc, "loss": float(-F.logsigmoid(d).mean()), "margin": float(d.mean()),
            "score_mean": float(torch.cat([rc, rr]).mean()), "score_std": float(torch.cat([rc, rr]).std())}


# ----------------------------------------------------------------------------------------------- training


def _init_model(cfg: RewardModelConfig) -> tuple[Any, Any]:
    import torch

    from proxrl.lm import models as M

    tok = M.load_tokenizer(cfg.tokenizer or cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if M.is_scalar_model_dir(cfg.model):
            model = M.load_scalar_model(cfg.model)  # continue training a saved reward model
        else:
            model = M.scalar_model_from_causal(cfg.model)
    M.check_tokenizer_fits(model, tok, cfg.model if not cfg.tokenizer else None, what="reward model")
    M.disable_dropout(model)
    return model, tok


def train_reward_model(cfg: RewardModelConfig, progress: bool | None = None, resume: bool = False) -> dict[str, Any]:
    """Train a scalar reward model on preference pairs; save it and its tokenizer to ``cfg.run_dir``.

    ``resume=True`` continues ``cfg.run_dir`` from its latest checkpoint (``checkpoint_every`` > 0), ending where
    an uninterrupted run with the same config would (see :func:`load_run_config`).

    Returns:
        dict with ``eval_accuracy`` / ``eval_accuracy_initial`` (held-out preference accuracy after / before
        training), ``train_accuracy``, ``eval_loss``, ``steps``, ``pairs_train``, ``pairs_eval``, ``seconds``,
        ``run_dir``.
    """
    import torch

    from proxrl.lm import models as M
    from proxrl.lm.sft import lr_lambda, make_optimizer
    from proxrl.lm.train_state import load_train_state, resume_checkpoint, save_train_state
    from proxrl.runs import MetricsLogger, RunDir, plot_metrics, progress_bar

    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.run_dir)
    start_ckpt = resume_checkpoint(run) if resume else None
    pairs = load_pairs(cfg.data)  # validate the data before creating anything
    run.create(exist_ok=cfg.overwrite or resume)
    if not resume:
        run.write_config({"stage": "reward_model", **to_dict(cfg)})
    model, tok = _init_model(cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    rng = random.Random(cfg.seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_eval = int(round(len(pairs) * cfg.eval_fraction))
    if cfg.eval_fraction > 0 and len(pairs) >= 2:
        n_eval = max(1, n_eval)
    if n_eval >= len(pairs):
        raise UserError(f"{cfg.data}: {len(pairs)} pairs leave none for training after holding out {n_eval}; "
                        "lower --eval-fraction or add pairs")

    def enc(idx: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
        c = [encode_pair_side(tok, pairs[i]["prompt"], pairs[i]["chosen"], cfg.max_length, cfg.append_eos) for i in idx]
        r = [encode_pair_side(tok, pairs[i]["prompt"], pairs[i]["rejected"], cfg.max_length, cfg.append_eos) for i in idx]
        return c, r

    ev_c, ev_r = enc(order[:n_eval])
    tr_c, tr_r = enc(order[n_eval:])
    n_train = len(tr_c)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(n_train / cfg.batch_size)))
    opt_ = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total))
    gen = torch.Generator().manual_seed(cfg.seed)
    perm: list[int] = []
    win_loss: list[float] = []
    win_acc: list[float] = []
    start = 0
    if start_ckpt is not None:
        start, loop = load_train_state(start_ckpt, model, opt_, sched, gen)
        perm, win_loss, win_acc, ev0, ev = loop["perm"], loop["win_loss"], loop["win_acc"], loop["ev0"], loop["ev"]
    logger = MetricsLogger(run.path, resume_from_step=start if resume else None)
    if start_ckpt is None:
        ev0 = preference_accuracy(model, ev_c, ev_r, pad)
        logger.log(0, {f"eval_{k}": v for k, v in ev0.items()})
        ev = ev0
    model.train()
    show = cfg.progress if progress is None else progress
    bar = progress_bar(total, desc="reward model", unit="step", disable=None if show else True)
    bar.update(start)
    try:
        for step in range(start + 1, total + 1):
            if len(perm) < cfg.batch_size:
                perm += torch.randperm(n_train, generator=gen).tolist()
            idx, perm = perm[:cfg.batch_size], perm[cfg.batch_size:]
            loss, rc, rr = pair_loss(model, [tr_c[i] for i in idx], [tr_r[i] for i in idx], pad, cfg.center_coef)
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
            opt_.step()
            sched.step()
            win_loss.append(loss.item())
            win_acc.append(float((rc > rr).float().mean()))
            if not math.isfinite(win_loss[-1]):
                raise UserError(f"reward-model loss became {win_loss[-1]} at step {step}; lower --learning-rate")
            metrics: dict[str, float] = {}
            if step % cfg.log_every == 0 or step == total:
                metrics.update(train_loss=sum(win_loss) / len(win_loss), train_accuracy=sum(win_acc) / len(win_acc),
                               grad_norm=float(gnorm), lr=sched.get_last_lr()[0])
                bar.set_postfix({"loss": metrics["train_loss"], "acc": metrics["train_accuracy"]})
                win_loss, win_acc = [], []
            if step % cfg.eval_every == 0 or step == total:
                ev = preference_accuracy(model, ev_c, ev_r, pad)
                metrics.update({f"eval_{k}": v for k, v in ev.items()})
            if metrics:
                logger.log(step, metrics)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != total:
                save_train_state(run, step, model, opt_, sched, gen, keep=cfg.keep_checkpoints, loop={
                    "perm": perm, "win_loss": win_loss, "win_acc": win_acc, "ev0": ev0, "ev": ev})
            bar.update(1)
    finally:
        bar.close()
        logger.close()
    model.eval()
    M.save_model_and_tokenizer(model, tok, run.path)
    tr = preference_accuracy(model, tr_c[:512], tr_r[:512], pad)
    try:
        plot_metrics(run.path, "step", ["train_loss", "train_accuracy", "eval_accuracy", "eval_loss", "eval_margin"],
                     "reward_model.png", "Reward model (Bradley-Terry)")
    except UserError:
        pass
    result = {"eval_accuracy": ev["accuracy"], "eval_accuracy_initial": ev0["accuracy"], "eval_loss": ev["loss"],
              "train_accuracy": tr["accuracy"], "score_mean": ev.get("score_mean", math.nan),
              "score_std": ev.get("score_std", math.nan), "steps": total, "pairs_train": n_train,
              "pairs_eval": len(ev_c), "seconds": time.perf_counter() - t0, "run_dir": str(run.path)}
    (run.path / "reward_model_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"reward model: {total} steps on {n_train} pairs; held-out accuracy {ev0['accuracy']:.1%} -> "
          f"{ev['accuracy']:.1%} ({len(ev_c)} pairs), train accuracy {tr['accuracy']:.1%}, "
          f"{result['seconds']:.0f}s; saved to {run.path}")
    return result
