"""Control PPO, proxrl vs Stable-Baselines3, side by side (see benchmarks/README.md, "Control PPO vs Stable-Baselines3").

Workloads (rl-baselines3-zoo's tuned PPO hyperparameters, identical on both sides for CartPole):

* **CartPole-v1**: 8 envs x 32 steps = one minibatch of 256, 20 epochs, gamma 0.98, lambda 0.8, lr 1e-3 and
  clip 0.2 both decayed linearly to 0, ent 0, 100k env steps. A deterministic evaluation of 20 episodes every
  5000 env steps (its time excluded). Reported: env steps and training seconds until an evaluation first
  reaches a mean return >= 475 ("solved"), env-steps/s over the whole 100k-step run (evaluation excluded).
* **Pendulum-v1**: 4 envs x 1024 steps, 10 epochs, gamma 0.9, lambda 0.95, lr 1e-3, clip 0.2, 100k env steps
  (102,400 = 25 rollouts on both sides). SB3 runs rl-zoo's gSDE policy (``sde_sample_freq=4``); proxrl its
  ``PRESETS["Pendulum-v1"]`` (plain Gaussian, 64 minibatches, obs and reward normalisation). Reported: the
  final deterministic evaluation (20 episodes) and the training seconds.
* **ALE/Breakout-v5** (``--env breakout``, not part of ``all``): whole-loop frames/s of one seed per side,
  100k frames (``--quick``: 20k) = 25 (5) updates of 8 envs x 128 steps. Same Nature CNN (shared trunk,
  512 features, linear heads) and CleanRL ``ppo_atari`` hyperparameters on both sides, each side's own Atari
  preprocessing (proxrl: Gymnasium's wrappers in 8 ``AsyncVectorEnv`` processes; SB3: ``AtariWrapper`` in a
  ``SubprocVecEnv`` of 8 + ``VecFrameStack``), 1 torch thread. No evaluation is timed.
* **HalfCheetah-v5** (``--env halfcheetah``, not part of ``all``; issue 9): rl-baselines3-zoo's tuned
  ``HalfCheetah-v4`` PPO entry on both sides (1 env x 512 steps, batch 64, 20 epochs, lr 2.0633e-5, gamma 0.98,
  lambda 0.92, clip 0.1, ent 0.000401762, SB3 vf_coef 0.58096 = proxrl value_coef 1.16192, max grad norm 0.8,
  log std -2, ReLU pi/vf [256, 256], obs + reward normalisation), 1M env steps (``--quick``: 20,480),
  ``--halfcheetah-seeds`` (3) seeds interleaved, ``--halfcheetah-sb3-seeds`` to run fewer SB3 seeds. SB3 runs
  the zoo's ``ortho_init=False``; proxrl's preset cannot (its MLPs are always orthogonally initialised). No
  evaluation during training; one deterministic evaluation of 10 episodes after it (observation statistics
  frozen, raw rewards, not timed). Reported per seed: final return, training seconds (the training loop's wall
  time) and CPU seconds; then means/medians, SB3/proxrl time ratio, return difference and issue 9's target
  (return >= SB3's within one standard error of the difference of the means, from the pooled seed-to-seed s.d.;
  mean training time <= 1/4 of SB3's), met or not.
* **Env-only limit**: 100k CartPole steps of the native vector env (``gym.make_vec("CartPole-v1", 8,
  vectorization_mode="vector_entry_point")``, what proxrl steps) and of SB3's ``DummyVecEnv`` with 8 envs,
  random actions drawn beforehand: the steps/s no PPO on that env can beat.

Each run is its own subprocess (``_sb3_side.py`` / ``_proxrl_control_side.py``) with ``torch.set_num_threads(1)``
and ``OMP_WAIT_POLICY=PASSIVE`` (``--threads N``: N torch threads on both sides, OpenMP's default wait); for seed index i the SB3 run goes first when i is even, proxrl first when odd.
Seeds are 0..n-1 on both sides (the same number seeds different random streams in the two libraries, so only
medians are compared). The load average is printed at the start and the end: on a shared machine, re-run if
it was high.

Usage:
    python benchmarks/control_bench.py                      # CartPole 5 seeds + Pendulum 3 seeds + env limit
    python benchmarks/control_bench.py --env cartpole --seeds 5 --json /tmp/control.json
    python benchmarks/control_bench.py --quick              # smoke test: 1 seed, 20k / 8k steps
    python benchmarks/control_bench.py --env breakout --quick   # Breakout frames/s, 20k frames per side
    python benchmarks/control_bench.py --env breakout --quick --proxrl-set vector_mode=native
                                      # any ControlConfig field of the proxrl side (repeatable, YAML scalars)
    python benchmarks/control_bench.py --env halfcheetah --json /tmp/hc.json   # 1M steps x 3 seeds per side
    python benchmarks/control_bench.py --env halfcheetah --quick              # 20,480 steps, 1 seed per side
    python benchmarks/control_bench.py --env halfcheetah --sides proxrl --halfcheetah-seeds 1 \
        --halfcheetah-seed-start 2 --halfcheetah-add-json /tmp/hc.json   # one more proxrl seed, reported with hc.json's
    python benchmarks/control_bench.py --env halfcheetah --halfcheetah-seeds 0 --halfcheetah-add-json a.json:sb3 \
        --halfcheetah-add-json b.json --json all.json     # no new run: one report of earlier runs (sb3 side of a.json)
    python benchmarks/control_bench.py --env halfcheetah --profile /tmp/hc.prof --halfcheetah-steps 20480
    python benchmarks/control_bench.py --profile /tmp/cartpole.prof   # where proxrl's CartPole time goes: a
                                      # stage-timer split of one run, then one run under cProfile
    python benchmarks/control_bench.py --backends numpy,autograd --seeds 3 --pendulum-seeds 3 --quick
                                      # proxrl only: env-steps/s of each gradient backend (--grad-backend),
                                      # interleaved per seed; needs no SB3
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIDES = {"sb3": HERE / "_sb3_side.py", "proxrl": HERE / "_proxrl_control_side.py"}
STEPS = {"cartpole": 100_000, "pendulum": 100_000, "breakout": 25_600,  # Breakout: agent steps (x4 frames)
         "halfcheetah": 1_000_000}
QUICK_STEPS = {"cartpole": 20_000, "pendulum": 8_192, "breakout": 5_120, "halfcheetah": 20_480}
EVAL_EVERY = {"cartpole": 5000, "pendulum": 0, "breakout": 0, "halfcheetah": 0}
HALFCHEETAH_EVAL_EPISODES = 10
TARGETS = {
    "cartpole_solve_seconds": 0.5,   # proxrl median training seconds to solve
    "cartpole_speedup": 6.0,         # SB3 / proxrl median seconds to solve
    "pendulum_return": -200.0,       # proxrl mean final evaluation
    "pendulum_wall_fraction": 0.25,  # proxrl mean training seconds / SB3's
    "halfcheetah_wall_fraction": 0.25,  # issue 9: proxrl mean training seconds <= 1/4 of SB3's
}


THREADS = [1]  # torch threads of every child (--threads)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(THREADS[0])
    if THREADS[0] == 1:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:  # GNU OpenMP's default wait (spin ~300k rounds, then sleep): several threads help only if they spin
        env.pop("OMP_WAIT_POLICY", None)
        env["GOMP_SPINCOUNT"] = "300000"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_child(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="control_bench_") as tmp:
        out = Path(tmp) / "out.json"
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, *args, str(out)], cwd=ROOT, env=_child_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"benchmark child failed (exit {proc.returncode}): {' '.join(args)}")
        res = json.loads(out.read_text())
    res["child_wall_seconds"] = wall
    return res


def run_side(side: str, env: str, seed: int, steps: int, grad_backend: str = "auto",
             proxrl_set: dict | None = None) -> dict:
    extra = ["--grad-backend", grad_backend] if side == "proxrl" else []
    extra += ["--threads", str(THREADS[0])]
    if side == "proxrl" and proxrl_set:
        extra += ["--set-json", json.dumps(proxrl_set)]
    if env == "halfcheetah":
        extra += ["--eval-episodes", str(HALFCHEETAH_EVAL_EPISODES)]
    return _run_child([str(SIDES[side]), "--eval-every", str(EVAL_EVERY[env]), *extra, env, str(seed), str(steps)])


def parse_proxrl_set(items: list[str]) -> dict:
    """``["key=value", ...]`` -> ``{key: YAML scalar}``; keys must be ``ControlConfig`` fields (else UserError)."""
    import dataclasses

    import yaml

    from proxrl.control import ControlConfig
    from proxrl.errors import UserError

    fields = {f.name for f in dataclasses.fields(ControlConfig)}
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--proxrl-set {item!r}: use KEY=VALUE, e.g. --proxrl-set vector_mode=native")
        if key not in fields:
            raise UserError(f"--proxrl-set {item!r}: {key!r} is not a ControlConfig field (see proxrl train --help)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str) and parsed.strip().lower() in ("none", "null"):
            parsed = None
        if isinstance(parsed, (dict, list)):
            raise UserError(f"--proxrl-set {item!r}: the value must be a scalar (number, true/false, none or text)")
        out[key] = parsed
    return out


def compare_backends(env: str, seeds: int, steps: int, backends: list[str], proxrl_set: dict | None = None) -> dict:
    """proxrl's env-steps/s (rollouts + updates + logging, evaluation excluded) per gradient backend, the
    backends interleaved per seed (order reversed on odd seeds) so that machine load hits them alike."""
    runs = []
    for i in range(seeds):
        for backend in (backends if i % 2 == 0 else backends[::-1]):
            load = os.getloadavg()[0]
            r = run_side("proxrl", env, i, steps, backend, proxrl_set)
            r.update(backend=backend, loadavg_before=load, loadavg_after=os.getloadavg()[0])
            print(f"  {env} seed {i} {backend:>8}: {r['steps_per_second']:.0f} env-steps/s, train {r['train_seconds']:.2f} s, "
                  f"final eval {r['final_eval_mean']:.1f} (load {load:.2f} -> {r['loadavg_after']:.2f})", flush=True)
            runs.append(r)
    summary = {b: _median([r["steps_per_second"] for r in runs if r["backend"] == b]) for b in backends}
    print(f"{env} ({steps} env steps, {seeds} seeds): median env-steps/s " +
          ", ".join(f"{b} {v:.0f}" for b, v in summary.items()) +
          (f"; {backends[0]}/{backends[1]} = {summary[backends[0]] / summary[backends[1]]:.2f}x" if len(backends) == 2 else ""))
    return {"runs": runs, "median_steps_per_second": summary}


# ================================================================================ env-only limit (subprocess)
def worker_envspeed(out: str, steps: int) -> None:
    """Steps/s of 8 CartPole envs with random actions: native vector env and SB3's DummyVecEnv (best of 3)."""
    import gymnasium as gym
    import numpy as np

    n = 8
    vsteps = steps // n
    actions = np.random.default_rng(0).integers(0, 2, size=(vsteps, n))
    res = {}

    venv = gym.make_vec("CartPole-v1", n, vectorization_mode="vector_entry_point")
    venv.reset(seed=0)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for a in actions:
            venv.step(a)
        best = min(best, time.perf_counter() - t)
    venv.close()
    res["native_vector_env"] = vsteps * n / best

    from stable_baselines3.common.env_util import make_vec_env

    denv = make_vec_env("CartPole-v1", n_envs=n, seed=0)
    denv.reset()
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for a in actions:
            denv.step(a)
        best = min(best, time.perf_counter() - t)
    denv.close()
    res["sb3_dummy_vec_env"] = vsteps * n / best
    Path(out).write_text(json.dumps(res))


# ================================================================================ reporting
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _solved(r: dict, key: str) -> float:
    return r[key] if r[key] is not None else math.inf


def _fmt_solved(v: float, fmt: str, steps: int) -> str:
    return f">{steps // 1000}k" if math.isinf(v) else format(v, fmt)


def _ratio(a: float, b: float) -> float:
    if math.isinf(a) or math.isinf(b) or b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def report_cartpole(runs: list[dict], steps: int, limit: dict | None) -> dict:
    print(f"\nCartPole-v1 ({steps} env steps, eval 20 episodes every {EVAL_EVERY['cartpole']} steps, solved = mean >= 475)")
    print(f"{'seed':>4} {'side':>7} {'solved@step':>11} {'solve s':>8} {'steps/s':>8} {'train s':>8} {'final eval':>10} {'process s':>9}")
    for r in runs:
        print(f"{r['seed']:>4} {r['side']:>7} {_fmt_solved(_solved(r, 'solved_step'), 'd', steps):>11} "
              f"{_fmt_solved(_solved(r, 'solved_seconds'), '.2f', steps):>8} {r['steps_per_second']:>8.0f} "
              f"{r['train_seconds']:>8.2f} {r['final_eval_mean']:>10.1f} {r['child_wall_seconds']:>9.1f}")
    summary: dict = {}
    for side in ("sb3", "proxrl"):
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue
        summary[side] = {
            "median_solved_step": _median([_solved(r, "solved_step") for r in rs]),
            "median_solved_seconds": _median([_solved(r, "solved_seconds") for r in rs]),
            "median_steps_per_second": _median([r["steps_per_second"] for r in rs]),
            "median_process_seconds": _median([r["child_wall_seconds"] for r in rs]),
            "solved_runs": sum(r["solved_step"] is not None for r in rs),
            "runs": len(rs),
        }
        s = summary[side]
        print(f"{'med':>4} {side:>7} {_fmt_solved(s['median_solved_step'], '.0f', steps):>11} "
              f"{_fmt_solved(s['median_solved_seconds'], '.2f', steps):>8} {s['median_steps_per_second']:>8.0f} "
              f"{'':>8} {'':>10} {s['median_process_seconds']:>9.1f}   (solved {s['solved_runs']}/{s['runs']})")
    if "sb3" in summary and "proxrl" in summary:
        sb, px = summary["sb3"], summary["proxrl"]
        ratios = {
            "solve_seconds_speedup_sb3_over_proxrl": _ratio(sb["median_solved_seconds"], px["median_solved_seconds"]),
            "solve_steps_proxrl_over_sb3": _ratio(px["median_solved_step"], sb["median_solved_step"]),
            "steps_per_second_proxrl_over_sb3": _ratio(px["median_steps_per_second"], sb["median_steps_per_second"]),
        }
        summary["ratios"] = ratios
        print(f"ratios (medians): time to solve SB3/proxrl = {ratios['solve_seconds_speedup_sb3_over_proxrl']:.1f}x, "
              f"steps to solve proxrl/SB3 = {ratios['solve_steps_proxrl_over_sb3']:.2f}, "
              f"steps/s proxrl/SB3 = {ratios['steps_per_second_proxrl_over_sb3']:.1f}x")
        ok_time = px["median_solved_seconds"] <= TARGETS["cartpole_solve_seconds"]
        ok_speed = ratios["solve_seconds_speedup_sb3_over_proxrl"] >= TARGETS["cartpole_speedup"]
        ok_steps = not math.isinf(px["median_solved_step"]) and px["median_solved_step"] <= sb["median_solved_step"]
        print(f"targets: median solve <= {TARGETS['cartpole_solve_seconds']} s: {'met' if ok_time else 'NOT met'}; "
              f">= {TARGETS['cartpole_speedup']:.0f}x SB3: {'met' if ok_speed else 'NOT met'}; "
              f"no more env steps than SB3: {'met' if ok_steps else 'NOT met'}")
    if limit:
        line = (f"env-only limit (8 envs, random actions): native vector env {limit['native_vector_env']:.0f} steps/s, "
                f"SB3 DummyVecEnv {limit['sb3_dummy_vec_env']:.0f} steps/s")
        if "proxrl" in summary:
            line += f"; proxrl PPO runs at {summary['proxrl']['median_steps_per_second'] / limit['native_vector_env']:.0%} of the native limit"
        print(line)
    return summary


def report_pendulum(runs: list[dict], steps: int) -> dict:
    print(f"\nPendulum-v1 ({steps} env steps requested, final deterministic eval of 20 episodes)")
    print(f"{'seed':>4} {'side':>7} {'final eval':>10} {'train s':>8} {'steps/s':>8} {'process s':>9}")
    for r in runs:
        print(f"{r['seed']:>4} {r['side']:>7} {r['final_eval_mean']:>10.1f} {r['train_seconds']:>8.2f} "
              f"{r['steps_per_second']:>8.0f} {r['child_wall_seconds']:>9.1f}")
    summary: dict = {}
    for side in ("sb3", "proxrl"):
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue
        summary[side] = {
            "mean_final_eval": statistics.fmean(r["final_eval_mean"] for r in rs),
            "median_final_eval": _median([r["final_eval_mean"] for r in rs]),
            "mean_train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
            "median_train_seconds": _median([r["train_seconds"] for r in rs]),
            "runs": len(rs),
        }
        s = summary[side]
        print(f"{'mean':>4} {side:>7} {s['mean_final_eval']:>10.1f} {s['mean_train_seconds']:>8.2f}")
    if "sb3" in summary and "proxrl" in summary:
        frac = summary["proxrl"]["mean_train_seconds"] / summary["sb3"]["mean_train_seconds"]
        summary["ratios"] = {"train_seconds_proxrl_over_sb3": frac}
        ok_ret = summary["proxrl"]["mean_final_eval"] >= TARGETS["pendulum_return"]
        ok_wall = frac <= TARGETS["pendulum_wall_fraction"]
        print(f"ratios (means): training seconds proxrl/SB3 = {frac:.3f} (SB3/proxrl = {1 / frac:.1f}x)")
        print(f"targets: proxrl mean eval >= {TARGETS['pendulum_return']:.0f}: {'met' if ok_ret else 'NOT met'}; "
              f"wall <= {TARGETS['pendulum_wall_fraction']} x SB3: {'met' if ok_wall else 'NOT met'}")
    return summary


def report_breakout(runs: list[dict], frames: int) -> dict:
    print(f"\nALE/Breakout-v5 ({frames} frames per run, whole loop: rollouts with 8 envs + Nature-CNN updates)")
    print("(learner CPU s: CPU time of the training process itself, i.e. policy forwards and updates, without the "
          "env worker processes: less sensitive to other load on the machine than the wall time)")
    print(f"{'seed':>4} {'side':>7} {'frames':>8} {'frames/s':>9} {'train s':>8} {'learner CPU s':>13} {'process s':>9}")
    for r in runs:
        print(f"{r['seed']:>4} {r['side']:>7} {r['frames']:>8} {r['frames_per_second']:>9.0f} {r['train_seconds']:>8.1f} "
              f"{r.get('learner_cpu_seconds', math.nan):>13.1f} {r['child_wall_seconds']:>9.1f}")
    summary: dict = {side: {"median_frames_per_second": _median([r["frames_per_second"] for r in runs if r["side"] == side]),
                            "median_learner_cpu_seconds": _median([r.get("learner_cpu_seconds", math.nan) for r in runs
                                                                   if r["side"] == side])}
                     for side in ("sb3", "proxrl") if any(r["side"] == side for r in runs)}
    if len(summary) == 2:
        ratio = summary["proxrl"]["median_frames_per_second"] / summary["sb3"]["median_frames_per_second"]
        cpu = summary["sb3"]["median_learner_cpu_seconds"] / summary["proxrl"]["median_learner_cpu_seconds"]
        summary["ratios"] = {"frames_per_second_proxrl_over_sb3": ratio, "learner_cpu_sb3_over_proxrl": cpu}
        print(f"ratios (medians): frames/s proxrl/SB3 = {ratio:.2f}x (issue 9 target >= 2x: "
              f"{'met' if ratio >= 2 else 'NOT met'}); learner CPU seconds SB3/proxrl = {cpu:.2f}x")
    return summary


def _sem(values: list[float]) -> float:
    """Standard error of the mean over seeds (NaN with fewer than 2)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else math.nan


def report_halfcheetah(runs: list[dict], steps: dict[str, int]) -> dict:
    """Per-seed table, per-side means/medians, SB3/proxrl time ratio, return difference and issue 9's target."""
    eps = HALFCHEETAH_EVAL_EPISODES
    print(f"\nHalfCheetah-v5 (rl-zoo tuned hyperparameters on both sides; env steps: "
          f"{', '.join(f'{k} {v}' for k, v in steps.items())}; final deterministic eval of {eps} episodes, "
          f"obs statistics frozen, not timed)")
    print("(train s: the training loop's wall time; CPU s: the training process's CPU time over the same span, "
          "less sensitive to other load on the machine)")
    print(f"{'seed':>4} {'side':>7} {'final return':>14} {'train s':>8} {'CPU s':>8} {'steps/s':>8} {'process s':>9} "
          f"{'load':>12}")
    for r in runs:
        print(f"{r['seed']:>4} {r['side']:>7} {r['final_eval_mean']:>8.1f} +-{r['final_eval_std']:>4.0f} "
              f"{r['train_seconds']:>8.1f} {r.get('train_cpu_seconds', math.nan):>8.1f} {r['steps_per_second']:>8.0f} "
              f"{r['child_wall_seconds']:>9.1f} {r['loadavg_before']:>5.2f}->{r['loadavg_after']:<5.2f}")
    summary: dict = {}
    for side in ("sb3", "proxrl"):
        rs = [r for r in runs if r["side"] == side]
        if not rs:
            continue
        rets, secs = [r["final_eval_mean"] for r in rs], [r["train_seconds"] for r in rs]
        summary[side] = {
            "runs": len(rs),
            "mean_final_eval": statistics.fmean(rets),
            "median_final_eval": _median(rets),
            "sem_final_eval": _sem(rets),
            "mean_train_seconds": statistics.fmean(secs),
            "median_train_seconds": _median(secs),
            "mean_train_cpu_seconds": statistics.fmean(r.get("train_cpu_seconds", math.nan) for r in rs),
            "median_steps_per_second": _median([r["steps_per_second"] for r in rs]),
        }
        s_ = summary[side]
        print(f"{'mean':>4} {side:>7} {s_['mean_final_eval']:>14.1f} {s_['mean_train_seconds']:>8.1f} "
              f"{s_['mean_train_cpu_seconds']:>8.1f} {s_['median_steps_per_second']:>8.0f}   (median return {s_['median_final_eval']:.1f}, "
              f"s.e.m. {s_['sem_final_eval']:.1f}; median train s {s_['median_train_seconds']:.1f}; {len(rs)} seeds)")
    if "sb3" in summary and "proxrl" in summary:
        sb, px = summary["sb3"], summary["proxrl"]
        diff = px["mean_final_eval"] - sb["mean_final_eval"]
        # seed noise: the pooled seed-to-seed standard deviation of both sides (usable with one seed on a side)
        groups = [[r["final_eval_mean"] for r in runs if r["side"] == side] for side in ("sb3", "proxrl")]
        dof = sum(len(g) - 1 for g in groups)
        pooled_sd = math.sqrt(sum((len(g) - 1) * statistics.variance(g) for g in groups if len(g) >= 2) / dof) \
            if dof > 0 else math.nan
        se_diff = pooled_sd * math.sqrt(1 / sb["runs"] + 1 / px["runs"])
        ratios = {
            "train_seconds_sb3_over_proxrl_means": sb["mean_train_seconds"] / px["mean_train_seconds"],
            "train_seconds_sb3_over_proxrl_medians": sb["median_train_seconds"] / px["median_train_seconds"],
            "train_seconds_proxrl_over_sb3_means": px["mean_train_seconds"] / sb["mean_train_seconds"],
            "train_cpu_seconds_sb3_over_proxrl_means": sb["mean_train_cpu_seconds"] / px["mean_train_cpu_seconds"],
            "return_difference_proxrl_minus_sb3_means": diff,
            "return_difference_proxrl_minus_sb3_medians": px["median_final_eval"] - sb["median_final_eval"],
            "return_pooled_seed_sd": pooled_sd,
            "return_difference_standard_error": se_diff,
        }
        summary["ratios"] = ratios
        print(f"ratios: training seconds SB3/proxrl = {ratios['train_seconds_sb3_over_proxrl_means']:.2f}x (means), "
              f"{ratios['train_seconds_sb3_over_proxrl_medians']:.2f}x (medians), CPU seconds SB3/proxrl "
              f"{ratios['train_cpu_seconds_sb3_over_proxrl_means']:.2f}x (means); return proxrl - SB3 = {diff:+.1f} "
              f"(means; pooled seed s.d. {pooled_sd:.1f}, s.e. of the difference {se_diff:.1f}), "
              f"{ratios['return_difference_proxrl_minus_sb3_medians']:+.1f} (medians)")
        # "within seed noise": not below SB3's mean by more than one standard error of the difference of the means
        # (pooled s.d. x sqrt(1/n_sb3 + 1/n_proxrl)); with one seed on both sides: proxrl's return must be >= SB3's
        ok_ret = diff >= (-se_diff if math.isfinite(se_diff) else 0.0)
        ok_time = ratios["train_seconds_proxrl_over_sb3_means"] <= TARGETS["halfcheetah_wall_fraction"]
        summary["targets"] = {"return": ok_ret, "time": ok_time}
        print(f"issue 9 target: return >= SB3's within seed noise (mean difference >= -1 s.e.): "
              f"{'met' if ok_ret else 'NOT met'}; training time <= {TARGETS['halfcheetah_wall_fraction']} x SB3's "
              f"(means: {ratios['train_seconds_proxrl_over_sb3_means']:.3f}): {'met' if ok_time else 'NOT met'}; "
              f"overall {'met' if ok_ret and ok_time else 'NOT met'}")
        if steps.get("sb3") != steps.get("proxrl"):
            print("note: the two sides ran different step counts; the comparison is not like for like")
    return summary


# ================================================================================ main
def _interleaved(env: str, seeds: int, steps: int, sides: list[str], proxrl_set: dict | None = None) -> list[dict]:
    runs = []
    for i in range(seeds):
        order = sides if i % 2 == 0 else sides[::-1]
        for side in order:
            load = os.getloadavg()[0]
            r = run_side(side, env, i, steps, proxrl_set=proxrl_set)
            r["loadavg_before"], r["loadavg_after"] = load, os.getloadavg()[0]
            print(f"  {env} seed {i} {side}: train {r['train_seconds']:.2f} s, "
                  f"solved@{r.get('solved_step')}, final eval {r['final_eval_mean']:.1f} "
                  f"(process {r['child_wall_seconds']:.1f} s; load {r['loadavg_before']:.2f} -> {r['loadavg_after']:.2f})", flush=True)
            runs.append(r)
    return runs


def _interleaved_halfcheetah(seeds: dict[str, int], steps: dict[str, int], sides: list[str],
                             proxrl_set: dict | None = None, partial=None, start: int = 0) -> list[dict]:
    """Seed i of each side in turn (SB3 first on even i, proxrl first on odd i); a side stops at its seed count.

    ``partial(runs)``, if given, is called after every run (the long benchmark saves what it has so far).
    """
    runs = []
    for i in range(start, start + max(seeds[s] for s in sides)):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            if i >= start + seeds[side]:
                continue
            load = os.getloadavg()[0]
            print(f"  [{time.strftime('%H:%M:%S')}] halfcheetah seed {i} {side}: {steps[side]} steps ...", flush=True)
            r = run_side(side, "halfcheetah", i, steps[side], proxrl_set=proxrl_set)
            r["loadavg_before"], r["loadavg_after"] = load, os.getloadavg()[0]
            backend = f", {r['grad_backend_used']} gradient" if r.get("grad_backend_used") else ""
            print(f"  halfcheetah seed {i} {side}: final return {r['final_eval_mean']:.1f} +- {r['final_eval_std']:.0f}, "
                  f"train {r['train_seconds']:.1f} s ({r['steps_per_second']:.0f} steps/s{backend}; process "
                  f"{r['child_wall_seconds']:.1f} s; load {r['loadavg_before']:.2f} -> {r['loadavg_after']:.2f})",
                  flush=True)
            runs.append(r)
            if partial is not None:
                partial(runs)
    return runs


def print_breakdown(r: dict) -> dict:
    """Where one proxrl run's training time went, from the stage timers of ``--breakdown``."""
    b = {k: v["seconds"] for k, v in r["breakdown"].items()}
    calls = {k: v["calls"] for k, v in r["breakdown"].items()}
    total = r["train_seconds"]
    vsteps = calls.get("rollout.env_step", 0)
    mb = calls.get("update.adam", 0)
    g = b.get
    rows = [
        ("rollout: env.step", g("rollout.env_step", 0.0), vsteps),
        ("rollout: policy act (forward + sampling)", g("rollout.policy_act", 0.0), vsteps),
        ("rollout: obs/reward normalisers", g("rollout.obs_norm", 0.0) + g("rollout.reward_scaler", 0.0), vsteps),
    ]
    rows.append(("rollout: other (buffers, bookkeeping, last V)", g("rollout", 0.0) - sum(v for _, v, _ in rows), vsteps))
    fwd, bwd = g("update.forward", 0.0), g("update.backward", 0.0)
    n_upd = calls.get("update", 0)
    upd = [("update: GAE", g("update.gae", 0.0), n_upd), ("update: MLP forward (actor + critic)", fwd, mb)]
    if "update.loss_and_grad" in b:  # numpy backend: loss maths = the call minus the MLP passes inside it
        upd.append(("update: loss + d loss/d outputs", g("update.loss_and_grad") - fwd - bwd, mb))
    upd.append(("update: MLP backward", bwd, mb))
    upd.append(("update: grad clip", g("update.clip", 0.0), mb))
    upd.append(("update: Adam", g("update.adam", 0.0), mb))
    upd.append(("update: other (gathers, expl. var., loop)", g("update", 0.0) - sum(v for _, v, _ in upd), n_upd))
    rows += upd
    rows.append(("metrics logging", g("log", 0.0), calls.get("log", 0)))
    rows.append(("train loop other (schedules, rows, timers)", total - sum(v for _, v, _ in rows), 0))
    env_id = r.get("config", {}).get("env_id", "CartPole-v1")
    print(f"\nproxrl {env_id} seed {r['seed']}: {r['steps']} steps, train_seconds {total:.3f} "
          f"({r['steps'] / total:.0f} steps/s); {vsteps} vector env steps ({r.get('num_envs', 8)} envs), "
          f"{mb} minibatch steps, {r.get('grad_backend_used') or '?'} gradient")
    print(f"{'stage':<46} {'seconds':>8} {'share':>6} {'us per':>12}")
    for name, sec, n in rows:
        unit = "vec step" if name.startswith("rollout") else "minibatch" if n == mb else "update" if n == n_upd else ""
        per = f"{sec / n * 1e6:6.1f} {unit}" if n else ""
        print(f"{name:<46} {sec:>8.3f} {sec / total:>6.1%}   {per}")
    for k in ("evaluation (excluded)", "checkpoint (excluded)"):
        if k in b:
            print(f"{k:<46} {b[k]:>8.3f}")
    return {name: sec for name, sec, _ in rows}


def _profile(out: str, steps: int, env: str = "cartpole", proxrl_set: dict | None = None) -> dict:
    import pstats

    extra = ["--eval-every", str(EVAL_EVERY[env])] + (["--set-json", json.dumps(proxrl_set)] if proxrl_set else [])
    r = _run_child([str(SIDES["proxrl"]), "--breakdown", *extra, env, "0", str(steps)])
    split = print_breakdown(r)
    p = _run_child([str(SIDES["proxrl"]), "--profile", out, *extra, env, "0", str(steps)])
    print(f"\ncProfile run: train_seconds {p['train_seconds']:.2f} (inflated by cProfile), solved at {p['solved_step']}, "
          f"final eval {p['final_eval_mean']:.1f}")
    stats = pstats.Stats(out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    return {"breakdown_run": r, "split": split, "profile_file": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", choices=("cartpole", "pendulum", "breakout", "halfcheetah", "all"), default="all",
                   help="all = cartpole + pendulum (breakout and halfcheetah only when asked: minutes per run)")
    p.add_argument("--seeds", type=int, default=5, help="CartPole seeds per side (default 5)")
    p.add_argument("--pendulum-seeds", type=int, default=3, help="Pendulum seeds per side (default 3)")
    p.add_argument("--breakout-seeds", type=int, default=1, help="Breakout seeds per side (default 1)")
    p.add_argument("--halfcheetah-seeds", type=int, default=3, help="HalfCheetah seeds per side (default 3)")
    p.add_argument("--halfcheetah-sb3-seeds", type=int, default=None,
                   help="HalfCheetah seeds of the SB3 side only (default: --halfcheetah-seeds)")
    p.add_argument("--halfcheetah-steps", type=int, default=None,
                   help=f"HalfCheetah env steps per run (default {STEPS['halfcheetah']}; --quick {QUICK_STEPS['halfcheetah']})")
    p.add_argument("--halfcheetah-seed-start", type=int, default=0,
                   help="first HalfCheetah seed (seeds START..START+n-1; to add seeds to an earlier run)")
    p.add_argument("--halfcheetah-add-json", action="append", default=[], metavar="EARLIER.json[:SIDE]",
                   help="also report the HalfCheetah runs of an earlier --json of this script (e.g. more seeds; "
                        "repeatable; ':sb3' or ':proxrl' takes only that side's runs)")
    p.add_argument("--proxrl-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ControlConfig field of the proxrl side, any env (repeatable; VALUE is a YAML "
                        "scalar), e.g. --proxrl-set vector_mode=native")
    p.add_argument("--sides", default="sb3,proxrl", help="comma-separated subset of sb3,proxrl")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of both sides (default 1); more than 1 runs them with GNU OpenMP's default "
                        "spin-then-sleep wait instead of OMP_WAIT_POLICY=PASSIVE (use only on otherwise idle cores)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed each, 20k CartPole / 8k Pendulum / 20k HalfCheetah steps")
    p.add_argument("--json", default=None, help="write all per-run results and the summary to this file")
    p.add_argument("--profile", default=None,
                   help="only profile one proxrl run (CartPole, or the --env given: stage timers, then cProfile into "
                        "this file)")
    p.add_argument("--backends", default=None,
                   help="proxrl only: compare these --grad-backend values (e.g. numpy,autograd) in env-steps/s")
    p.add_argument("--_envspeed", nargs=2, metavar=("OUT", "STEPS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._envspeed:
        worker_envspeed(a._envspeed[0], int(a._envspeed[1]))
        return
    if a.threads < 1:
        p.error(f"--threads={a.threads} must be at least 1")
    THREADS[0] = a.threads
    steps = dict(QUICK_STEPS if a.quick else STEPS)
    if a.halfcheetah_steps is not None:
        if a.halfcheetah_steps < 1:
            p.error(f"--halfcheetah-steps={a.halfcheetah_steps} must be at least 1")
        steps["halfcheetah"] = a.halfcheetah_steps
    for name in ("halfcheetah_seeds", "halfcheetah_sb3_seeds"):
        if getattr(a, name) is not None and getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= 0")
    from proxrl.errors import UserError

    try:
        proxrl_set = parse_proxrl_set(a.proxrl_set)
        if proxrl_set:  # type-check the values now, not after the first SB3 run: the preset of each env + them
            from proxrl.config import from_dict
            from proxrl.control import PRESETS, ControlConfig

            env_ids = {"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1", "breakout": "ALE/Breakout-v5",
                       "halfcheetah": "HalfCheetah-v5"}
            for env in (("cartpole", "pendulum") if a.env == "all" else (a.env,)):
                from_dict(ControlConfig, {**PRESETS[env_ids[env]], **proxrl_set}, source="--proxrl-set")
    except UserError as e:
        p.error(str(e))
    if proxrl_set:
        print(f"proxrl overrides: {proxrl_set}", flush=True)
    if a.backends:
        backends = [b for b in a.backends.split(",") if b]
        if not backends or any(b not in ("auto", "numpy", "autograd") for b in backends):
            p.error(f"--backends={a.backends!r}: use a comma-separated subset of auto,numpy,autograd")
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}  cpus={os.cpu_count()}  load average at start "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        res = {env: compare_backends(env, n, steps[env], backends, proxrl_set)
               for env, n in (("cartpole", a.seeds), ("pendulum", a.pendulum_seeds)) if a.env in (env, "all")}
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1, default=lambda x: None))
        return
    if a.profile:
        penv = "cartpole" if a.env == "all" else a.env
        res = _profile(a.profile, steps[penv], penv, proxrl_set)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return
    sides = [s for s in a.sides.split(",") if s]
    if any(s not in SIDES for s in sides) or not sides:
        p.error(f"--sides={a.sides!r}: use a comma-separated subset of sb3,proxrl")
    seeds = 1 if a.quick else a.seeds
    pseeds = 1 if a.quick else a.pendulum_seeds

    import platform

    import gymnasium
    import stable_baselines3
    import torch

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "loadavg_start": os.getloadavg(),
        "quick": a.quick,
        "proxrl_set": proxrl_set,
        "threads": a.threads,
        "argv": sys.argv[1:],
    }
    print(f"{meta['date']}  cpus={meta['host_cpus']}  torch {meta['torch']}  gymnasium {meta['gymnasium']}  "
          f"SB3 {meta['stable_baselines3']}  torch threads per side {a.threads}  load average at start "
          f"{meta['loadavg_start'][0]:.2f}", flush=True)
    results: dict = {"meta": meta}
    if a.env in ("cartpole", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "limit.json"
            subprocess.run([sys.executable, __file__, "--_envspeed", str(out), str(steps["cartpole"])],
                           cwd=ROOT, env=_child_env(), check=True)
            limit = json.loads(out.read_text())
        print(f"  env-only limit: native {limit['native_vector_env']:.0f} steps/s, "
              f"SB3 DummyVecEnv {limit['sb3_dummy_vec_env']:.0f} steps/s", flush=True)
        runs = _interleaved("cartpole", seeds, steps["cartpole"], sides, proxrl_set)
        results["cartpole"] = {"runs": runs, "env_only_limit": limit}
    if a.env in ("pendulum", "all"):
        runs = _interleaved("pendulum", pseeds, steps["pendulum"], sides, proxrl_set)
        results["pendulum"] = {"runs": runs}
    if a.env == "breakout":
        runs = _interleaved("breakout", a.breakout_seeds, steps["breakout"], sides, proxrl_set)
        results["breakout"] = {"runs": runs, "summary": report_breakout(runs, 4 * steps["breakout"])}
    if a.env == "halfcheetah":
        n = 1 if a.quick else a.halfcheetah_seeds
        hc_seeds = {"proxrl": n, "sb3": n if a.halfcheetah_sb3_seeds is None else a.halfcheetah_sb3_seeds}
        hc_steps = {side: steps["halfcheetah"] for side in sides}
        def partial(done: list[dict]) -> None:
            if a.json:
                Path(a.json).write_text(json.dumps({**results, "halfcheetah": {"runs": done, "partial": True}},
                                                   indent=1, default=lambda x: None))

        runs = _interleaved_halfcheetah(hc_seeds, hc_steps, sides, proxrl_set, partial, a.halfcheetah_seed_start)
        for spec in a.halfcheetah_add_json:  # earlier runs first; a (side, seed) measured twice keeps the newer run
            path, _, only = spec.rpartition(":") if spec.endswith((":sb3", ":proxrl")) else (spec, "", "")
            earlier = json.loads(Path(path).read_text())["halfcheetah"]
            new = {(r["side"], r["seed"]) for r in runs}
            runs = [r for r in earlier["runs"] if (r["side"], r["seed"]) not in new and only in ("", r["side"])] + runs
            for side, n in earlier.get("steps", {}).items():
                if only in ("", side):
                    hc_steps.setdefault(side, n)
        results["halfcheetah"] = {"runs": runs, "added_from": a.halfcheetah_add_json, "steps": hc_steps,
                                  "seeds": {s_: sum(r["side"] == s_ for r in runs) for s_ in ("sb3", "proxrl")}}
    meta["loadavg_end"] = os.getloadavg()
    if "cartpole" in results:
        c = results["cartpole"]
        c["summary"] = report_cartpole(c["runs"], steps["cartpole"], c["env_only_limit"])
    if "pendulum" in results:
        results["pendulum"]["summary"] = report_pendulum(results["pendulum"]["runs"], steps["pendulum"])
    if "halfcheetah" in results:
        h = results["halfcheetah"]
        h["summary"] = report_halfcheetah(h["runs"], h["steps"])
    print(f"\nload average (1 min) at start {meta['loadavg_start'][0]:.2f}, at end {meta['loadavg_end'][0]:.2f} "
          f"on {meta['host_cpus']} cpus")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=lambda x: None))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
