"""1 vs N processes (1 thread each), same global batch: control env-steps/s and LM PPO tokens/s (issue 7).

Each measurement launches the real CLI, exactly as a user would:

* N = 1: ``proxrl train ...`` / ``proxrl ppo ...`` (plain, no process group);
* N > 1: ``torchrun --standalone --nproc_per_node N --no-python proxrl train|ppo ...`` (gloo on CPU).

Every size in the command is global (docs/distributed.md), so N processes do the same work per update as one
process, split N ways. The figures are read from rank 0's ``metrics.jsonl``, whose logged metrics are global:

* control: steady-state env steps/s on each ``--env`` preset (default CartPole-v1 and ALE/Breakout-v5): the
  global env steps of the updates after the first ``--control-warmup`` ones divided by their ``train_seconds``
  (rollouts, updates and logging; start-up, evaluation and checkpoints excluded). CartPole (rl-zoo: 8 envs x
  32 steps, 20 epochs of one minibatch of 256, 64x64 MLPs on the numpy path) runs ``--control-steps`` steps
  (default 65,536 = 256 updates); Breakout (CleanRL: 8 envs x 128 steps, 4 epochs x 4 minibatches of 256,
  Nature CNN, autograd) runs ``--atari-steps`` (default 4,096 = 4 updates, the first one not measured). Atari ids run with
  ``vector_mode=sync`` so each process steps its envs in its own thread (the preset's ``async`` would give the
  1-process run 8 env processes on the 2 cores); ``--control-set vector_mode=async`` (any ``KEY=VALUE`` config
  override, repeatable) changes that for both N;
* LM: median ``tokens_per_second`` (generated tokens of the whole job / update seconds) over the updates after
  the first, on the LM benchmark workload of ``_lm_workload.py`` (default the 19.5M "large" model: 64 prompts x
  32 tokens per update, 4 epochs x 4 minibatches of 16, separate reference, critic and reward model).

Wall seconds of the whole command (start-up included) are reported beside them. Issue 7's target on a
2-core machine: >= 1.6x for both at N = 2.

Control processes each step ``num_envs / N`` envs, gather the rollout, and train on it: a minibatch big enough
to pay for an all-reduce (Breakout's) is split over the processes, a small one (CartPole's) is computed whole by
every process (docs/distributed.md). LM processes split the rollout (64 x 32 tokens) and each minibatch of 16 in
halves, train with DDP and reduce the whole-batch statistics; each samples its rows with the whole rollout's
uniforms, so the N = 2 run samples the very completions of the N = 1 run and the tokens/s compare like for
like. A checkout whose CLI lacks ``--device`` cannot run under torchrun; the script then measures N = 1 only
(``--force`` launches anyway).

Usage:
    python benchmarks/scale_bench.py                                # both, N = 1 and 2
    python benchmarks/scale_bench.py --what control --env CartPole-v1 --procs 1 --control-steps 4096   # smoke
    python benchmarks/scale_bench.py --what control --env ALE/Breakout-v5 --control-set vector_mode=native
    python benchmarks/scale_bench.py --json scale.json --rounds 2   # alternate 1/2/1/2, keep every figure
    python benchmarks/scale_bench.py --what allreduce --rounds 3    # gloo all-reduce latency between 2 processes
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _lm_workload as W  # noqa: E402  (light: no torch at import)

TARGET = 1.6


def _proxrl_cmd() -> list[str]:
    """How to call the CLI: the ``proxrl`` console script beside this Python if installed, else ``-m``."""
    script = Path(sys.executable).with_name("proxrl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "proxrl.cli"]


def _launcher(n: int, args: list[str]) -> list[str]:
    if n == 1:
        return _proxrl_cmd() + args
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    cli = _proxrl_cmd()
    if len(cli) == 1:
        return tr + ["--no-python", cli[0]] + args
    return tr + ["-m", "proxrl.cli"] + args


def _supports_torchrun(command: str) -> bool:
    out = subprocess.run(_proxrl_cmd() + [command, "--help"], capture_output=True, text=True, timeout=120)
    return "--device" in out.stdout


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int | str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc: int | str = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.perf_counter() - t0


def _rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def _is_atari(env: str) -> bool:
    return env.startswith("ALE/") or "NoFrameskip" in env


def _control_steps(env: str, a: argparse.Namespace) -> int:
    return a.atari_steps if _is_atari(env) else a.control_steps


def _control_overrides(env: str, a: argparse.Namespace) -> list[str]:
    """``--key value`` CLI flags: sync envs for Atari (unless overridden), then every ``--control-set``."""
    sets = dict(kv.split("=", 1) for kv in a.control_set)
    if _is_atari(env):
        sets.setdefault("vector_mode", "sync")
    return [x for k, v in sets.items() for x in ("--" + k.replace("_", "-"), v)]


def steady_rate(rows: list[dict], warmup: int) -> float:
    """Env steps/s over the updates after the first ``warmup`` ones (all of them if there are no more)."""
    first = rows[min(warmup, len(rows)) - 1] if warmup > 0 and len(rows) > warmup else None
    last = rows[-1]
    if first is None:
        return float(last["steps_per_second"])
    return (last["global_step"] - first["global_step"]) / max(last["train_seconds"] - first["train_seconds"], 1e-9)


def measure_control(n: int, env: str, a: argparse.Namespace, tmp: Path, log: Path) -> dict | None:
    run_dir = tmp / f"control_{env.replace('/', '_')}_n{n}_{time.time_ns()}"
    args = ["train", env, "--total-steps", str(_control_steps(env, a)), "--threads", "1", "--seed", "0",
            "--run-dir", str(run_dir), "--no-progress", "--tensorboard", "false", "--eval-episodes", "1",
            "--checkpoint-every", "0", *_control_overrides(env, a)]
    if n > 1 or a.device_flag:
        args += ["--device", "cpu"]
    rc, wall = _run(_launcher(n, args), log, a.timeout)
    rows = _rows(run_dir)
    if rc != 0 or not rows:
        print(f"  !! control {env} N={n} failed ({rc}); see {log}", flush=True)
        return None
    return {"what": "control", "label": f"control {env}", "procs": n, "value": steady_rate(rows, a.control_warmup),
            "unit": "env steps/s", "wall_s": wall, "steps": int(rows[-1]["global_step"]), "updates": len(rows),
            "uptime": _load()}


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


LATENCY_SIZES = {"16 floats": 16, "CartPole MLP gradient": 9_155, "Nature CNN gradient": 1_686_693}


def latency_worker(reps: int) -> None:
    """Under torchrun: time a gloo all-reduce (sum, float32) of each LATENCY_SIZES tensor, back to back and with
    0.5 ms of busy work between calls (like a minibatch step); rank 0 prints one JSON line."""
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = {}
    for name, n in LATENCY_SIZES.items():
        x = torch.ones(n)
        k = reps if n < 100_000 else max(reps // 20, 10)
        for _ in range(10):
            dist.all_reduce(x)
        for gap in (0.0, 5e-4):
            ts = []
            for _ in range(k):
                t = time.perf_counter()
                while time.perf_counter() - t < gap:
                    pass
                t = time.perf_counter()
                dist.all_reduce(x)
                ts.append(time.perf_counter() - t)
            out[f"{name}, {'busy 0.5 ms between' if gap else 'back to back'}"] = {
                "median_us": float(np.median(ts) * 1e6), "mean_us": float(np.mean(ts) * 1e6),
                "p90_us": float(np.percentile(ts, 90) * 1e6)}
    if dist.get_rank() == 0:
        print("LATENCY " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def measure_latency(n: int, a: argparse.Namespace, log: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           str(Path(__file__).resolve()), "--latency-worker", str(a.latency_reps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    line = next((x for x in out.stdout.splitlines() if x.startswith("LATENCY ")), None)
    if out.returncode != 0 or line is None:
        print(f"  !! all-reduce latency N={n} failed; see {log}", flush=True)
        return []
    return [{"what": "allreduce", "label": k, "procs": n, **v, "uptime": _load()}
            for k, v in json.loads(line[len("LATENCY "):]).items()]


def _prepare_lm(size: str, tmp: Path) -> Path:
    wd = tmp / f"workload_{size}"
    if not (wd / "prompts.jsonl").is_file():
        W.save_workload(wd, **W.CONFIGS[size])
        tok = W.build_tokenizer()
        lines = [json.dumps({"prompt": tok.decode(ids)}) for ids in W.load_prompt_ids(wd)]
        (wd / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return wd


def measure_lm(n: int, a: argparse.Namespace, tmp: Path, log: Path, wd: Path) -> dict | None:
    run_dir = tmp / f"lm_n{n}_{time.time_ns()}"
    args = ["ppo", "--policy", str(wd / "policy"), "--reward-model", str(wd / "reward"), "--critic", str(wd / "value"),
            "--prompts", str(wd / "prompts.jsonl"), "--run-dir", str(run_dir), "--seed", "0",
            "--total-updates", str(a.lm_updates), "--rollout-size", str(W.BATCH), "--group-size", "1",
            "--minibatch-size", str(W.BATCH // W.MINIBATCHES), "--epochs", str(W.EPOCHS),
            "--learning-rate", str(W.LEARNING_RATE), "--lr-schedule", "linear", "--max-grad-norm", "none",
            "--gamma", "1.0", "--gae-lambda", "0.95", "--kl-coef", str(W.KL_COEF),
            "--max-new-tokens", str(W.RESPONSE_LEN), "--temperature", "1.0", "--threads", "1",
            "--sample-every", "0", "--checkpoint-every", "0", "--plot", "false"]
    if n > 1 or a.device_flag:
        args += ["--device", "cpu"]
    rc, wall = _run(_launcher(n, args), log, a.timeout)
    rows = _rows(run_dir)
    if rc != 0 or not rows:
        print(f"  !! LM N={n} failed ({rc}); see {log}", flush=True)
        return None
    steady = rows[1:] or rows[-1:]
    return {"what": "lm", "label": f"lm {a.lm_size}", "procs": n,
            "value": statistics.median(float(r["tokens_per_second"]) for r in steady),
            "unit": "tokens/s", "wall_s": wall, "updates": len(rows), "uptime": _load()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="control,lm",
                    help="comma list of: control, lm, allreduce (gloo all-reduce latency at the largest --procs)")
    ap.add_argument("--procs", default="1,2", help="comma list of process counts (1 thread each)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, each running every N once (alternated)")
    ap.add_argument("--env", default="CartPole-v1,ALE/Breakout-v5", help="comma list of control presets / env ids")
    ap.add_argument("--control-steps", type=int, default=65_536, help="global env steps per control run (not Atari)")
    ap.add_argument("--atari-steps", type=int, default=4_096,
                    help="global agent steps per Atari run (the Breakout preset: 1,024 per update)")
    ap.add_argument("--control-warmup", type=int, default=1, help="control updates not measured (start-up)")
    ap.add_argument("--control-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every control run, e.g. vector_mode=native or bf16=true (repeatable)")
    ap.add_argument("--lm-size", default="large", choices=sorted(W.CONFIGS), help="LM benchmark model size")
    ap.add_argument("--lm-updates", type=int, default=4, help="PPO updates per LM run (first one not measured)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--force", action="store_true", help="launch N > 1 even if the CLI lacks --device")
    ap.add_argument("--json", default=None, help="write every figure and the ratios here")
    ap.add_argument("--latency-reps", type=int, default=500, help="all-reduces per small size (allreduce)")
    ap.add_argument("--latency-worker", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.latency_worker is not None:
        latency_worker(a.latency_worker)
        return
    whats = [w.strip() for w in a.what.split(",") if w.strip()]
    procs = [int(p) for p in a.procs.split(",")]
    bad = [w for w in whats if w not in ("control", "lm", "allreduce")]
    if bad:
        ap.error(f"--what {bad[0]!r}: use control, lm and/or allreduce")
    bad = [kv for kv in a.control_set if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:
        ap.error(f"--control-set {bad[0]!r}: use KEY=VALUE, e.g. vector_mode=native")
    envs = [e.strip() for e in a.env.split(",") if e.strip()]
    if "control" in whats and any(map(_is_atari, envs)) and importlib.util.find_spec("ale_py") is None:
        print("ale-py is not installed (pip install proxrl[atari]): skipping the Atari presets", flush=True)
        envs = [e for e in envs if not _is_atari(e)]

    a.device_flag = False
    for w in whats:
        if w == "allreduce":
            continue
        cmd = "train" if w == "control" else "ppo"
        if _supports_torchrun(cmd):
            a.device_flag = True
        elif max(procs) > 1 and not a.force:
            print(f"proxrl {cmd} has no --device yet (issue 7's trainer integration is pending), so it cannot run "
                  f"under torchrun; measuring N = 1 only (use --force to launch anyway)", flush=True)
            procs = [1]

    tmp = Path(tempfile.mkdtemp(prefix="scale_bench_"))
    log = tmp / "runs.log"
    print(f"runs and log under {tmp}", flush=True)
    results: list[dict] = []
    failed = False
    wd = _prepare_lm(a.lm_size, tmp) if "lm" in whats else None
    jobs = [("control", e) for e in envs] * ("control" in whats) + [("lm", None)] * ("lm" in whats)
    latency: list[dict] = []
    for rnd in range(a.rounds):
        if "allreduce" in whats and max(procs) > 1:
            print(f"round {rnd + 1}: gloo all-reduce latency, {max(procs)} processes (load {_load()}) ...", flush=True)
            latency += [{**r, "round": rnd + 1} for r in measure_latency(max(procs), a, log)]
        for w, env in jobs:
            for n in procs:
                print(f"round {rnd + 1}: {w} {env or a.lm_size} N={n} (load {_load()}) ...", flush=True)
                r = measure_control(n, env, a, tmp, log) if w == "control" else measure_lm(n, a, tmp, log, wd)
                failed |= r is None
                if r is not None:
                    print(f"  {r['value']:.0f} {r['unit']} (wall {r['wall_s']:.1f} s)", flush=True)
                    results.append({**r, "round": rnd + 1})

    if results:
        print(f"\n{'what':28s} {'N':>3s} {'median':>10s} {'unit':12s} {'x N=1':>7s} {'target':>7s}  every round")
    summary = []
    labels = list(dict.fromkeys(r["label"] for r in results))
    for label in labels:
        base = [r["value"] for r in results if r["label"] == label and r["procs"] == 1]
        for n in procs:
            rs = [r for r in results if r["label"] == label and r["procs"] == n]
            if not rs:
                continue
            vals = [r["value"] for r in rs]
            med = statistics.median(vals)
            ratio = med / statistics.median(base) if base else float("nan")
            target = f">={TARGET}" if n == 2 else ""
            every = ", ".join(f"{v:.0f}" for v in vals)
            print(f"{label:28s} {n:3d} {med:10.1f} {rs[0]['unit']:12s} {ratio:7.2f} {target:>7s}  {every}")
            summary.append({"label": label, "what": rs[0]["what"], "procs": n, "median": med, "ratio_vs_1": ratio})
    if latency:
        print(f"\ngloo all-reduce, {max(procs)} processes, microseconds (median / mean / 90th percentile, every round)")
        for label in dict.fromkeys(r["label"] for r in latency):
            rs = [r for r in latency if r["label"] == label]
            print(f"  {label:48s} " + "; ".join(f"{r['median_us']:.0f} / {r['mean_us']:.0f} / {r['p90_us']:.0f}"
                                                   for r in rs))
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "latency": latency, "summary": summary,
                                            "args": vars(a)}, indent=1))
        print("wrote", a.json)
    if failed or os.environ.get("SCALE_BENCH_KEEP") == "1":
        print(f"kept {tmp} (runs and log)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
