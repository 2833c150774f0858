"""The offline RLHF pipeline end to end on a built-in task: tokenizer + tiny GPT -> SFT -> (reward model) -> PPO.

``run_demo(task="sentiment")`` (the default, ``proxrl demo``), the classic RLHF shape on public-domain text:

1. a byte-level BPE tokenizer and a tiny GPT-2 trained from scratch on Jane Austen sentences (SFT stage);
2. preference pairs synthesised from the SFT model: for a sentence prefix, sample several continuations and
   label the one VADER finds most positive "chosen", the least positive "rejected";
3. a Bradley-Terry reward model initialised from the SFT trunk (held-out preference accuracy reported);
4. PPO against the reward model with a KL penalty to the SFT reference (beta 0.3: strong enough that the policy
   does not collapse onto one stock phrase the reward model likes; docs/rlhf.md, "The built-in demo");
5. evaluation on held-out prompts: mean VADER and reward-model score of SFT vs PPO samples, KL(PPO || SFT),
   diversity (distinct-2, unique completions, share of the most common 3-word phrase) and a few before/after
   samples side by side.

``run_demo(task="arithmetic")``: a character-level tiny GPT-2 trained on additions of numbers 0-99 whose labels
come from a sloppy labeller (the carries of 60% of the problems that carry are dropped), so it is right only part
of the time; then PPO with the exact-match checker as the reward; metric: held-out exact-match accuracy (greedy).

Everything lands in ``run_dir``: ``tokenizer/``, ``data/``, ``sft/``, ``reward_model/``, ``ppo/`` (final policy in
``ppo/policy/``), ``summary.json`` and ``summary.md``. Each model directory loads with ``from_pretrained``.
"""
from __future__ import annotations

import json
import random
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers.utils import logging as hf_logging

from proxrl.errors import UserError
from proxrl.lm.data import write_jsonl
from proxrl.lm.demo_config import SIZES, DemoConfig, DemoSizes
from proxrl.lm.evaluation import mean, sample
from proxrl.lm.loading import load_causal_lm, load_scalar_model
from proxrl.lm.ppo_config import PPOConfig
from proxrl.lm.ppo_trainer import train_ppo
from proxrl.lm.reward_model import encode_pair_side, score_sequences, train_reward_model
from proxrl.lm.sft import train_sft
from proxrl.lm.supervised_config import RewardModelConfig, SFTConfig
from proxrl.lm.tasks import arithmetic, sentiment
from proxrl.lm.tokenization import load_tokenizer, train_bpe_tokenizer

__all__ = ["run_demo", "run_demo_config", "synthesize_pairs", "sentiment_metric_lines"]


def _fmt_time(s: float) -> str:
    return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"


class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def stage(self, name: str) -> "_Timer":
        self._name, self._start = name, time.perf_counter()
        print(f"\n== {name}", flush=True)
        return self

    def __enter__(self) -> "_Timer":
        return self

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self._start
        self.stages[self._name] = dt
        if exc[0] is None:
            print(f"   ({self._name}: {_fmt_time(dt)})", flush=True)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


def _write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(ln.replace("\n", " ") + "\n" for ln in lines), encoding="utf-8")
    return path


def synthesize_pairs(model: Any, tokenizer: Any, prompts: Sequence[str], score: Callable[[list[str]], list[float]],
                     *, samples_per_prompt: int, max_new_tokens: int, temperature: float, seed: int,
                     min_gap: float = 0.05) -> list[dict[str, Any]]:
    """Preference pairs from a model's own samples: for each prompt sample ``samples_per_prompt`` continuations,
    score them, and keep (best = chosen, worst = rejected) when their scores differ by at least ``min_gap``.

    Returns ``[{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}, ...]``.
    """
    rep = [p for p in prompts for _ in range(samples_per_prompt)]
    s = sample(model, tokenizer, rep, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    scores = score(s["completions"])
    pairs = []
    for i, p in enumerate(prompts):
        lo = i * samples_per_prompt
        group = list(zip(scores[lo:lo + samples_per_prompt], s["completions"][lo:lo + samples_per_prompt]))
        best, worst = max(group, key=lambda t: t[0]), min(group, key=lambda t: t[0])
        if best[0] - worst[0] >= min_gap and best[1] != worst[1]:
            pairs.append({"prompt": p, "chosen": best[1], "rejected": worst[1],
                          "score_chosen": best[0], "score_rejected": worst[0]})
    return pairs


def _sft(sizes: DemoSizes, out: Path, data: Path, seed: int, progress: bool, device: str = "cpu") -> dict[str, Any]:
    """SFT of a tiny GPT-2 from scratch on ``data`` with the tokenizer in ``out/tokenizer``, into ``out/sft``."""
    return train_sft(SFTConfig(
        data=str(data), model="tiny-gpt2", tokenizer=str(out / "tokenizer"), run_dir=str(out / "sft"),
        n_layer=sizes.n_layer, n_embd=sizes.n_embd, n_head=sizes.n_head, n_positions=sizes.n_positions,
        max_length=sizes.max_length, max_steps=sizes.sft_steps, batch_size=sizes.sft_batch,
        learning_rate=sizes.sft_lr, eval_every=max(1, sizes.sft_steps // 4), seed=seed, progress=progress,
        device=device),
        progress=progress)


def _ppo(sizes: DemoSizes, out: Path, seed: int, prompts: list[str], progress: bool, threads: int,
         reward_model: str | None = None, reward_fn: str | None = None, device: str = "cpu") -> dict[str, float]:
    cfg = PPOConfig(policy=str(out / "sft"), reward_model=reward_model, reward_fn=reward_fn,
                    run_dir=str(out / "ppo"), seed=seed, total_updates=sizes.ppo_updates,
                    rollout_size=sizes.ppo_rollout, minibatch_size=sizes.ppo_minibatch, epochs=sizes.ppo_epochs,
                    learning_rate=sizes.ppo_lr, kl_coef=sizes.kl_coef, adaptive_kl=sizes.adaptive_kl,
                    kl_target=sizes.kl_target, kl_horizon=sizes.kl_horizon, entropy_coef=sizes.entropy_coef,
                    max_new_tokens=sizes.max_new_tokens,
                    temperature=sizes.temperature, max_prompt_length=sizes.max_length,
                    sample_every=0, checkpoint_every=0, threads=threads, device=device)
    return train_ppo(cfg, prompts, progress=progress)


def _side_by_side(rows: list[tuple[str, str, float, str, float]], metric: str, prompt_w: int = 18,
                  col_w: int = 40) -> list[str]:
    """Before/after samples as a table: prompt | SFT completion | PPO completion (wrapped, each with its score)."""
    def score(v: float) -> str:
        return ("right" if v > 0.5 else "wrong") if metric == "correct" else f"{v:+.2f}"

    def cell(text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()) or "(empty)", width) or [""]

    sw = max(len(score(v)) for r in rows for v in (r[2], r[4]))
    head = f"  {'prompt':<{prompt_w}} | {'before (SFT)  [' + metric + ']':<{sw + 1 + col_w}} | after (PPO)  [{metric}]"
    lines = [head]
    for prompt, before, sb, after, sa in rows:
        cols = [cell(prompt, prompt_w), cell(before, col_w), cell(after, col_w)]
        for i in range(max(len(c) for c in cols)):
            p = cols[0][i] if i < len(cols[0]) else ""
            b = (score(sb) if i == 0 else "").rjust(sw) + " " + (cols[1][i] if i < len(cols[1]) else "")
            a = (score(sa) if i == 0 else "").rjust(sw) + " " + (cols[2][i] if i < len(cols[2]) else "")
            lines.append(f"  {p:<{prompt_w}} | {b:<{sw + 1 + col_w}} | {a}".rstrip())
    lines.insert(1, "  " + "-" * (max(len(ln) for ln in lines) - 2))
    return lines


def _print_samples(rows: list[tuple[str, str, float, str, float]], metric: str) -> list[str]:
    lines = _side_by_side(rows, metric)
    print("\n".join(lines))
    return lines


def _load(path: Path) -> tuple[Any, Any]:
    return load_causal_lm(path), load_tokenizer(path)


def sentiment_metric_lines(ev: dict[str, Any], sizes: DemoSizes, n_prompts: int) -> list[str]:
    """The human-readable result lines of :func:`proxrl.lm.tasks.sentiment.evaluate_sentiment` (printed and written
    to summary.md)."""
    b, a = ev["before"], ev["after"]
    return [
        f"metric improved: mean VADER sentiment {b['vader']:+.3f} -> {a['vader']:+.3f} "
        f"(held-out prompts; SFT -> PPO, range [-1, 1])",
        f"positive completions   {b['vader_positive_fraction']:.1%} -> {a['vader_positive_fraction']:.1%}",
        f"reward-model score     {b['rm_score']:+.3f} -> {a['rm_score']:+.3f}",
        f"KL(PPO || SFT)         {a['kl_to_sft']:.2f} nats per completion "
        f"(penalty beta {sizes.kl_coef:g}{f', adaptive towards {sizes.kl_target:g}' if sizes.adaptive_kl else ''})",
        f"diversity              distinct-2 {b['distinct_2']:.2f} -> {a['distinct_2']:.2f}, unique completions "
        f"{b['unique']:.0%} -> {a['unique']:.0%}, most common 3-word phrase in {b['top_trigram_fraction']:.0%} -> "
        f"{a['top_trigram_fraction']:.0%} of completions ({a['top_trigram']!r} after)",
        f"held-out prompts: {n_prompts}, sampling temperature {sizes.temperature}, "
        f"{sizes.max_new_tokens} new tokens max, same seed before and after",
    ]


def _run_sentiment(cfg: DemoConfig, sizes: DemoSizes, out: Path, timer: _Timer) -> dict[str, Any]:
    seed = cfg.seed
    with timer.stage("data + tokenizer"):
        train_s, held_s = sentiment.split_sentences(seed=seed)
        if sizes.sft_examples:
            train_s = train_s[: sizes.sft_examples]
        rng = random.Random(seed)
        # prompts for pairs / PPO come from the SFT training sentences; evaluation prompts from held-out ones
        train_prompts = sentiment.make_prompts(train_s, seed=seed)
        rng.shuffle(train_prompts)
        eval_prompts = sentiment.make_prompts(held_s, seed=seed + 1)[: sizes.eval_prompts]
        _write_lines(out / "data" / "sft_train.txt", train_s)
        write_jsonl(out / "data" / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
        train_bpe_tokenizer(train_s, sizes.vocab_size, out_dir=out / "tokenizer")
        print(f"   {len(train_s)} training sentences (Jane Austen, public domain), {len(eval_prompts)} held-out "
              f"prompts, BPE vocabulary {sizes.vocab_size}")

    with timer.stage("SFT (tiny GPT-2 trained from scratch)"):
        sft = _sft(sizes, out, out / "data" / "sft_train.txt", seed, cfg.progress, cfg.device)

    with timer.stage("preference pairs (SFT samples labelled by VADER)"):
        sft_model, tok = _load(out / "sft")
        pair_prompts = train_prompts[: sizes.pair_prompts]
        # quick mode's barely trained model rarely says anything VADER can score: accept ties there (smoke test)
        pairs = synthesize_pairs(sft_model, tok, pair_prompts, sentiment.vader_scores,
                                 samples_per_prompt=sizes.pair_samples, max_new_tokens=sizes.max_new_tokens,
                                 temperature=sizes.temperature, seed=seed, min_gap=0.0 if cfg.quick else 0.05)
        if len(pairs) < 4:
            raise UserError(f"only {len(pairs)} preference pairs could be labelled; use more prompts (not --quick)")
        write_jsonl(out / "data" / "pairs.jsonl", pairs)
        print(f"   {len(pairs)} pairs from {len(pair_prompts)} prompts x {sizes.pair_samples} samples "
              f"(mean VADER chosen {mean([p['score_chosen'] for p in pairs]):+.2f}, "
              f"rejected {mean([p['score_rejected'] for p in pairs]):+.2f})")

    with timer.stage("reward model (Bradley-Terry on the pairs)"):
        rm = train_reward_model(RewardModelConfig(
            data=str(out / "data" / "pairs.jsonl"), model=str(out / "sft"), run_dir=str(out / "reward_model"),
            max_length=sizes.max_length + sizes.max_new_tokens, epochs=sizes.rm_epochs, batch_size=sizes.rm_batch,
            learning_rate=sizes.rm_lr, eval_fraction=0.15, eval_every=50, seed=seed, progress=cfg.progress,
            device=cfg.device),
            progress=cfg.progress)

    with timer.stage("PPO against the reward model"):
        ppo_prompts = train_prompts[sizes.pair_prompts:] or train_prompts
        ppo = _ppo(sizes, out, seed, ppo_prompts, cfg.progress, cfg.threads, reward_model=str(out / "reward_model"),
                   device=cfg.device)

    with timer.stage("evaluation on held-out prompts"):
        policy, _ = _load(out / "ppo" / "policy")
        rm_model = load_scalar_model(out / "reward_model")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def rm_score(prompts: list[str], completions: list[str], finished: list[bool]) -> list[float]:
            # as PPO scores them: the EOS token is part of a finished completion
            seqs = [encode_pair_side(tok, p, c, sizes.max_length + sizes.max_new_tokens + 1, f)
                    for p, c, f in zip(prompts, completions, finished)]
            return score_sequences(rm_model, seqs, pad).tolist()

        ev = sentiment.evaluate_sentiment(policy, sft_model, tok, eval_prompts, max_new_tokens=sizes.max_new_tokens,
                                  temperature=sizes.temperature, seed=seed + 7, rm_score=rm_score)
    b, a = ev["before"], ev["after"]
    rows = [(eval_prompts[i], ev["completions"]["before"][i], ev["vader"]["before"][i],
             ev["completions"]["after"][i], ev["vader"]["after"][i]) for i in range(min(cfg.samples, len(eval_prompts)))]
    metric_lines = sentiment_metric_lines(ev, sizes, len(eval_prompts)) + [
        f"reward model held-out accuracy {rm['eval_accuracy']:.1%} on {rm['pairs_eval']} pairs; "
        f"SFT held-out loss {sft['eval_loss_initial']:.2f} -> {sft['eval_loss']:.2f} nats/token",
    ]
    summary = {"task": "sentiment", "before": b, "after": a, "reward_model": rm, "sft": sft,
               "ppo_last_update": ppo}
    return {"summary": summary, "metric_lines": metric_lines, "rows": rows, "metric": "VADER"}


def _run_arithmetic(cfg: DemoConfig, sizes: DemoSizes, out: Path, timer: _Timer) -> dict[str, Any]:
    seed = cfg.seed
    with timer.stage("data + tokenizer"):
        held = arithmetic.held_out_problems(seed)[: sizes.eval_prompts]
        eval_prompts = [arithmetic.format_prompt(a, b) for a, b in held]
        # every problem outside the held-out set: SFT sees sft_examples of them, PPO prompts are drawn from all
        train_pairs = arithmetic.train_problems(10 ** 6, seed=seed)
        sft_pairs, ppo_pairs = train_pairs[: sizes.sft_examples], train_pairs
        write_jsonl(out / "data" / "sft_train.jsonl", arithmetic.sft_records(sft_pairs, sizes.carry_error, seed=seed))
        write_jsonl(out / "data" / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
        arithmetic.build_char_tokenizer(out / "tokenizer")
        print(f"   {len(sft_pairs)} SFT problems (operands 0-{10 ** arithmetic.DIGITS - 1}), {len(ppo_pairs)} PPO "
              f"prompts, {len(eval_prompts)} held-out problems; character tokenizer;\n"
              f"   the SFT labeller drops the carries of {sizes.carry_error:.0%} of the problems that carry "
              f"(PPO's exact-match checker has to fix that)")

    with timer.stage("SFT (tiny GPT-2 trained from scratch, stopped early)"):
        sft = _sft(sizes, out, out / "data" / "sft_train.jsonl", seed, cfg.progress, cfg.device)

    with timer.stage("PPO with the exact-match reward"):
        ppo_prompts = [arithmetic.format_prompt(a, b) for a, b in ppo_pairs]
        ppo = _ppo(sizes, out, seed, ppo_prompts, cfg.progress, cfg.threads,
                   reward_fn="proxrl.lm.tasks.arithmetic:reward_fn", device=cfg.device)

    with timer.stage("evaluation on held-out problems"):
        ref, tok = _load(out / "sft")
        policy, _ = _load(out / "ppo" / "policy")
        res = arithmetic.evaluate_arithmetic(policy, ref, tok, eval_prompts, max_new_tokens=sizes.max_new_tokens,
                                    temperature=sizes.temperature, seed=seed)
        done, right = res["completions"], res["correct"]
        order = sorted(range(len(eval_prompts)), key=lambda i: (right["before"][i] - right["after"][i], i))
        rows = [(eval_prompts[i], done["before"][i], right["before"][i], done["after"][i], right["after"][i])
                for i in order[: cfg.samples]]
    b, a = res["before"], res["after"]
    metric_lines = [
        f"held-out problems: {len(eval_prompts)} (never seen in SFT or PPO)",
        f"exact-match accuracy (greedy)   SFT {b['accuracy_greedy']:.1%}  ->  PPO {a['accuracy_greedy']:.1%}   (improved metric)",
        f"exact-match accuracy (T={sizes.temperature})    SFT {b['accuracy_sampled']:.1%}  ->  PPO {a['accuracy_sampled']:.1%}",
        f"KL(PPO || SFT)                  {a['kl_to_sft']:.2f} nats per completion (T={sizes.temperature})",
        f"SFT held-out loss {sft['eval_loss_initial']:.2f} -> {sft['eval_loss']:.2f} nats/token",
    ]
    summary = {"task": "arithmetic", "before": b, "after": a, "sft": sft, "ppo_last_update": ppo}
    return {"summary": summary, "metric_lines": metric_lines, "rows": rows, "metric": "correct"}


# ----------------------------------------------------------------------------------------------- entry points


def run_demo(task: str = "sentiment", run_dir: str | Path | None = None, seed: int = 0, quick: bool = False,
             threads: int = 2, samples: int = 4, progress: bool = True) -> dict[str, Any]:
    """Run the whole offline pipeline on a built-in task; print stage timings, metrics and samples.

    Returns the summary dict (also written to ``run_dir/summary.json``): ``before`` / ``after`` metrics of the
    SFT and PPO models on held-out prompts, stage ``timings`` (seconds), and per-stage results.
    """
    cfg = DemoConfig(task=task, run_dir=str(run_dir) if run_dir is not None else None, seed=seed,  # type: ignore[arg-type]
                     quick=quick, threads=threads, samples=samples, progress=progress)
    return run_demo_config(cfg)


def run_demo_config(cfg: DemoConfig) -> dict[str, Any]:
    """:func:`run_demo` from a :class:`DemoConfig` (the ``proxrl demo`` entry point)."""
    out = Path(cfg.run_dir or f"runs/demo_{cfg.task}_{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {str(out)!r} already exists and is not empty; choose another --run-dir")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars for every tiny model
    sizes = SIZES[(cfg.task, cfg.quick)]
    print(f"proxrl demo: task {cfg.task!r}{' (quick)' if cfg.quick else ''}, seed {cfg.seed}, "
          f"{torch.get_num_threads()} threads, output in {out}")
    (out / "demo_config.json").write_text(json.dumps({"config": asdict(cfg), "sizes": asdict(sizes)}, indent=1) + "\n")
    timer = _Timer()
    runner = _run_sentiment if cfg.task == "sentiment" else _run_arithmetic
    r = runner(cfg, sizes, out, timer)
    total = timer.total
    print("\n== before / after on held-out prompts")
    sample_lines = _print_samples(r["rows"], r["metric"]) if r["rows"] else []
    print("\n== results")
    for line in r["metric_lines"]:
        print("   " + line)
    print("\n== stage timings")
    for name, dt in timer.stages.items():
        print(f"   {name:<55s} {_fmt_time(dt):>6s}")
    print(f"   {'total':<55s} {_fmt_time(total):>6s}")
    summary = r["summary"]
    summary["timings"] = {**timer.stages, "total": total}
    summary["run_dir"] = str(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    md = [f"# proxrl demo: {cfg.task}", "", *[f"- {ln}" for ln in r["metric_lines"]], "", "## samples", "", "```",
          *sample_lines, "```", "", "## stage timings (seconds)", "",
          *[f"- {k}: {v:.1f}" for k, v in summary["timings"].items()], ""]
    (out / "summary.md").write_text("\n".join(md))
    print(f"\neverything is in {out}/ (sft/, {'reward_model/, ' if cfg.task == 'sentiment' else ''}ppo/policy/, "
          f"summary.md)")
    return summary
