"""1 vs N processes (1 thread each), same global batch: control env-steps/s and LM PPO tokens/s (issue 7).

Each measurement launches the real CLI, exactly as a user would:

* N = 1: ``proxrl train ...`` / ``proxrl ppo ...`` (plain, no process group);
* N > 1: ``torchrun --standalone --nproc_per_node N --no-python proxrl train|ppo ...`` (gloo on CPU).

Every size in the command is global (docs/distributed.md), so N processes do the same work per update as one
process, split N ways. The figures are read from rank 0's ``metrics.jsonl``, whose logged metrics are global:

* control: ``steps_per_second`` of the last update (global env steps / training seconds: rollouts, updates
  and logging; evaluation and checkpoints excluded) on a preset (default CartPole-v1), ``--control-steps``
  steps;
* LM: median ``tokens_per_second`` (generated tokens of the whole job / update seconds) over the updates after
  the first, on the LM benchmark workload of ``_lm_workload.py`` (default the 19.5M "large" model: 64 prompts x
  32 tokens per update, 4 epochs x 4 minibatches of 16, separate reference, critic and reward model).

Wall seconds of the whole command (start-up included) are reported beside them. Issue 7's target on a
2-core machine: >= 1.6x for both at N = 2.

LM processes split the rollout (64 x 32 tokens) and each minibatch of 16 in halves, train with DDP and reduce the
whole-batch statistics; each samples its rows with the whole rollout's uniforms, so the N = 2 run samples the very
completions of the N = 1 run and the tokens/s compare like for like. A checkout whose CLI lacks ``--device`` cannot
run under torchrun; the script then measures N = 1 only (``--force`` launches anyway).

Usage:
    python benchmarks/scale_bench.py                                # both, N = 1 and 2
    python benchmarks/scale_bench.py --what control --procs 1 --control-steps 4096     # smoke run
    python benchmarks/scale_bench.py --json scale.json --rounds 2   # alternate 1/2/1/2, keep every figure
"""
from __future__ import annotations

import argparse
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


def measure_control(n: int, a: argparse.Namespace, tmp: Path, log: Path) -> dict | None:
    run_dir = tmp / f"control_n{n}_{time.time_ns()}"
    args = ["train", a.env, "--total-steps", str(a.control_steps), "--threads", "1", "--seed", "0",
            "--run-dir", str(run_dir), "--no-progress", "--tensorboard", "false", "--eval-episodes", "1",
            "--checkpoint-every", "0"]
    if n > 1 or a.device_flag:
        args += ["--device", "cpu"]
    rc, wall = _run(_launcher(n, args), log, a.timeout)
    rows = _rows(run_dir)
    if rc != 0 or not rows:
        print(f"  !! control N={n} failed ({rc}); see {log}", flush=True)
        return None
    last = rows[-1]
    return {"what": "control", "procs": n, "value": float(last["steps_per_second"]), "unit": "env steps/s",
            "wall_s": wall, "steps": int(last["global_step"]), "updates": len(rows)}


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
    return {"what": "lm", "procs": n, "value": statistics.median(float(r["tokens_per_second"]) for r in steady),
            "unit": "tokens/s", "wall_s": wall, "updates": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="control,lm", help="comma list of: control, lm")
    ap.add_argument("--procs", default="1,2", help="comma list of process counts (1 thread each)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, each running every N once (alternated)")
    ap.add_argument("--env", default="CartPole-v1", help="control preset / env id")
    ap.add_argument("--control-steps", type=int, default=65_536, help="global env steps per control run")
    ap.add_argument("--lm-size", default="large", choices=sorted(W.CONFIGS), help="LM benchmark model size")
    ap.add_argument("--lm-updates", type=int, default=4, help="PPO updates per LM run (first one not measured)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--force", action="store_true", help="launch N > 1 even if the CLI lacks --device")
    ap.add_argument("--json", default=None, help="write every figure and the ratios here")
    a = ap.parse_args()
    whats = [w.strip() for w in a.what.split(",") if w.strip()]
    procs = [int(p) for p in a.procs.split(",")]
    bad = [w for w in whats if w not in ("control", "lm")]
    if bad:
        ap.error(f"--what {bad[0]!r}: use control and/or lm")

    a.device_flag = False
    for w in whats:
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
    for rnd in range(a.rounds):
        for w in whats:
            for n in procs:
                print(f"round {rnd + 1}: {w} N={n} ...", flush=True)
                r = measure_control(n, a, tmp, log) if w == "control" else measure_lm(n, a, tmp, log, wd)
                failed |= r is None
                if r is not None:
                    print(f"  {r['value']:.0f} {r['unit']} (wall {r['wall_s']:.1f} s)", flush=True)
                    results.append({**r, "round": rnd + 1})

    print(f"\n{'what':8s} {'N':>3s} {'median':>12s} {'unit':12s} {'x N=1':>7s} {'target':>7s}")
    summary = []
    for w in whats:
        base = [r["value"] for r in results if r["what"] == w and r["procs"] == 1]
        for n in procs:
            vals = [r["value"] for r in results if r["what"] == w and r["procs"] == n]
            if not vals:
                continue
            med = statistics.median(vals)
            ratio = med / statistics.median(base) if base else float("nan")
            unit = "env steps/s" if w == "control" else "tokens/s"
            target = f">={TARGET}" if n == 2 else ""
            print(f"{w:8s} {n:3d} {med:12.1f} {unit:12s} {ratio:7.2f} {target:>7s}")
            summary.append({"what": w, "procs": n, "median": med, "ratio_vs_1": ratio})
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "summary": summary, "args": vars(a)}, indent=1))
        print("wrote", a.json)
    if failed or os.environ.get("SCALE_BENCH_KEEP") == "1":
        print(f"kept {tmp} (runs and log)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
