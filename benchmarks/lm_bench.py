"""LM PPO, proxrl vs TRL, side by side on one CPU workload (see benchmarks/README.md, "LM PPO vs TRL").

Workload (``_lm_workload.py``, identical on both sides: same tokens, same initial weights): random-init GPT-2
"small" (2 layers, d=128, 0.54M parameters) and "large" (6 layers, d=512, 19.5M), 4 heads, byte-level BPE vocab
1024 trained on CPython's pydoc_data topics; per update 64 prompts of 8-16 tokens, 32 sampled tokens (T=1, no stop
token), separate frozen reference, critic and reward model, k1 KL penalty in the reward (coef 0.05), GAE
(gamma 1, lambda 0.95), 4 PPO epochs x 4 minibatches of 16 = 16 AdamW steps per update, lr 1e-5, no gradient
clipping (TRL's PPO loop does none).

Sides, each run in its own subprocess (separate peak RSS), alternated A/B/A/B within each round:

* ``trl``          TRL 1.12.0's PPOTrainer (``trl.experimental.ppo``), fp32 (``_trl_side.py``);
* ``proxrl``       proxrl's ``PPOTrainer`` with TRL's settings: fp32, separate critic;
* ``proxrl_fast``  proxrl's fast options: bf16 autocast and the value head on the policy trunk (no separate
                   critic model: a different, cheaper algorithm variant; reported separately).

Per update (after ``--warmup`` updates): wall seconds from the end of the previous update to the end of this one,
tokens/s = 64 x 32 generated tokens / update seconds, the split generation / scoring (reference, critic and
reward forwards, advantages) / training, peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` read at the end of the
last update, before any final checkpoint or plot), and model-FLOPs utilisation: model FLOPs (``2 N`` per
processed position per forward, ``6 N`` per trained position; N = matmul weights, see
``_lm_workload.update_flops``) / update seconds / the dense matmul peak measured in the same run.

Usage:
    python benchmarks/lm_bench.py                       # both sizes, 2 rounds, all three sides
    python benchmarks/lm_bench.py --sizes small --rounds 1 --updates 2     # smoke run
    python benchmarks/lm_bench.py --sizes small --sides proxrl --profile /tmp/prof   # where proxrl's time goes
    python benchmarks/lm_bench.py --sides trl,proxrl,proxrl+adam_fused+gelu_fused     # what-if experiments
Needs ``pip install "trl==1.12.0" datasets`` for the TRL side (``--sides proxrl,proxrl_fast`` runs without).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _lm_workload as W  # noqa: E402  (light: imports no torch at module level)

SIDES = ("trl", "proxrl", "proxrl_fast")
DEFAULT_UPDATES = {"small": 6, "large": 3}   # measured updates per run (after the warm-up)
TARGETS = {"small": 4.0, "large": 2.0}      # tokens/s ratio proxrl / TRL asked for by the issue
RSS_TARGET = 0.6                            # peak RSS ratio proxrl / TRL


# ================================================================================ workers (run in subprocesses)
def worker_matmul(threads: int, out: str) -> None:
    """Dense matmul GFLOP/s at ``threads`` threads, fp32 and bf16, n = 512/1024/2048 (best of the sizes)."""
    import torch

    torch.set_num_threads(threads)
    res: dict[str, dict[str, float]] = {}
    for dt in (torch.float32, torch.bfloat16):
        per_n = {}
        for n in (512, 1024, 2048):
            a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
            for _ in range(3):
                a @ b
            reps = max(3, int(2e10 / (2 * n ** 3)))
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            per_n[str(n)] = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
        res[str(dt).replace("torch.", "")] = per_n
    Path(out).write_text(json.dumps({"threads": threads, "gflops": res}))


def worker_prepare(size: str, out_dir: str) -> None:
    W.save_workload(out_dir, **W.CONFIGS[size])


class _NoStopTokenizer:
    """The workload has no stop token (TRL ``stop_token=None``: every response is 32 tokens, EOS included as
    an ordinary token). proxrl's rollout always stops at ``tokenizer.eos_token_id``, so its trainer gets this
    view of the tokenizer with ``eos_token_id = None``; everything else is delegated."""

    eos_token_id = None

    def __init__(self, tok: object) -> None:
        self._tok = tok

    def __getattr__(self, name: str) -> object:
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)


PATCHES = ("adam_fused", "gelu_fused", "gen_values", "bf16", "shared")


def _apply_patches(tr, patches: list[str]) -> None:  # noqa: ANN001
    """What-if experiments for the suggestions in benchmarks/README.md (``--patches``), applied from outside
    proxrl to a constructed trainer; they leave the maths unchanged:

    * ``adam_fused``: AdamW's fused kernel (what TRL gets from transformers' default ``adamw_torch_fused``)
      instead of torch's per-parameter loop, which is the CPU default;
    * ``gelu_fused``: GPT-2's python-composite tanh-GELU (``NewGELUActivation``, 8 elementwise kernels and as
      many saved tensors) replaced by the identical single kernel ``nn.GELU(approximate="tanh")``;
    * ``gen_values`` (shared trunk only): the rollout values from the hidden states of the generation pass
      instead of one more full policy forward;
    * ``bf16`` / ``shared`` (config options, not patches): one of proxrl_fast's two options alone, to tell
      their effects apart (``proxrl+bf16``, ``proxrl+shared``).
    """
    import torch
    from torch import nn

    if "adam_fused" in patches:
        for g in tr.optimizer.param_groups:
            g["fused"], g["foreach"] = True, False
    if "gelu_fused" in patches:
        from transformers.activations import NewGELUActivation

        mods = [tr.models.policy, tr.models.ref, tr.models.critic]
        scorer = getattr(tr.score_fn, "__closure__", None) or ()
        for cell in scorer:
            m = getattr(cell.cell_contents, "model", None)
            if isinstance(m, nn.Module):
                mods.append(m)
        for root in [m for m in mods if m is not None]:
            for mod in list(root.modules()):
                for name, child in list(mod.named_children()):
                    if isinstance(child, NewGELUActivation):
                        setattr(mod, name, nn.GELU(approximate="tanh"))
    if "gen_values" in patches:
        _patch_gen_values()
    del torch


def _patch_gen_values() -> None:
    """Shared-trunk critic: take the rollout values from the final hidden states the generation pass already
    computes (prefill's last position, then each decoding step's input), instead of the extra full policy
    forward ``collect_rollout`` runs for them."""
    import torch

    from proxrl.lm import ppo as P
    from proxrl.lm import rollout as R
    from proxrl.lm.heads import PolicyWithValueHead, unwrap_model
    from proxrl.lm.logprobs import ResponseForward

    stash: dict[str, object] = {}
    orig_generate, orig_rf = R.generate, R.response_forward

    def generate(model, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not isinstance(model, PolicyWithValueHead):
            return orig_generate(model, *args, **kw)
        hs: list[torch.Tensor] = []
        trunk = unwrap_model(model.policy).transformer
        handle = trunk.ln_f.register_forward_hook(lambda mod, inp, out: hs.append(out[:, -1]))
        try:
            out = orig_generate(model, *args, **kw)
        finally:
            handle.remove()
        with torch.inference_mode():
            v = model.value_head(torch.stack(hs[: out.response_mask.shape[1]], 1)).squeeze(-1).float()
        stash["values"] = v.clone()
        return out

    def response_forward(model, input_ids, attention_mask, prompt_len, temperature, **kw):  # noqa: ANN001, ANN003, ANN202
        if isinstance(model, PolicyWithValueHead) and not torch.is_grad_enabled() and "values" in stash:
            v = stash.pop("values")
            return ResponseForward(torch.zeros_like(v), v, None)
        return orig_rf(model, input_ids, attention_mask, prompt_len, temperature, **kw)

    R.generate = generate  # the rollout's generator and the rollout's / update's forward
    R.response_forward = P.response_forward = response_forward


def worker_proxrl(size: str, updates: int, threads: int, fast: bool, workload: str, out: str,
                  profile_dir: str | None, warmup: int, patches: list[str] | None = None) -> None:
    """proxrl's PPOTrainer on the saved workload; one JSON record per update."""
    import torch

    torch.set_num_threads(threads)
    import proxrl
    from proxrl.lm.ppo_config import PPOConfig
    from proxrl.lm.ppo_trainer import PPOTrainer

    patches = list(patches or [])
    bf16 = fast or "bf16" in patches
    shared = fast or "shared" in patches
    wd = Path(workload)
    scorer = "proxrl.lm.rewards.RewardModelScorer"
    prompt_ids = W.load_prompt_ids(wd)
    run_dir = Path(tempfile.mkdtemp(prefix="lm_bench_proxrl_")) / "run"
    cfg = PPOConfig(
        policy=str(wd / "policy"), reward_model=str(wd / "reward"), critic=str(wd / "value"),
        value_head_on_policy=shared, run_dir=str(run_dir), seed=0,
        total_updates=updates, rollout_size=W.BATCH, group_size=1, minibatch_size=W.BATCH // W.MINIBATCHES,
        grad_accum_steps=1, epochs=W.EPOCHS, learning_rate=W.LEARNING_RATE, lr_schedule="linear",
        max_grad_norm=None, gamma=1.0, gae_lambda=0.95, clip_coef=0.2, value_clip_coef=0.2, value_coef=0.1,
        entropy_coef=0.0, kl_coef=W.KL_COEF, max_new_tokens=W.RESPONSE_LEN, temperature=1.0, bf16=bf16,
        threads=threads, sample_every=0, checkpoint_every=0, keep_checkpoints=1,
    )
    t_setup = time.perf_counter()
    tr = PPOTrainer(cfg, prompts=[f"p{i}" for i in range(len(prompt_ids))], progress=False)
    # the exact prompt token ids of the workload (the strings above only satisfy load_prompts)
    tr.prompt_ids = [list(p) for p in prompt_ids]
    tr.tokenizer = _NoStopTokenizer(tr.tokenizer)
    if patches:
        _apply_patches(tr, patches)
    setup_s = time.perf_counter() - t_setup
    policy = tr.models.policy
    lm = policy.policy if hasattr(policy, "value_head") else policy
    checks = {"policy": W.checksum(lm)}
    if tr.models.critic is not None:
        checks["value"] = W.checksum(tr.models.critic)

    records: list[dict] = []
    orig = tr._one_update
    state = {"prev": None}
    prof = None
    if profile_dir:
        import cProfile

        prof = cProfile.Profile()
    torch_prof = None

    def timed_update() -> dict[str, float]:
        nonlocal torch_prof
        i = len(records)
        if state["prev"] is None:
            state["prev"], state["cpu"] = time.perf_counter(), time.process_time()
        profiling = prof is not None and i >= warmup
        if profiling and i == warmup:
            from torch.profiler import ProfilerActivity, profile

            torch_prof = profile(activities=[ProfilerActivity.CPU])
            torch_prof.__enter__()
        if profiling and i > warmup:
            prof.enable()
        m = orig()
        if profiling and i > warmup:
            prof.disable()
        if profiling and i == warmup:
            torch_prof.__exit__(None, None, None)
        t, c = time.perf_counter(), time.process_time()
        total, cpu = t - state["prev"], c - state["cpu"]
        state["prev"], state["cpu"] = t, c
        gen, train = m["time_generation"], m["time_training"]
        records.append({
            "total_s": total, "gen_s": gen, "score_s": m["time_update"] - gen - train, "train_s": train,
            "other_s": total - m["time_update"],
            "forward_s": m["time_forward"], "reward_s": m["time_scoring"],
            "prompt_width": int(tr._last_width), "new_tokens": W.RESPONSE_LEN, "n_seq": W.BATCH,
            "response_tokens": m["response_length"] * W.BATCH, "opt_steps": int(m["optimizer_steps"]), "cpu_s": cpu,
            "ru_maxrss_mb": W.peak_rss_mb(), "vm_hwm_mb": W.vm_hwm_mb(), "profiled": profiling,
        })
        return m

    orig_batch = tr._prompt_batch

    def prompt_batch():  # noqa: ANN202
        ids, mask, prompts = orig_batch()
        tr._last_width = ids.shape[1]
        return ids, mask, prompts

    tr._prompt_batch = prompt_batch
    tr._one_update = timed_update
    hwm_before = W.vm_hwm_mb()
    tr.run()
    import transformers

    result = {
        "side": ("proxrl_fast" if fast else "proxrl") + ("+" + "+".join(patches) if patches else ""),
        "size": size,
        "patches": patches or [],
        **W.CONFIGS[size],
        "policy_params": W.nparams(lm),
        "value_params": W.nparams(tr.models.critic) if tr.models.critic is not None else 0,
        "threads": torch.get_num_threads(),
        "dtype": "bfloat16 autocast" if bf16 else "float32",
        "shared_critic": shared,
        "reward_scorer": scorer,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "proxrl": getattr(proxrl, "__version__", "?"), "git": _git_rev()},
        "checksums": checks,
        "setup_s": setup_s,
        "hwm_before_train_mb": hwm_before,
        "updates": records,
    }
    Path(out).write_text(json.dumps(result, indent=1))
    if prof is not None:
        _write_profiles(prof, torch_prof, Path(profile_dir), f"{result['side']}_{size}", warmup)


def _write_profiles(prof, torch_prof, out_dir: Path, tag: str, warmup: int) -> None:  # noqa: ANN001
    import io
    import pstats

    out_dir.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(str(out_dir / f"{tag}.prof"))
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(45)
        (out_dir / f"{tag}_cprofile_{key}.txt").write_text(
            f"cProfile of updates {warmup + 2}.. (update {warmup + 1} went to torch.profiler)\n" + s.getvalue())
    if torch_prof is not None:
        table = torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
        (out_dir / f"{tag}_torch_ops.txt").write_text(f"torch.profiler, update {warmup + 1}\n" + table)


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


# ================================================================================ parent: orchestration, report
def _run_worker(args: list[str], json_path: Path, timeout: float, log: Path) -> dict | None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        try:
            rc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not json_path.is_file():
        print(f"  !! worker failed ({rc}) after {time.time() - t0:.0f}s; see {log}", flush=True)
        return None
    return json.loads(json_path.read_text())


def _matmul_peak(threads: int, tmp: Path, log: Path) -> dict | None:
    p = tmp / f"matmul_{time.time_ns()}.json"
    return _run_worker([sys.executable, __file__, "--_worker", "matmul", "--threads", str(threads), "--_out", str(p)],
                       p, 300, log)


def _summarise(runs: list[dict], warmup: int, peaks: dict[str, float]) -> dict:
    """Pool the measured updates of all rounds of one (size, side)."""
    steady = [u for r in runs for u in r["updates"][warmup:] if not u.get("profiled")]
    if not steady:
        steady = [u for r in runs for u in r["updates"][-1:]]
    med = {k: statistics.median(u[k] for u in steady) for k in ("total_s", "gen_s", "score_s", "train_s", "other_s", "cpu_s")}
    r0 = runs[0]
    shared = bool(r0["shared_critic"])
    flops = [W.update_flops(r0["n_layer"], r0["n_embd"], u["prompt_width"], shared)["total"] / u["total_s"]
             for u in steady]
    fl = statistics.median(flops)
    peak_key = "bfloat16" if "bfloat16" in r0["dtype"] else "float32"
    per_round_tps = [W.BATCH * W.RESPONSE_LEN / statistics.median(u["total_s"] for u in r["updates"][warmup:] or
                                                                 r["updates"][-1:]) for r in runs]
    return {
        "side": r0["side"], "size": r0["size"], "policy_params": r0["policy_params"],
        "dtype": r0["dtype"], "shared_critic": shared, "n_updates": len(steady), "rounds": len(runs),
        "s_per_update": med["total_s"], "gen_s": med["gen_s"], "score_s": med["score_s"], "train_s": med["train_s"],
        "other_s": med["other_s"], "cpu_s": med["cpu_s"],
        "min_s": min(u["total_s"] for u in steady), "max_s": max(u["total_s"] for u in steady),
        "tok_per_s": W.BATCH * W.RESPONSE_LEN / med["total_s"],
        "tok_per_s_per_round": per_round_tps,
        "peak_rss_mb": max(r["updates"][-1]["ru_maxrss_mb"] for r in runs),
        "peak_rss_mb_per_round": [r["updates"][-1]["ru_maxrss_mb"] for r in runs],
        "vm_hwm_mb": max(r["updates"][-1]["vm_hwm_mb"] for r in runs),
        "rss_setup_mb": statistics.median(r["hwm_before_train_mb"] for r in runs),
        "model_gflops_per_s": fl / 1e9,
        "mfu": fl / 1e9 / peaks[peak_key],
        "mfu_vs": peak_key,
        "checksums": r0["checksums"],
        "versions": r0["versions"],
        "reward_scorer": r0.get("reward_scorer"),
    }


def _report(summ: dict[str, dict[str, dict]], peaks: dict[str, float]) -> str:
    lines = [
        "| config | side | precision / critic | s/update (min-max) | tok/s | gen / score / train s | CPU s/update | "
        "peak RSS MB (after setup) | MFU | tok/s vs TRL | RSS vs TRL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, by_side in summ.items():
        base = by_side.get("trl")
        for side, s in by_side.items():
            crit = "shared trunk" if s["shared_critic"] else "separate critic"
            tr = rr = "-"
            if base is not None and side != "trl":
                tr = f"**{s['tok_per_s'] / base['tok_per_s']:.2f}x**"
                rr = f"{s['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"
            lines.append(
                f"| {size} ({s['policy_params'] / 1e6:.2f}M) | {side} | {s['dtype'].split()[0]}, {crit} | "
                f"{s['s_per_update']:.2f} ({s['min_s']:.2f}-{s['max_s']:.2f}) | {s['tok_per_s']:.0f} | "
                f"{s['gen_s']:.2f} / {s['score_s']:.2f} / {s['train_s']:.2f} | {s['cpu_s']:.2f} | {s['peak_rss_mb']:.0f} ({s['rss_setup_mb']:.0f}) | "
                f"{100 * s['mfu']:.1f}% | {tr} | {rr} |")
    lines.append("")
    lines.append(f"matmul peak (best of n = 512/1024/2048, same run): fp32 {peaks['float32']:.0f} GFLOP/s, "
                 f"bf16 {peaks['bfloat16']:.0f} GFLOP/s; MFU of bf16 runs is against the bf16 peak.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="LM PPO: proxrl vs TRL 1.12 on the same CPU workload",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sizes", default="small,large", help="comma list of: " + ", ".join(W.CONFIGS))
    ap.add_argument("--sides", default=",".join(SIDES),
                    help="comma list of: " + ", ".join(SIDES) + "; a proxrl side may carry what-if patches, "
                         "e.g. proxrl+adam_fused+gelu_fused (" + ", ".join(PATCHES) + ")")
    ap.add_argument("--rounds", type=int, default=2, help="A/B/A/B rounds per size (each side once per round)")
    ap.add_argument("--updates", type=int, default=None,
                    help="measured updates per run, after the warm-up (default: small 6, large 3)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up updates per run, not measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write all raw records and the summary here")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile proxrl's measured updates (torch.profiler op table for the first, cProfile for "
                         "the rest) into DIR; profiled updates are excluded from the timings")
    ap.add_argument("--_patches", default="", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per worker run")
    ap.add_argument("--_worker", choices=("matmul", "prepare", "proxrl", "proxrl_fast"), help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_size", help=argparse.SUPPRESS)
    ap.add_argument("--_workload", help=argparse.SUPPRESS)
    ap.add_argument("--_total", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a._worker == "matmul":
        return worker_matmul(a.threads, a._out)
    if a._worker == "prepare":
        return worker_prepare(a._size, a._out)
    if a._worker in ("proxrl", "proxrl_fast"):
        return worker_proxrl(a._size, a._total, a.threads, a._worker == "proxrl_fast", a._workload, a._out,
                             a.profile, a.warmup, [p for p in a._patches.split(",") if p])

    sizes = [s for s in a.sizes.split(",") if s]
    sides = [s for s in a.sides.split(",") if s]
    for s in sizes:
        if s not in W.CONFIGS:
            sys.exit(f"error: unknown size {s!r}; choose from {', '.join(W.CONFIGS)}")
    for s in sides:
        base, *pt = s.split("+")
        if base not in SIDES or (pt and base == "trl") or any(p not in PATCHES for p in pt):
            sys.exit(f"error: unknown side {s!r}; choose from {', '.join(SIDES)}, optionally with proxrl "
                     f"what-if patches appended as proxrl+PATCH+PATCH ({', '.join(PATCHES)})")
    tmp = Path(tempfile.mkdtemp(prefix="lm_bench_"))
    log = tmp / "workers.log"
    print(f"lm_bench {time.strftime('%Y-%m-%d %H:%M:%S')}  cores={os.cpu_count()} threads={a.threads} "
          f"load={os.getloadavg()[0]:.2f}  logs: {log}", flush=True)

    mm = [_matmul_peak(a.threads, tmp, log)]
    raw: dict[str, dict[str, list[dict]]] = {}
    for size in sizes:
        n_meas = a.updates if a.updates is not None else DEFAULT_UPDATES[size]
        total = a.warmup + n_meas
        wd = tmp / f"workload_{size}"
        t0 = time.time()
        if _run_worker([sys.executable, __file__, "--_worker", "prepare", "--_size", size, "--_out", str(wd)],
                       wd / "checksums.json", 600, log) is None:
            sys.exit("error: could not prepare the workload")
        print(f"[{size}] workload prepared in {time.time() - t0:.0f}s; {total} updates per run "
              f"({a.warmup} warm-up)", flush=True)
        raw[size] = {s: [] for s in sides}
        for rnd in range(a.rounds):
            for side in sides:
                out = tmp / f"{size}_{side}_{rnd}.json"
                if side == "trl":
                    cmd = [sys.executable, str(HERE / "_trl_side.py"), "--size", size, "--updates", str(total),
                           "--threads", str(a.threads), "--json", str(out)]
                else:
                    base, *pt = side.split("+")
                    cmd = [sys.executable, __file__, "--_worker", base, "--_patches", ",".join(pt), "--_size", size,
                           "--_total",
                           str(total + (1 if a.profile else 0)), "--_workload", str(wd), "--_out", str(out),
                           "--threads", str(a.threads), "--warmup", str(a.warmup)]
                    if a.profile:
                        cmd += ["--profile", a.profile]
                t1 = time.time()
                res = _run_worker(cmd, out, a.timeout, log)
                if res is None:
                    continue
                raw[size][side].append(res)
                st = [u["total_s"] for u in res["updates"][a.warmup:] if not u.get("profiled")] or \
                    [res["updates"][-1]["total_s"]]
                cpu = statistics.median(u["cpu_s"] for u in res["updates"][a.warmup:] or res["updates"][-1:])
                print(f"[{size}] round {rnd + 1} {side:14s} {statistics.median(st):6.2f} s/update (CPU {cpu:5.2f} s) "
                      f"({W.BATCH * W.RESPONSE_LEN / statistics.median(st):6.0f} tok/s)  peak RSS "
                      f"{res['updates'][-1]['ru_maxrss_mb']:5.0f} MB  [{time.time() - t1:.0f}s]", flush=True)
    mm.append(_matmul_peak(a.threads, tmp, log))
    mm = [m for m in mm if m]
    peaks = {dt: max(max(m["gflops"][dt].values()) for m in mm) for dt in ("float32", "bfloat16")}

    summ = {size: {side: _summarise(runs, a.warmup, peaks) for side, runs in by.items() if runs}
            for size, by in raw.items()}
    # checks: both sides start from the same weights
    for size, by in summ.items():
        if "trl" in by and "proxrl" in by:
            a_c, b_c = by["trl"]["checksums"], by["proxrl"]["checksums"]
            for k in ("policy", "value"):
                if k in a_c and k in b_c and abs(a_c[k] - b_c[k]) > 1e-6 * abs(a_c[k]):
                    print(f"WARNING [{size}] {k} weights differ between TRL and proxrl: {a_c[k]} vs {b_c[k]}")
    print()
    print(_report(summ, peaks))
    print()
    for size, by in summ.items():
        base = by.get("trl")
        if base is None:
            continue
        for side, s in by.items():
            if side == "trl":
                continue
            pr = [p / t for p, t in zip(s["tok_per_s_per_round"], base["tok_per_s_per_round"])]
            tgt = TARGETS[size]
            rss = s["peak_rss_mb"] / base["peak_rss_mb"]
            print(f"RATIO [{size}] {side}/trl: tok/s {s['tok_per_s'] / base['tok_per_s']:.2f}x "
                  f"(per round {', '.join(f'{x:.2f}' for x in pr)}; target >= {tgt:g}x: "
                  f"{'met' if s['tok_per_s'] / base['tok_per_s'] >= tgt else 'NOT met'}), peak RSS {rss:.2f}x "
                  f"(target <= {RSS_TARGET}x: {'met' if rss <= RSS_TARGET else 'NOT met'})")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(a),
                                            "matmul": mm, "peaks_gflops": peaks, "summary": summ, "raw": raw},
                                           indent=1))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
