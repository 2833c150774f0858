"""Held-out evaluation of a policy against a reference (``proxrl evaluate``; PPO's ``--eval-prompts``).

On each prompt, one completion is sampled from the policy and, with a reference, one from the reference with the
same seed; both are scored by the same scorer. Measured (:func:`evaluate_policy`):

* ``reward_mean`` / ``reward_std``: the scorer's output on the policy's completions (population std, ddof 0);
* ``ref_kl`` / ``ref_kl_k3``: KL(policy || reference) in nats per sequence, the mean over the policy's samples of
  the per-sequence sum of Schulman's per-token k1 (``log pi - log ref``) and k3 (``r - 1 - log r``,
  ``r = ref / pi``) estimators, with both log-probs from a full forward (:func:`proxrl.lm.logprobs.response_forward`)
  at the sampling temperature (at 1 when greedy), as PPO's own ``ref_kl`` / ``ref_kl_k3``. A policy identical to
  its reference gives exactly 0;
* ``response_length`` (tokens, EOS / end-of-turn included) and ``eos_rate`` (completions that ended by
  themselves rather than at ``max_new_tokens``);
* ``distinct_1`` / ``distinct_2``: :func:`proxrl.lm.evaluation.diversity` of the completions;
* ``win_rate``: the fraction of prompts where the policy's reward beats the reference's (ties count half);
* the same reward, length and diversity figures of the reference under ``ref_*`` names.

:func:`run_evaluate` is the command: it loads the models, prompts and scorer of an :class:`EvaluateConfig`, and
writes ``report.json``, ``rewards.png`` (reward histograms, reference "before" vs policy "after"), ``samples.md``
(side-by-side table) and ``completions.jsonl`` (every prompt, both completions, rewards, KL) into ``--out``.
Nothing is written before every input has been validated and the evaluation has finished.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from proxrl import distributed as D
from proxrl.core import kl_estimate
from proxrl.errors import UserError
from proxrl.lm.chat import Prompt, end_of_turn_token_ids, is_conversational, require_template, resolve_chat_template
from proxrl.lm.evaluate_config import EvaluateConfig
from proxrl.lm.evaluation import diversity
from proxrl.lm.generation import generate
from proxrl.lm.heads import PolicyWithValueHead, model_device, unwrap_model
from proxrl.lm.loading import load_causal_lm
from proxrl.lm.logprobs import response_forward
from proxrl.lm.positions import left_pad
from proxrl.lm.prompts import load_prompts, prompt_texts, tokenize_prompts
from proxrl.lm.reference import reference_context
from proxrl.lm.rewards import load_reward_fn
from proxrl.lm.scoring import (
    REWARD_MODEL_NAME,
    ScoreFn,
    Scorer,
    move_scorer,
    reward_fn_component,
    reward_model_component,
)
from proxrl.lm.tokenization import check_tokenizer_fits, load_tokenizer
from proxrl.runs import atomic_write

__all__ = ["SideSamples", "evaluate_policy", "sample_side", "prepare_prompts", "load_eval_prompts",
           "make_eval_scorer", "run_evaluate", "write_report", "REPORT_FILE", "PLOT_FILE", "SAMPLES_FILE",
           "COMPLETIONS_FILE"]

REPORT_FILE = "report.json"
PLOT_FILE = "rewards.png"
SAMPLES_FILE = "samples.md"
COMPLETIONS_FILE = "completions.jsonl"


@dataclass
class SideSamples:
    """One model's completions of N prompts, scored (and, for the policy with a reference, its KL to it).

    Attributes:
        completions: N decoded completions (special tokens skipped).
        scores: (N,) float32 scorer outputs.
        lengths: (N,) long response tokens (EOS / end-of-turn included).
        finished: (N,) bool, the completion ended by EOS / end-of-turn / a stop string.
        kl_k1, kl_k3: (N,) float32 per-sequence sums of the per-token k1 / k3 estimators of KL(model || reference)
            on these samples; None without a reference.
    """

    completions: list[str]
    scores: Tensor
    lengths: Tensor
    finished: Tensor
    kl_k1: Tensor | None = None
    kl_k3: Tensor | None = None


def _lm(model: Any) -> Any:
    return model.policy if isinstance(model, PolicyWithValueHead) else model


def prepare_prompts(tokenizer: Any, template: str | None, prompts: Sequence[Prompt],
                    max_prompt_length: int) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt as PPO tokenizes them (:func:`proxrl.lm.prompts.tokenize_prompts`: rendered with the
    generation prompt when ``template`` is set, its last ``max_prompt_length`` tokens; an empty prompt starts from
    BOS, else EOS) and the prompt text a reward function is given (a string prompt as it is, a list of messages as
    rendered)."""
    return (tokenize_prompts(tokenizer, prompts, max_prompt_length, template),
            prompt_texts(tokenizer, template, prompts))


@torch.no_grad()
def sample_side(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], prompts: Sequence[Prompt],
                scorer: ScoreFn, *, max_new_tokens: int, temperature: float, seed: int, batch_size: int,
                eos_token_id: int | Sequence[int] | None, stop_strings: Sequence[str] = (),
                kl_reference: Any = None, is_reference: bool = False) -> SideSamples:
    """Sample one completion per prompt from ``model`` in batches of ``batch_size`` left-padded prompts, and score.

    Args:
        model: a causal LM (HF, PEFT or :class:`~proxrl.lm.heads.PolicyWithValueHead`).
        prompt_ids: N token-id lists; prompts: the N prompts (strings or lists of messages) given to ``scorer``.
        scorer: ``scorer(input_ids, attention_mask, prompt_len, response_mask, prompts, completions) -> (B,)``
            (:data:`proxrl.lm.scoring.ScoreFn`).
        temperature: > 0 samples, 0 is greedy. seed: seeds a fresh ``torch.Generator`` (no global RNG is touched),
            so two models sampled with the same seed and batches use the same random numbers.
        kl_reference: a reference model: the per-sequence k1/k3 KL(model || reference) is measured on the samples,
            the reference being called inside :func:`~proxrl.lm.reference.reference_context` (a LoRA policy's
            adapters are off there).
        is_reference: ``model`` is itself a reference: sampled inside ``reference_context``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lp_temp = temperature if temperature > 0 else 1.0
    completions: list[str] = []
    scores, lengths, finished, k1s, k3s = [], [], [], [], []
    for start in range(0, len(prompt_ids), batch_size):
        ids, mask = left_pad(list(prompt_ids[start:start + batch_size]), pad if pad is not None else 0)
        ids, mask = ids.to(device), mask.to(device)
        # on an accelerator the uniforms come from the same CPU generator, drawn for the batch at once
        uniforms = None if device.type == "cpu" else torch.rand(
            (max_new_tokens, ids.shape[0]), generator=gen, dtype=torch.float64).to(device)
        texts = list(prompts[start:start + batch_size])
        if is_reference:
            with reference_context(model) as ref:
                g = generate(ref, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                             eos_token_id=eos_token_id, stop_strings=tuple(stop_strings), tokenizer=tokenizer,
                             generator=gen, uniforms=uniforms)
        else:
            g = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                         eos_token_id=eos_token_id, stop_strings=tuple(stop_strings), tokenizer=tokenizer,
                         generator=gen, uniforms=uniforms)
        seqs, attn, p = g.sequences.clone(), g.attention_mask.long().clone(), int(g.prompt_len)
        rmask = g.response_mask.float().clone()
        comps = [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                 for r, m in zip(seqs[:, p:], rmask)]
        s = scorer(seqs, attn, p, rmask, texts, comps)
        s = torch.as_tensor(s).detach().float().reshape(-1).cpu()
        if s.shape[0] != len(comps):
            raise ValueError(f"scorer returned {s.shape[0]} scores for {len(comps)} completions")
        if kl_reference is not None:
            lp = response_forward(_lm(model), seqs, attn, p, lp_temp).logprobs
            with reference_context(kl_reference) as ref:
                ref_lp = response_forward(ref, seqs, attn, p, lp_temp).logprobs
            k1s.append((kl_estimate(lp, ref_lp, "k1") * rmask).sum(1).float().cpu())
            k3s.append((kl_estimate(lp, ref_lp, "k3") * rmask).sum(1).float().cpu())
        completions += comps
        scores.append(s)
        lengths.append(rmask.sum(1).long().cpu())
        finished.append(g.finished.bool().cpu())
    return SideSamples(completions=completions, scores=torch.cat(scores), lengths=torch.cat(lengths),
                       finished=torch.cat(finished), kl_k1=torch.cat(k1s) if k1s else None,
                       kl_k3=torch.cat(k3s) if k3s else None)


def _side_metrics(side: SideSamples, prefix: str = "") -> dict[str, float]:
    div = diversity(side.completions)
    s = side.scores.double()
    return {f"{prefix}reward_mean": float(s.mean()),
            f"{prefix}reward_std": float(s.std(unbiased=False)),
            f"{prefix}response_length": float(side.lengths.double().mean()),
            f"{prefix}eos_rate": float(side.finished.double().mean()),
            f"{prefix}distinct_1": float(div["distinct_1"]),
            f"{prefix}distinct_2": float(div["distinct_2"])}


def win_rate(policy_scores: Tensor, reference_scores: Tensor) -> float:
    """Fraction of paired samples where the policy's score is higher than the reference's; ties count half."""
    if policy_scores.shape != reference_scores.shape or policy_scores.dim() != 1:
        raise ValueError(f"scores {tuple(policy_scores.shape)} and {tuple(reference_scores.shape)} must be (N,)")
    wins = (policy_scores > reference_scores).double() + 0.5 * (policy_scores == reference_scores).double()
    return float(wins.mean())


def evaluate_policy(policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[Prompt], scorer: ScoreFn, *,
                    template: str | None = None, max_new_tokens: int = 32, temperature: float = 0.7,
                    seed: int = 0, batch_size: int = 16, max_prompt_length: int = 256,
                    stop_strings: Sequence[str] = (), eos_token_id: int | Sequence[int] | None = None,
                    cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``policy`` (and compare it with ``reference``) on held-out ``prompts``; see the module docstring.

    Args:
        policy: a causal LM (HF, PEFT LoRA or :class:`~proxrl.lm.heads.PolicyWithValueHead`); left in the mode it
            was in (generation restores it; the log-prob forwards run under ``no_grad``).
        reference: the reference causal LM (a LoRA policy itself with its adapters off inside
            ``reference_context``, as PPO's ``ModelSet.ref``), or None for policy-only metrics.
        tokenizer: the policy's (and reference's) tokenizer.
        prompts: N prompt strings or lists of messages.
        scorer: :data:`proxrl.lm.scoring.ScoreFn` (``make_scorer``'s, or :func:`make_eval_scorer`'s).
        template: the resolved chat template (:func:`~proxrl.lm.chat.resolve_chat_template`) or None.
        eos_token_id: what ends a completion; default ``end_of_turn_token_ids(tokenizer, template)``.
        cache: a dict the caller keeps between calls with the same arguments (PPO's ``--eval-every``): the
            reference's samples and scores are stored there on the first call and reused (the reference does
            not change; its samples are identical with the same seed).

    Returns:
        ``{"metrics": {name: float}, "samples": [{"prompt", "completion", "reward", "length", "finished",
        "kl_k1", "kl_k3", "reference_completion", "reference_reward", ...}, ...], "settings": {...}}``.
        ``metrics`` holds ``reward_mean, reward_std, response_length, eos_rate, distinct_1, distinct_2`` and, with
        a reference, ``ref_kl, ref_kl_k3, win_rate, ref_reward_mean, ref_reward_std, ref_response_length,
        ref_eos_rate, ref_distinct_1, ref_distinct_2`` (log them as ``eval/<name>``).
    """
    if not prompts:
        raise UserError("no prompts to evaluate on; give at least one")
    if eos_token_id is None:
        eos_token_id = end_of_turn_token_ids(tokenizer, template) or None
    ids, texts = prepare_prompts(tokenizer, template, prompts, max_prompt_length)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
              eos_token_id=eos_token_id, stop_strings=tuple(stop_strings))
    pol = sample_side(policy, tokenizer, ids, prompts, scorer, kl_reference=reference, **kw)
    metrics = _side_metrics(pol)
    ref: SideSamples | None = None
    if reference is not None:
        key = json.dumps([ids, {k: v if not isinstance(v, tuple) else list(v) for k, v in kw.items()}],
                         default=str)
        if cache is not None and cache.get("key") == key:
            ref = cache["reference"]
        else:
            ref = sample_side(reference, tokenizer, ids, prompts, scorer, is_reference=True, **kw)
            if cache is not None:
                cache.update(key=key, reference=ref)
        assert pol.kl_k1 is not None and pol.kl_k3 is not None
        metrics.update(ref_kl=float(pol.kl_k1.double().mean()), ref_kl_k3=float(pol.kl_k3.double().mean()),
                       win_rate=win_rate(pol.scores, ref.scores))
        metrics.update(_side_metrics(ref, "ref_"))
    samples = []
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": texts[i] if isinstance(prompt, str) else list(prompt),
                               "completion": pol.completions[i], "reward": float(pol.scores[i]),
                               "length": int(pol.lengths[i]), "finished": bool(pol.finished[i])}
        if ref is not None:
            assert pol.kl_k1 is not None and pol.kl_k3 is not None
            row.update(kl_k1=float(pol.kl_k1[i]), kl_k3=float(pol.kl_k3[i]),
                       reference_completion=ref.completions[i], reference_reward=float(ref.scores[i]),
                       reference_length=int(ref.lengths[i]), reference_finished=bool(ref.finished[i]))
        samples.append(row)
    settings = {"num_prompts": len(prompts), "max_new_tokens": max_new_tokens, "temperature": temperature,
                "kl_logprob_temperature": temperature if temperature > 0 else 1.0, "seed": seed,
                "batch_size": batch_size, "max_prompt_length": max_prompt_length, "chat_template": template,
                "stop_strings": list(stop_strings), "reference": reference is not None}
    return {"metrics": metrics, "samples": samples, "settings": settings}


# ----------------------------------------------------------------------------------------------- the command


def load_eval_prompts(spec: str, column: str = "prompt", num_prompts: int = 0) -> list[Prompt]:
    """Held-out prompts: a built-in task name (its held-out split) or a data source read by
    :func:`proxrl.lm.data.load_rows` (a ``column`` holding a string or a list of messages per row); the first
    ``num_prompts`` (0 = all)."""
    out = load_prompts(spec, None, None, column, split="eval")
    return out[:num_prompts] if num_prompts else out


def make_eval_scorer(tokenizer: Any, *, reward_model: str | None = None, reward_fn: Any = None,
                     reward_timeout: float | None = 300.0, trust_remote_code: bool = False,
                     template: str | None = None, reward_model_chat_template: str = "auto") -> Scorer:
    """The scorer of an evaluation: a reward function (a ``"module:function"`` spec or a callable, called through
    :func:`~proxrl.lm.rewards.call_reward_fn` with ``reward_timeout`` and its real-number checks) or a reward
    model directory (:func:`~proxrl.lm.scoring.reward_model_component`: one with its own tokenizer or chat
    template gets the completions re-encoded). Exactly one must be given. ``tokenizer`` / ``template``: the
    policy's."""
    if (reward_model is None) == (reward_fn is None):
        raise UserError("give exactly one of --reward-model DIR or --reward-fn module:function (got "
                        + ("both" if reward_model is not None else "neither") + ")")
    if reward_fn is not None:
        fn = load_reward_fn(reward_fn) if isinstance(reward_fn, str) else reward_fn
        name = getattr(fn, "spec", None) or getattr(fn, "__name__", "reward_fn")
        return Scorer([(str(name), 1.0, reward_fn_component(fn, tokenizer, template, reward_timeout))])
    path = Path(str(reward_model)).expanduser()
    if not path.is_dir():
        raise UserError(f"reward model directory {str(reward_model)!r} does not exist; pass a directory written by "
                        f"`proxrl reward-model` (RUN_DIR/reward_model or similar)")
    return Scorer([(REWARD_MODEL_NAME, 1.0, reward_model_component(
        str(path), tokenizer, template, chat_template=reward_model_chat_template,
        trust_remote_code=trust_remote_code))])


def _model_dir(path: str | None, flag: str, what: str, example: str) -> Path:
    if not path:
        raise UserError(f"no {what}: give {flag} DIR (a causal LM saved with save_pretrained)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{what} directory {path!r} does not exist; give {flag} DIR (a causal LM saved with "
                        f"save_pretrained, e.g. {example})")
    return p


def _check_context(model: Any, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, what: str) -> None:
    cfg = unwrap_model(model).config
    ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    longest = max(len(t) for t in prompt_ids)
    if ctx is not None and longest + max_new_tokens > ctx:
        raise UserError(f"prompts of up to {longest} tokens + --max-new-tokens {max_new_tokens} exceed the {what}'s "
                        f"context of {ctx} tokens; lower --max-prompt-length or --max-new-tokens")


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """``proxrl evaluate``: load, validate, evaluate, then write the report files into ``cfg.out``.

    Returns the report written to ``report.json`` (``{"metrics", "settings", "policy", "reference", "prompts",
    "files"}``).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = D.resolve_device(cfg.device)
    D.configure_device(device)
    policy_dir = _model_dir(cfg.policy, "--policy", "policy", "a PPO run's RUN_DIR/policy")
    ref_dir = _model_dir(cfg.reference, "--reference", "reference", "the SFT model PPO started from") \
        if cfg.reference else None
    reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None  # a bad spec fails before any model loads
    prompts = load_eval_prompts(cfg.prompts, cfg.prompt_column, cfg.num_prompts)
    tok = load_tokenizer(policy_dir)
    template = resolve_chat_template(tok, cfg.chat_template)
    require_template(template, cfg.chat_template, any(is_conversational(p) for p in prompts),
                     f"the policy's tokenizer in {str(cfg.policy)!r}")
    ids, _ = prepare_prompts(tok, template, prompts, cfg.max_prompt_length)
    scorer = make_eval_scorer(tok, reward_model=cfg.reward_model, reward_fn=reward_fn,
                              reward_timeout=cfg.reward_timeout, trust_remote_code=cfg.trust_remote_code,
                              template=template)
    policy = load_causal_lm(policy_dir, trust_remote_code=cfg.trust_remote_code)
    check_tokenizer_fits(policy, tok, policy_dir, what="policy")
    _check_context(policy, ids, cfg.max_new_tokens, "policy")
    reference = None
    if ref_dir is not None:
        reference = load_causal_lm(ref_dir, trust_remote_code=cfg.trust_remote_code)
        # the KL compares token distributions: the reference must read the policy's token ids
        check_tokenizer_fits(reference, tok, ref_dir, what="reference")
        _check_context(reference, ids, cfg.max_new_tokens, "reference")
    policy.to(device)
    if reference is not None:
        reference.to(device)
    move_scorer(scorer, device)
    result = evaluate_policy(policy, reference, tok, prompts, scorer, template=template,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                             batch_size=cfg.batch_size, max_prompt_length=cfg.max_prompt_length,
                             stop_strings=cfg.stop_string_list)
    report = {"metrics": result["metrics"], "settings": {**result["settings"], "device": str(device)},
              "policy": str(cfg.policy),
              "reference": cfg.reference, "prompts": cfg.prompts,
              "scorer": cfg.reward_fn if cfg.reward_fn else f"reward model {cfg.reward_model}"}
    return write_report(cfg.out, report, result["samples"], sample_rows=cfg.sample_rows)


def _cell(s: Any) -> str:
    s = s if isinstance(s, str) else json.dumps(s, ensure_ascii=False)
    s = s.replace("|", "\\|").replace("\n", "\u21b5")
    return s if len(s) <= 120 else s[:117] + "..."


def samples_table(samples: Sequence[dict[str, Any]], rows: int) -> str:
    """Markdown table of the first ``rows`` samples: prompt, policy completion and reward (and the reference's)."""
    with_ref = bool(samples) and "reference_completion" in samples[0]
    if with_ref:
        lines = ["| # | prompt | policy | reward | reference | reward | KL k1 |", "|---|---|---|---|---|---|---|"]
    else:
        lines = ["| # | prompt | policy | reward |", "|---|---|---|---|"]
    for i, r in enumerate(samples[:rows]):
        line = f"| {i} | {_cell(r['prompt'])} | {_cell(r['completion'])} | {r['reward']:.4g} |"
        if with_ref:
            line += f" {_cell(r['reference_completion'])} | {r['reference_reward']:.4g} | {r['kl_k1']:.4g} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_rewards(path: str | Path, policy_scores: Sequence[float], reference_scores: Sequence[float] | None,
                 title: str = "Held-out rewards") -> Path:
    """PNG of the reward histograms, reference ("before") and policy ("after") on shared bins, means dashed."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series = [("policy (after)", list(policy_scores), "tab:blue")]
    if reference_scores is not None:
        series.insert(0, ("reference (before)", list(reference_scores), "tab:gray"))
    allv = [v for _, vs, _ in series for v in vs]
    lo, hi = min(allv), max(allv)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * k / 20 for k in range(21)]
    for label, vs, color in series:
        m = sum(vs) / len(vs)
        ax.hist(vs, bins=bins, alpha=0.55, color=color, label=f"{label}: mean {m:.3g}")
        ax.axvline(m, color=color, linestyle="--", linewidth=1.2)
    ax.set_xlabel("reward")
    ax.set_ylabel("completions")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    canvas.print_png(buf)
    return atomic_write(path, buf.getvalue())


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_report(out: str | Path, report: dict[str, Any], samples: Sequence[dict[str, Any]],
                 sample_rows: int = 8) -> dict[str, Any]:
    """Write ``report.json`` (``report`` plus the names of the files), ``rewards.png``, ``samples.md`` and
    ``completions.jsonl`` into ``out`` (each atomically; files of the same names are replaced). Returns the
    report as written."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a directory; give a directory for the report")
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report, files=[REPORT_FILE, PLOT_FILE, SAMPLES_FILE, COMPLETIONS_FILE])
    ref = [s["reference_reward"] for s in samples] if samples and "reference_reward" in samples[0] else None
    m = report["metrics"]
    title = f"Held-out rewards ({len(samples)} prompts)"
    if "win_rate" in m:
        title += f": win rate {m['win_rate']:.2f}, KL {m['ref_kl']:.3g} nats"
    plot_rewards(out / PLOT_FILE, [s["reward"] for s in samples], ref, title=title)
    head = [f"# Held-out evaluation of {report.get('policy', 'the policy')}", "",
            f"{len(samples)} prompts; reward {m['reward_mean']:.4g} +- {m['reward_std']:.4g}"]
    if "win_rate" in m:
        head[-1] += (f" (reference {m['ref_reward_mean']:.4g} +- {m['ref_reward_std']:.4g}); win rate "
                     f"{m['win_rate']:.3f}; KL k1 {m['ref_kl']:.4g}, k3 {m['ref_kl_k3']:.4g} nats")
    atomic_write(out / SAMPLES_FILE, "\n".join(head) + "\n\n" + samples_table(samples, sample_rows))
    atomic_write(out / COMPLETIONS_FILE,
                 "".join(json.dumps(_json_safe(s), ensure_ascii=False) + "\n" for s in samples))
    atomic_write(out / REPORT_FILE, json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n")
    return report
