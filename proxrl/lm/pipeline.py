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
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from proxrl.config import check, opt
from proxrl.errors import UserError


@dataclass
class DemoConfig:
    """Options of ``proxrl demo``."""

    task: Literal["sentiment", "arithmetic"] = opt("sentiment", "built-in task: 'sentiment' (Austen + VADER preferences -> reward model -> PPO) or 'arithmetic' (addition, exact-match reward)")
    run_dir: str | None = opt(None, "directory for every stage's output (default: runs/demo_<task>_<timestamp>)")
    seed: int = opt(0, "random seed of every stage")
    quick: bool = opt(False, "tiny sizes: a smoke test of the whole pipeline in well under a minute (no real improvement expected)")
    threads: int = opt(2, "torch CPU threads (0 = torch's default)")
    samples: int = opt(4, "before/after samples printed at the end")
    progress: bool = opt(True, "progress bars (shown on a terminal only)")

    def __post_init__(self) -> None:
        check(self.task in ("sentiment", "arithmetic"), f"task={self.task!r} must be 'sentiment' or 'arithmetic'")
        check(self.threads >= 0, f"threads={self.threads} must be >= 0")
        check(self.samples >= 0, f"samples={self.samples} must be >= 0")
        check(self.run_dir is None or bool(self.run_dir), "run_dir is empty; give --run-dir DIR")


@dataclass(frozen=True)
class DemoSizes:
    """Every size of one demo run (derived from task and ``quick``; never part of the user config)."""

    # model
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    max_length: int
    # SFT
    sft_examples: int
    sft_steps: int
    sft_batch: int
    sft_lr: float
    # preference data + reward model (sentiment)
    pair_prompts: int
    pair_samples: int
    rm_epochs: float
    rm_batch: int
    rm_lr: float
    # PPO
    ppo_updates: int
    ppo_rollout: int
    ppo_minibatch: int
    ppo_epochs: int
    ppo_lr: float
    kl_coef: float
    max_new_tokens: int
    temperature: float
    # evaluation
    eval_prompts: int
    # arithmetic: probability that the SFT labeller drops the carries of a problem that carries
    carry_error: float = 0.0
    # PPO KL control: adaptive beta (Ziegler et al. 2019) towards kl_target nats per completion
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    entropy_coef: float = 0.0


SIZES: dict[tuple[str, bool], DemoSizes] = {
    ("sentiment", False): DemoSizes(
        vocab_size=2048, n_layer=4, n_embd=128, n_head=4, n_positions=96, max_length=48,
        sft_examples=0, sft_steps=1000, sft_batch=32, sft_lr=2e-3,
        pair_prompts=1000, pair_samples=4, rm_epochs=2.0, rm_batch=32, rm_lr=3e-4,
        # beta 0.3: KL(PPO || SFT) ~2 nats, no collapse onto one stock phrase (see docs/rlhf.md, "The built-in demo")
        ppo_updates=60, ppo_rollout=32, ppo_minibatch=16, ppo_epochs=4, ppo_lr=5e-5, kl_coef=0.3,
        max_new_tokens=20, temperature=0.7, eval_prompts=200),
    ("sentiment", True): DemoSizes(
        vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=64, max_length=32,
        sft_examples=400, sft_steps=20, sft_batch=16, sft_lr=3e-3,
        pair_prompts=48, pair_samples=4, rm_epochs=1.0, rm_batch=8, rm_lr=1e-3,
        ppo_updates=2, ppo_rollout=8, ppo_minibatch=4, ppo_epochs=1, ppo_lr=1e-4, kl_coef=0.3,
        max_new_tokens=8, temperature=0.7, eval_prompts=16),
    ("arithmetic", False): DemoSizes(
        vocab_size=0, n_layer=2, n_embd=96, n_head=4, n_positions=32, max_length=16,
        sft_examples=9000, sft_steps=900, sft_batch=64, sft_lr=3e-3,
        pair_prompts=0, pair_samples=0, rm_epochs=0.0, rm_batch=0, rm_lr=0.0,
        ppo_updates=120, ppo_rollout=64, ppo_minibatch=32, ppo_epochs=4, ppo_lr=3e-5, kl_coef=0.01,
        max_new_tokens=6, temperature=1.0, eval_prompts=500, carry_error=0.6),
    ("arithmetic", True): DemoSizes(
        vocab_size=0, n_layer=1, n_embd=32, n_head=2, n_positions=32, max_length=16,
        sft_examples=400, sft_steps=20, sft_batch=16, sft_lr=3e-3,
        pair_prompts=0, pair_samples=0, rm_epochs=0.0, rm_batch=0, rm_lr=0.0,
        ppo_updates=2, ppo_rollout=8, ppo_minibatch=4, ppo_epochs=1, ppo_lr=1e-4, kl_coef=0.01,
        max_new_tokens=6, temperature=1.0, eval_prompts=32, carry_error=0.6),
}


# ----------------------------------------------------------------------------------------------- sampling helpers


def sample(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
           seed: int, batch_size: int = 64, ref_model: Any = None) -> dict[str, Any]:
    """Sample one completion per prompt (temperature 0 = greedy), in batches of left-padded prompts.

    Returns ``{"completions": list[str], "finished": list[bool], "kl": list[float]}``; ``kl`` (only with
    ``ref_model``) is the per-sequence k1 estimate ``sum_t log pi(y_t) - log ref(y_t)`` at the sampling temperature
    (temperature 1 for greedy), whose mean over samples from pi estimates KL(pi || ref) in nats.
    """
    import torch

    from proxrl.lm.generation import generate
    from proxrl.lm.models import response_logprobs
    from proxrl.lm.rollout import left_pad

    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, list] = {"completions": [], "finished": [], "kl": []}
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk], pad)
        g = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                     eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer, generator=gen)
        rm = g.response_mask
        out["completions"] += [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                               for r, m in zip(g.responses, rm)]
        out["finished"] += g.finished.tolist()
        if ref_model is not None:
            with torch.no_grad():
                ref_lp = response_logprobs(ref_model, g.sequences, g.attention_mask.long(), g.prompt_len,
                                           temperature if temperature > 0 else 1.0)
            out["kl"] += ((g.logprobs - ref_lp) * rm).sum(1).tolist()
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _fmt_time(s: float) -> str:
    return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"


def _short(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def diversity(texts: Sequence[str]) -> dict[str, Any]:
    """Diversity of a set of completions (word level, case-folded, punctuation kept as part of words).

    Returns ``distinct_1`` / ``distinct_2``: unique word unigrams / bigrams over all unigrams / bigrams of the set
    (Li et al. 2016, corpus level); ``unique``: fraction of distinct completions; ``top_trigram`` and
    ``top_trigram_fraction``: the word 3-gram found in the most completions and the fraction of completions
    containing it (a policy collapsing onto one stock phrase drives it up).
    """
    from collections import Counter

    toks = [t.lower().split() for t in texts]
    uni = [w for t in toks for w in t]
    bi = [b for t in toks for b in zip(t, t[1:])]
    tri = Counter(g for t in toks for g in set(zip(t, t[1:], t[2:])))
    top, top_n = tri.most_common(1)[0] if tri else ((), 0)
    n = max(len(texts), 1)
    return {"distinct_1": len(set(uni)) / max(len(uni), 1), "distinct_2": len(set(bi)) / max(len(bi), 1),
            "unique": len({" ".join(t) for t in toks}) / n, "top_trigram": " ".join(top),
            "top_trigram_fraction": top_n / n}


# ----------------------------------------------------------------------------------------------- stages


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


def _write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
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


def _ppo(sizes: DemoSizes, out: Path, seed: int, prompts: list[str], progress: bool, threads: int,
         reward_model: str | None = None, reward_fn: str | None = None) -> dict[str, float]:
    from proxrl.lm.ppo import train_ppo
    from proxrl.lm.ppo_config import PPOConfig

    cfg = PPOConfig(policy=str(out / "sft"), reward_model=reward_model, reward_fn=reward_fn,
                    run_dir=str(out / "ppo"), seed=seed, total_updates=sizes.ppo_updates,
                    rollout_size=sizes.ppo_rollout, minibatch_size=sizes.ppo_minibatch, epochs=sizes.ppo_epochs,
                    learning_rate=sizes.ppo_lr, kl_coef=sizes.kl_coef, adaptive_kl=sizes.adaptive_kl,
                    kl_target=sizes.kl_target, kl_horizon=sizes.kl_horizon, entropy_coef=sizes.entropy_coef,
                    max_new_tokens=sizes.max_new_tokens,
                    temperature=sizes.temperature, max_prompt_length=sizes.max_length,
                    sample_every=0, checkpoint_every=0, threads=threads)
    return train_ppo(cfg, prompts, progress=progress)


def _side_by_side(rows: list[tuple[str, str, float, str, float]], metric: str, prompt_w: int = 18,
                  col_w: int = 40) -> list[str]:
    """Before/after samples as a table: prompt | SFT completion | PPO completion (wrapped, each with its score)."""
    import textwrap

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
    from proxrl.lm.models import load_causal_lm, load_tokenizer

    return load_causal_lm(path), load_tokenizer(path)


def evaluate_sentiment(policy: Any, ref: Any, tokenizer: Any, rm_model: Any, prompts: Sequence[str],
                       sizes: DemoSizes, seed: int) -> dict[str, Any]:
    """Sample one completion per held-out prompt from the SFT model (``ref``) and from ``policy`` (same seed) and
    measure both sets: mean VADER, fraction positive, reward-model score, KL(model || SFT) in nats per completion,
    EOS rate and :func:`diversity`.

    Returns ``{"before": metrics, "after": metrics, "completions": {"before": [...], "after": [...]},
    "vader": {"before": [...], "after": [...]}}``.
    """
    from proxrl.lm.reward_model import encode_pair_side, score_sequences
    from proxrl.lm.tasks import sentiment as S

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(max_new_tokens=sizes.max_new_tokens, temperature=sizes.temperature, seed=seed)
    out: dict[str, Any] = {"completions": {}, "vader": {}}
    for name, model in (("before", ref), ("after", policy)):
        s = sample(model, tokenizer, prompts, ref_model=ref, **kw)
        vader = S.vader_scores(s["completions"])
        # as PPO scores them: the EOS token is part of a finished completion
        seqs = [encode_pair_side(tokenizer, p, c, sizes.max_length + sizes.max_new_tokens + 1, f)
                for p, c, f in zip(prompts, s["completions"], s["finished"])]
        rms = score_sequences(rm_model, seqs, pad).tolist()
        out[name] = {"vader": _mean(vader), "vader_positive_fraction": _mean([float(v > 0.05) for v in vader]),
                     "rm_score": _mean(rms), "kl_to_sft": _mean(s["kl"]),
                     "finished_fraction": _mean([float(f) for f in s["finished"]]),
                     **diversity(s["completions"])}
        out["completions"][name] = s["completions"]
        out["vader"][name] = vader
    return out


def sentiment_metric_lines(ev: dict[str, Any], sizes: DemoSizes, n_prompts: int) -> list[str]:
    """The human-readable result lines of :func:`evaluate_sentiment` (printed and written to summary.md)."""
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
    from proxrl.lm import models as M
    from proxrl.lm.reward_model import RewardModelConfig, train_reward_model
    from proxrl.lm.sft import SFTConfig, train_sft
    from proxrl.lm.tasks import sentiment as S

    seed = cfg.seed
    with timer.stage("data + tokenizer"):
        train_s, held_s = S.split_sentences(seed=seed)
        if sizes.sft_examples:
            train_s = train_s[: sizes.sft_examples]
        rng = random.Random(seed)
        # prompts for pairs / PPO come from the SFT training sentences; evaluation prompts from held-out ones
        train_prompts = S.make_prompts(train_s, seed=seed)
        rng.shuffle(train_prompts)
        eval_prompts = S.make_prompts(held_s, seed=seed + 1)[: sizes.eval_prompts]
        _write_lines(out / "data" / "sft_train.txt", train_s)
        _write_jsonl(out / "data" / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
        M.train_bpe_tokenizer(train_s, sizes.vocab_size, out_dir=out / "tokenizer")
        print(f"   {len(train_s)} training sentences (Jane Austen, public domain), {len(eval_prompts)} held-out "
              f"prompts, BPE vocabulary {sizes.vocab_size}")

    with timer.stage("SFT (tiny GPT-2 trained from scratch)"):
        sft = train_sft(SFTConfig(
            data=str(out / "data" / "sft_train.txt"), model="tiny-gpt2", tokenizer=str(out / "tokenizer"),
            run_dir=str(out / "sft"), n_layer=sizes.n_layer, n_embd=sizes.n_embd, n_head=sizes.n_head,
            n_positions=sizes.n_positions, max_length=sizes.max_length, max_steps=sizes.sft_steps,
            batch_size=sizes.sft_batch, learning_rate=sizes.sft_lr, eval_every=max(1, sizes.sft_steps // 4),
            seed=seed, progress=cfg.progress), progress=cfg.progress)

    with timer.stage("preference pairs (SFT samples labelled by VADER)"):
        sft_model, tok = _load(out / "sft")
        pair_prompts = train_prompts[: sizes.pair_prompts]
        # quick mode's barely trained model rarely says anything VADER can score: accept ties there (smoke test)
        pairs = synthesize_pairs(sft_model, tok, pair_prompts, S.vader_scores,
                                 samples_per_prompt=sizes.pair_samples, max_new_tokens=sizes.max_new_tokens,
                                 temperature=sizes.temperature, seed=seed, min_gap=0.0 if cfg.quick else 0.05)
        if len(pairs) < 4:
            raise UserError(f"only {len(pairs)} preference pairs could be labelled; use more prompts (not --quick)")
        _write_jsonl(out / "data" / "pairs.jsonl", pairs)
        print(f"   {len(pairs)} pairs from {len(pair_prompts)} prompts x {sizes.pair_samples} samples "
              f"(mean VADER chosen {_mean([p['score_chosen'] for p in pairs]):+.2f}, "
              f"rejected {_mean([p['score_rejected'] for p in pairs]):+.2f})")

    with timer.stage("reward model (Bradley-Terry on the pairs)"):
        rm = train_reward_model(RewardModelConfig(
            data=str(out / "data" / "pairs.jsonl"), model=str(out / "sft"), run_dir=str(out / "reward_model"),
            max_length=sizes.max_length + sizes.max_new_tokens, epochs=sizes.rm_epochs, batch_size=sizes.rm_batch,
            learning_rate=sizes.rm_lr, eval_fraction=0.15, eval_every=50, seed=seed, progress=cfg.progress),
            progress=cfg.progress)

    with timer.stage("PPO against the reward model"):
        ppo_prompts = train_prompts[sizes.pair_prompts:] or train_prompts
        ppo = _ppo(sizes, out, seed, ppo_prompts, cfg.progress, cfg.threads, reward_model=str(out / "reward_model"))

    with timer.stage("evaluation on held-out prompts"):
        policy, _ = _load(out / "ppo" / "policy")
        rm_model = M.load_scalar_model(out / "reward_model")
        ev = evaluate_sentiment(policy, sft_model, tok, rm_model, eval_prompts, sizes, seed + 7)
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
    from proxrl.lm.sft import SFTConfig, train_sft
    from proxrl.lm.tasks import arithmetic as A

    seed = cfg.seed
    with timer.stage("data + tokenizer"):
        held = A.held_out_problems(seed)[: sizes.eval_prompts]
        eval_prompts = [A.format_prompt(a, b) for a, b in held]
        # every problem outside the held-out set: SFT sees sft_examples of them, PPO prompts are drawn from all
        train_pairs = A.train_problems(10 ** 6, seed=seed)
        sft_pairs, ppo_pairs = train_pairs[: sizes.sft_examples], train_pairs
        _write_jsonl(out / "data" / "sft_train.jsonl", A.sft_records(sft_pairs, sizes.carry_error, seed=seed))
        _write_jsonl(out / "data" / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])
        A.build_char_tokenizer(out / "tokenizer")
        print(f"   {len(sft_pairs)} SFT problems (operands 0-{10 ** A.DIGITS - 1}), {len(ppo_pairs)} PPO prompts, "
              f"{len(eval_prompts)} held-out problems; character tokenizer;\n"
              f"   the SFT labeller drops the carries of {sizes.carry_error:.0%} of the problems that carry "
              f"(PPO's exact-match checker has to fix that)")

    with timer.stage("SFT (tiny GPT-2 trained from scratch, stopped early)"):
        sft = train_sft(SFTConfig(
            data=str(out / "data" / "sft_train.jsonl"), model="tiny-gpt2", tokenizer=str(out / "tokenizer"),
            run_dir=str(out / "sft"), n_layer=sizes.n_layer, n_embd=sizes.n_embd, n_head=sizes.n_head,
            n_positions=sizes.n_positions, max_length=sizes.max_length, max_steps=sizes.sft_steps,
            batch_size=sizes.sft_batch, learning_rate=sizes.sft_lr, eval_every=max(1, sizes.sft_steps // 4),
            seed=seed, progress=cfg.progress), progress=cfg.progress)

    with timer.stage("PPO with the exact-match reward"):
        ppo_prompts = [A.format_prompt(a, b) for a, b in ppo_pairs]
        ppo = _ppo(sizes, out, seed, ppo_prompts, cfg.progress, cfg.threads,
                   reward_fn="proxrl.lm.tasks.arithmetic:reward_fn")

    with timer.stage("evaluation on held-out problems"):
        ref, tok = _load(out / "sft")
        policy, _ = _load(out / "ppo" / "policy")
        res: dict[str, Any] = {}
        outs = {}
        for name, m in (("before", ref), ("after", policy)):
            g = sample(m, tok, eval_prompts, max_new_tokens=sizes.max_new_tokens, temperature=0.0, seed=seed)
            s = sample(m, tok, eval_prompts, max_new_tokens=sizes.max_new_tokens, temperature=sizes.temperature,
                       seed=seed + 7, ref_model=ref)
            corr = A.reward_fn(eval_prompts, g["completions"])
            res[name] = {"accuracy_greedy": _mean(corr),
                         "accuracy_sampled": A.accuracy(eval_prompts, s["completions"]),
                         "kl_to_sft": _mean(s["kl"])}
            outs[name] = (g["completions"], corr)
        order = sorted(range(len(eval_prompts)), key=lambda i: (outs["before"][1][i] - outs["after"][1][i], i))
        rows = [(eval_prompts[i], outs["before"][0][i], outs["before"][1][i], outs["after"][0][i],
                 outs["after"][1][i]) for i in order[: cfg.samples]]
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
    import torch

    out = Path(cfg.run_dir or f"runs/demo_{cfg.task}_{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {str(out)!r} already exists and is not empty; choose another --run-dir")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    from transformers.utils import logging as hf_logging

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
