"""proxrl side of ``control_bench.py``: one ``proxrl.control.train`` run, results written as JSON.

Config: ``ControlConfig(**PRESETS[env_id])`` (CartPole-v1: rl-zoo's values, identical to the SB3 side;
Pendulum-v1: proxrl's preset, a plain Gaussian policy tuned for the same 4 envs x 1024 steps budget) with the
benchmark's settings on top: ``seed``, ``total_steps``, ``eval_every`` (CartPole 5000, Pendulum 0 = only at
the end), ``eval_episodes=20``, ``checkpoint_every=0`` (only the final one), ``tensorboard=False`` (the SB3
side logs nothing either; metrics.jsonl/csv are still written) and ``progress=False``.

Numbers are read from the run's ``metrics.jsonl``: ``train_seconds`` is proxrl's own cumulative training wall
time (rollouts, updates and metric logging; evaluation and checkpoint writing excluded); the first row whose
``eval_return_mean >= 475`` gives the steps and seconds to solve CartPole.

``--grad-backend numpy|autograd`` overrides the config's ``grad_backend`` (default ``auto``, which is numpy
for these MLP policies), to compare the closed-form numpy gradient with torch autograd.

``breakout``: ``PRESETS["ALE/Breakout-v5"]`` (CleanRL ppo_atari: 8 async envs x 128 steps, 4 minibatches, 4
epochs, Nature CNN), STEPS agent steps (4 frames each), one whole-game evaluation at the end (not timed).

``halfcheetah``: ``PRESETS["HalfCheetah-v5"]`` (rl-baselines3-zoo's tuned HalfCheetah-v4 entry: 1 env x 512
steps, 8 minibatches of 64, 20 epochs, lr 2.0633e-5, gamma 0.98, lambda 0.92, clip 0.1, ReLU pi/vf [256, 256],
log std -2, obs + reward normalisation); no evaluation during training (``--eval-every 0``), one final
deterministic evaluation of ``--eval-episodes`` (10) episodes with the observation statistics frozen (not timed).

``--set-json '{"key": value, ...}'`` overrides any ``ControlConfig`` field last (after the benchmark's own
settings), e.g. ``{"vector_mode": "native"}``; ``control_bench.py --proxrl-set KEY=VALUE`` builds it.

Usage: ``python benchmarks/_proxrl_control_side.py {cartpole,pendulum,breakout,halfcheetah} SEED STEPS OUT.json
[--eval-every N] [--eval-episodes N] [--grad-backend auto|numpy|autograd] [--set-json JSON] [--profile OUT.prof]
[--breakdown]``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402

from proxrl.config import from_dict  # noqa: E402
from proxrl.control import PRESETS, ControlConfig, train  # noqa: E402

SOLVED = 475.0
ENV_IDS = {"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1", "breakout": "ALE/Breakout-v5",
           "halfcheetah": "HalfCheetah-v5"}
# Breakout: one whole game at the end, not timed; HalfCheetah: 10 episodes at the end, not timed
EVAL_EPISODES = {"cartpole": 20, "pendulum": 20, "breakout": 1, "halfcheetah": 10}


class _Timers:
    """Wall-clock totals of wrapped functions (``--breakdown``): ``key -> [seconds, calls]``.

    A wrapper costs two ``perf_counter`` calls (~0.2 us), small next to the ~10-50 us functions it times.
    """

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}

    def wrap(self, owner: object, name: str, key: str) -> None:
        fn = None if owner is None else getattr(owner, name, None)
        if fn is None:
            return
        slot = self.totals.setdefault(key, [0.0, 0])
        clock = time.perf_counter

        def timed(*args, **kwargs):
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                slot[0] += clock() - t
                slot[1] += 1

        setattr(owner, name, timed)


def _optional(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _install_breakdown() -> _Timers:
    """Wrap the stages of proxrl's training loop with timers (by name, skipping any that do not exist)."""
    import importlib

    def mod(name: str):
        return importlib.import_module(f"proxrl.control.{name}")

    ppo_mod, train_mod, adam, policy = mod("ppo"), mod("trainer"), mod("adam"), mod("policy")
    rollout, running_stats, Evaluator = mod("rollout"), mod("running_stats"), mod("evaluate").Evaluator

    timers = _Timers()
    timers.wrap(rollout.Collector, "collect", "rollout")
    make_venv = train_mod.make_vector_env

    def make_timed_venv(*args, **kwargs):
        venv, info = make_venv(*args, **kwargs)
        timers.wrap(venv, "step", "rollout.env_step")  # instance attribute: the training env only
        return venv, info

    train_mod.make_vector_env = make_timed_venv
    fast = getattr(policy, "NumpyPolicy", None)
    for cls in (policy.ActorCritic, fast):
        if cls is not None:
            timers.wrap(cls, "act", "rollout.policy_act")  # value() of the last obs is left in "other"
    timers.wrap(running_stats.ObsNormalizer, "__call__", "rollout.obs_norm")
    timers.wrap(running_stats.RewardScaler, "__call__", "rollout.reward_scaler")
    timers.wrap(train_mod, "ppo_update", "update")
    timers.wrap(ppo_mod, "compute_advantages", "update.gae")
    # numpy backend (closed-form loss gradient, hand-written MLP backward), if present
    ppo_grad, mlp_grad = _optional("proxrl.control.ppo_grad"), _optional("proxrl.control.mlp_grad")
    if ppo_grad is not None:
        timers.wrap(getattr(ppo_grad, "NumpyPPOGradient", None), "__call__", "update.loss_and_grad")
    if mlp_grad is not None:
        for cls_name in ("NumpyMLP", "PairedMLP"):  # PairedMLP: both MLPs at once (large hidden layers)
            timers.wrap(getattr(mlp_grad, cls_name, None), "forward", "update.forward")
            timers.wrap(getattr(mlp_grad, cls_name, None), "backward", "update.backward")
    # autograd backend (nn forward, loss.backward()), if used
    timers.wrap(policy.ActorCritic, "evaluate", "update.forward")
    timers.wrap(torch.Tensor, "backward", "update.backward")
    timers.wrap(ppo_mod, "clip_grad_norm", "update.clip")
    timers.wrap(adam.FlatAdam, "step", "update.adam")
    timers.wrap(train_mod.MetricsLogger, "log", "log")
    timers.wrap(Evaluator, "evaluate", "evaluation (excluded)")
    timers.wrap(train_mod, "save_checkpoint", "checkpoint (excluded)")
    return timers


def _record_grad_backend() -> list[str]:
    """The gradient backend the trainer resolves (``auto`` -> numpy or autograd), appended to the returned list."""
    import proxrl.control.trainer as train_mod

    seen: list[str] = []
    resolve = train_mod.resolve_grad_backend

    def recording(*args, **kwargs):
        backend = resolve(*args, **kwargs)
        seen.append(str(backend))
        return backend

    train_mod.resolve_grad_backend = recording
    return seen


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(env: str, seed: int, steps: int, eval_every: int, profile: str | None = None, breakdown: bool = False,
        grad_backend: str = "auto", eval_episodes: int | None = None, overrides: dict | None = None,
        threads: int = 1) -> dict:
    timers = _install_breakdown() if breakdown else None
    env_id = ENV_IDS[env]
    cfg = from_dict(ControlConfig, {  # from_dict: the --set-json values are type-checked like a config.yaml's
        **PRESETS[env_id], "seed": seed, "total_steps": steps, "eval_every": eval_every,
        "eval_episodes": eval_episodes or EVAL_EPISODES[env],
        "checkpoint_every": 0, "tensorboard": False, "threads": threads, "grad_backend": grad_backend,
        **(overrides or {}),
    }, source="--set-json")
    tmp = Path(tempfile.mkdtemp(prefix=f"proxrl_bench_{env}_"))
    resolved = _record_grad_backend()
    eval_cpu = [0.0]
    if True:  # CPU seconds of the train() call exclude the (untimed) evaluation, as train_seconds does
        from proxrl.control.evaluate import Evaluator

        evaluate = Evaluator.evaluate

        def timed_evaluate(self, *args, **kwargs):
            c = time.process_time()
            try:
                return evaluate(self, *args, **kwargs)
            finally:
                eval_cpu[0] += time.process_time() - c

        Evaluator.evaluate = timed_evaluate
    try:
        run_dir = tmp / "run"
        c0 = time.process_time()
        t0 = time.perf_counter()
        if profile:
            import cProfile

            prof = cProfile.Profile()
            final = prof.runcall(train, cfg, run_dir, progress=False)
            prof.dump_stats(profile)
        else:
            final = train(cfg, run_dir, progress=False)
        call_seconds = time.perf_counter() - t0
        learner_cpu = time.process_time() - c0 - eval_cpu[0]
        rows = _read_metrics(run_dir / "metrics.jsonl")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    last = rows[-1]
    evals = [
        {"step": r["global_step"], "train_seconds": r["train_seconds"], "eval_return_mean": r["eval_return_mean"]}
        for r in rows if r.get("eval_return_mean") is not None
    ]
    solved = next((e for e in evals if e["eval_return_mean"] >= SOLVED), None) if env == "cartpole" else None
    out = {
        "steps": int(last["global_step"]),
        "train_seconds": float(last["train_seconds"]),
        "steps_per_second": last["global_step"] / last["train_seconds"],
        "train_call_seconds": call_seconds,  # the whole train() call: set-up, evaluations and checkpoint included
        "solved_step": solved["step"] if solved else None,
        "solved_seconds": solved["train_seconds"] if solved else None,
        "evals": evals,
        "final_eval_mean": float(final["eval_return_mean"]),
        "final_eval_std": float(final["eval_return_std"]),
        "updates": math.ceil(last["global_step"] / (cfg.num_envs * cfg.rollout_steps)),
        "num_envs": cfg.num_envs,
        "grad_backend_used": resolved[0] if resolved else None,  # what auto resolved to
        "train_cpu_seconds": learner_cpu,  # process CPU time of train() less evaluations (set-up included)
        "config": dataclasses.asdict(cfg),
    }
    if env == "breakout":
        out.update(frames=4 * out["steps"], frames_per_second=4 * out["steps_per_second"],
                   learner_cpu_seconds=learner_cpu)  # this process only (set-up included); env workers excluded
    if timers is not None:
        out["breakdown"] = {k: {"seconds": v[0], "calls": v[1]} for k, v in timers.totals.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("env", choices=tuple(ENV_IDS))
    p.add_argument("seed", type=int)
    p.add_argument("steps", type=int)
    p.add_argument("out")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=None, help="final/periodic evaluation episodes (default: per env)")
    p.add_argument("--set-json", default=None, help="JSON object of ControlConfig overrides, applied last")
    p.add_argument("--profile", default=None, help="write a cProfile of the train() call to this file")
    p.add_argument("--breakdown", action="store_true", help="time the stages of the loop (rollout, update, ...)")
    p.add_argument("--grad-backend", choices=("auto", "numpy", "autograd"), default="auto",
                   help="ControlConfig.grad_backend (auto = numpy for these MLP policies)")
    p.add_argument("--threads", type=int, default=1, help="ControlConfig.threads (torch threads; default 1)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import_seconds = time.perf_counter() - T_START
    overrides = json.loads(a.set_json) if a.set_json else {}
    if not isinstance(overrides, dict):
        p.error(f"--set-json={a.set_json!r} must be a JSON object")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ControlConfig)})
    if unknown:
        p.error(f"--set-json: {', '.join(unknown)} is not a ControlConfig field")
    res = run(a.env, a.seed, a.steps, a.eval_every, a.profile, a.breakdown, a.grad_backend, a.eval_episodes, overrides,
              a.threads)
    res.update(side="proxrl", env=a.env, seed=a.seed, grad_backend=a.grad_backend, overrides=overrides, threads=a.threads,
               import_seconds=import_seconds,
               process_seconds=time.perf_counter() - T_START)
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
