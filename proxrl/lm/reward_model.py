"""Pairwise reward-model training (Bradley-Terry): ``loss = -log sigmoid(r(chosen) - r(rejected))``.

Data (:func:`proxrl.lm.data.load_rows`: JSONL, JSON, CSV, Parquet, a ``save_to_disk`` directory or a hub name),
one preference per row: ``{"prompt", "chosen", "rejected"}`` (the sequences scored are prompt + chosen and
prompt + rejected, prompt and completion tokenized separately then joined, as PPO sees them) or
``{"chosen", "rejected"}`` full texts; other column names with ``--prompt-column`` etc. Each value is a string or,
in TRL's conversational layout, a list of messages rendered with the chat template
(:func:`proxrl.lm.chat.preference_texts`; without a prompt, the messages chosen and rejected share are the prompt).

Model: ``AutoModelForSequenceClassification`` with ``num_labels=1``. From a causal-LM directory its trunk is copied
(:func:`proxrl.lm.builders.scalar_model_from_causal`) and a fresh linear head added; from a saved reward model
training continues. The score of a sequence is the head at its last real token, found from the explicit
attention mask (:func:`proxrl.lm.heads.sequence_scores`), never from ``pad_token_id`` (pad may equal EOS).
Training runs in the loop of :mod:`proxrl.lm.supervised`.

The output directory is a run directory that is also a HF model directory:
``AutoModelForSequenceClassification.from_pretrained(run_dir)`` loads the trained reward model.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from proxrl import distributed as D
from proxrl.lm.builders import scalar_model_from_causal
from proxrl.lm.chat import is_conversational, preference_texts, require_template, resolve_chat_template
from proxrl.lm.data import load_rows
from proxrl.lm.heads import SequenceScores, model_device, sequence_scores
from proxrl.lm.layers import disable_dropout
from proxrl.lm.loading import is_scalar_model_dir, load_scalar_model
from proxrl.lm.positions import last_token_index
from proxrl.lm.supervised import Prepared, StepResult, split_indices, train_supervised, write_result
from proxrl.lm.supervised_config import RewardModelConfig
from proxrl.lm.tokenization import check_tokenizer_fits, load_tokenizer

__all__ = ["RewardModelConfig", "load_pairs", "encode_pair_side", "encode_pairs", "pad_right", "score_sequences",
           "pair_loss", "preference_accuracy", "train_reward_model"]


# ----------------------------------------------------------------------------------------------- data


def load_pairs(spec: str | Path, prompt_column: str = "prompt", chosen_column: str = "chosen",
               rejected_column: str = "rejected") -> list[dict[str, Any]]:
    """Preference records ``{"prompt", "chosen", "rejected"}`` of a data source (prompt None where the data has
    none), each value a string or a list of messages.

    Raises:
        UserError: a missing chosen/rejected column (naming the columns present), a null or mistyped value (naming
        the file, row and column), or what :func:`proxrl.lm.data.load_table` raises.
    """
    return load_rows(spec, columns={"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column},
                     optional=("prompt",), kinds=dict.fromkeys(("prompt", "chosen", "rejected"), "text_or_messages"),
                     what="preference data")


def encode_pair_side(tokenizer: Any, prompt: str, completion: str, max_length: int, append_eos: bool) -> list[int]:
    """Token ids of prompt + completion (+ EOS), prompt and completion tokenized separately, cut at max_length."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    ids += list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids[:max_length] if ids else [tokenizer.eos_token_id or 0]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> ``(input_ids (B, T) long, attention_mask (B, T) long, last_index (B,) long)``.

    ``last_index[b]`` is the position of the last real token of row b, computed from the attention mask.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask, last_token_index(mask)


def score_sequences(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores (B,) float32 of token id lists, read at each row's last real token (no grad), on the
    model's device."""
    out = []
    device = model_device(model)
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask, last = (t.to(device) for t in pad_right(seqs[i:i + batch_size], pad_id))
            out.append(sequence_scores(model, ids, mask, last))
    return torch.cat(out) if out else torch.zeros(0, device=device)


def pair_loss(model: Any, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_id: int,
              center_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss of a batch of pairs; chosen and rejected rows scored in ONE forward pass.

    Returns ``(loss 0-d, r_chosen (B,), r_rejected (B,))`` with
    ``loss = mean(-logsigmoid(r_c - r_r)) + center_coef * mean((r_c + r_r)^2)``.
    """
    n = len(chosen)
    device = model_device(model)
    ids, mask, last = (t.to(device) for t in pad_right(list(chosen) + list(rejected), pad_id))
    r = sequence_scores(model, ids, mask, last)
    rc, rr = r[:n], r[n:]
    loss = -F.logsigmoid(rc - rr).mean()
    if center_coef:
        loss = loss + center_coef * ((rc + rr) ** 2).mean()
    return loss, rc, rr


def preference_accuracy(model: Any, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                        pad_id: int) -> dict[str, float]:
    """Held-out metrics: ``accuracy`` (fraction with r_c > r_r; ties count half), ``loss``, ``margin``,
    ``score_mean``, ``score_std``."""
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
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if is_scalar_model_dir(cfg.model):
            model = load_scalar_model(cfg.model)  # continue training a saved reward model
        else:
            model = scalar_model_from_causal(cfg.model)
    check_tokenizer_fits(model, tok, cfg.model if not cfg.tokenizer else None, what="reward model")
    disable_dropout(model)
    return model, tok


def encode_pairs(tokenizer: Any, pairs: Sequence[dict[str, Any]], idx: Sequence[int], template: str | None,
                 max_length: int, append_eos: bool = True, source: str = "data"
                 ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the chosen and of the rejected sequence of ``pairs[i]`` for each ``i`` in ``idx``.

    Plain strings are encoded as they are (:func:`encode_pair_side`, EOS appended when ``append_eos``). A pair
    with a list of messages, or with a prompt when ``template`` is given, is rendered first by
    :func:`proxrl.lm.chat.preference_texts` (the completions then end with the template's end-of-turn marker, and
    EOS is appended only without a template). Errors name ``source`` and the row ``i + 1``.
    """
    eos = append_eos and template is None
    chosen, rejected = [], []
    for i in idx:
        prompt, c, r = pairs[i]["prompt"], pairs[i]["chosen"], pairs[i]["rejected"]
        if any(is_conversational(x) for x in (prompt, c, r)) or (template is not None and prompt):
            prompt, c, r = preference_texts(tokenizer, template, prompt, c, r, f"{source} row {i + 1}")
        chosen.append(encode_pair_side(tokenizer, prompt or "", c, max_length, eos))
        rejected.append(encode_pair_side(tokenizer, prompt or "", r, max_length, eos))
    return chosen, rejected


def _prepare(cfg: RewardModelConfig) -> tuple[Prepared, int]:
    """Read and split the pairs, build the model, encode: the reward-model stage ready to train, and how many
    pairs are held out."""
    pairs = load_pairs(cfg.data, cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    model, tok = _init_model(cfg)
    template = require_template(resolve_chat_template(tok, cfg.chat_template), cfg.chat_template,
                                any(is_conversational(v) for p in pairs for v in p.values()))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    source = Path(cfg.data).name
    held_idx, train_idx = split_indices(len(pairs), cfg.eval_fraction, cfg.seed, source=source, unit="pairs")
    ev_c, ev_r = encode_pairs(tok, pairs, held_idx, template, cfg.max_length, cfg.append_eos, source)
    tr_c, tr_r = encode_pairs(tok, pairs, train_idx, template, cfg.max_length, cfg.append_eos, source)

    def step(module: Any, idx: list[int]) -> StepResult:
        loss, rc, rr = pair_loss(module, [tr_c[i] for i in idx], [tr_r[i] for i in idx], pad, cfg.center_coef)
        return StepResult(loss, window={"train_accuracy": (rc > rr).float().mean().detach()})

    def evaluate(module: Any) -> dict[str, float]:
        return {f"eval_{k}": v for k, v in preference_accuracy(module, ev_c, ev_r, pad).items()}

    def final(module: Any) -> dict[str, float]:
        return {"train_accuracy": preference_accuracy(module, tr_c[:512], tr_r[:512], pad)["accuracy"]}

    # the loop calls (and DDP-wraps / FSDP-shards) the scorer module, whose forward covers every parameter
    return Prepared(model, tok, len(tr_c), step, evaluate, final=final, module=SequenceScores(model)), len(ev_c)


def train_reward_model(cfg: RewardModelConfig, progress: bool | None = None, resume: bool = False) -> dict[str, Any]:
    """Train a scalar reward model on preference pairs; save it and its tokenizer to ``cfg.run_dir``.

    ``resume=True`` continues ``cfg.run_dir`` from its latest checkpoint (``checkpoint_every`` > 0), ending where
    an uninterrupted run with the same config would (see :func:`proxrl.lm.supervised.load_run_config`).

    Returns:
        dict with ``eval_accuracy`` / ``eval_accuracy_initial`` (held-out preference accuracy after / before
        training), ``train_accuracy``, ``eval_loss``, ``score_mean``, ``score_std``, ``steps``, ``pairs_train``,
        ``pairs_eval``, ``seconds``, ``run_dir``.
    """
    t0 = time.perf_counter()
    prepared: dict[str, Any] = {}

    def prepare() -> Prepared:
        prepared["stage"], prepared["n_eval"] = _prepare(cfg)
        return prepared["stage"]

    out = train_supervised(cfg, prepare, resume=resume, name="reward model", progress=progress,
                           plot=(["train_loss", "train_accuracy", "eval_accuracy", "eval_loss", "eval_margin"],
                                 "reward_model.png", "Reward model (Bradley-Terry)"))
    ev, ev0 = out.eval, out.eval_initial
    train_acc = out.final["train_accuracy"]
    result = {"eval_accuracy": ev["eval_accuracy"], "eval_accuracy_initial": ev0["eval_accuracy"],
              "eval_loss": ev["eval_loss"], "train_accuracy": train_acc,
              "score_mean": ev.get("eval_score_mean", math.nan), "score_std": ev.get("eval_score_std", math.nan),
              "steps": out.steps, "pairs_train": prepared["stage"].n_train, "pairs_eval": prepared["n_eval"],
              "seconds": time.perf_counter() - t0, "run_dir": str(out.run_dir)}
    if not D.is_main():  # under torchrun rank 0 writes and reports
        return result
    write_result(out.run_dir, "reward_model", result)
    print(f"reward model: {out.steps} steps on {result['pairs_train']} pairs; held-out accuracy "
          f"{ev0['eval_accuracy']:.1%} -> {ev['eval_accuracy']:.1%} ({result['pairs_eval']} pairs), train accuracy "
          f"{train_acc:.1%}, {result['seconds']:.0f}s; saved to {out.run_dir}")
    return result
