"""Speed benchmark of a preset: env steps and training seconds to the first deterministic eval >= a target.

    python -m proxrl.control.bench --env CartPole-v1 --seeds 1,2,3 --target 475 --eval-every 5000 --episodes 20
    python -m proxrl.control.bench --backend autograd     # the nn + autograd reference gradient, for A/B

Trains the preset (its own ``total_steps``, so the lr/clip schedules are the preset's) with
``target_return`` set, and reports for each seed the env steps and ``train_seconds`` (rollouts + updates +
logging; evaluation and checkpoint writing excluded) at the first evaluation reaching the target.
Not a unit test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from proxrl.control.config import ControlConfig
from proxrl.control.presets import PRESETS
from proxrl.control.ppo import BACKENDS, ppo_update
from proxrl.control.train import train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--target", type=float, default=475.0)
    ap.add_argument("--eval-every", type=int, default=5000)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--backend", choices=BACKENDS, default="numpy",
                    help="how the PPO gradient is computed (see proxrl.control.ppo.ppo_update); 'autograd' = reference")
    args = ap.parse_args(argv)
    if args.backend != "numpy":
        # train() looks ppo_update up in its module at call time
        importlib.import_module("proxrl.control.train").ppo_update = functools.partial(ppo_update, backend=args.backend)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = ControlConfig(**{**PRESETS.get(args.env, {"env_id": args.env}), "seed": seed, "eval_every": args.eval_every,
                                   "eval_episodes": args.episodes, "target_return": args.target, "tensorboard": False,
                                   "checkpoint_every": 0})
            t0 = time.perf_counter()
            train(cfg, Path(tmp) / f"seed{seed}", progress=False)
            wall = time.perf_counter() - t0
            rows = [json.loads(line) for line in open(Path(tmp) / f"seed{seed}" / "metrics.jsonl")]
            evals = [r for r in rows if r.get("eval_return_mean") is not None]
            hit = next((r for r in evals if r["eval_return_mean"] >= args.target), None)
            results.append(hit)
            where = f"steps {hit['global_step']}, train_seconds {hit['train_seconds']:.2f}" if hit else "not reached"
            print(f"seed {seed}: {where} | evals {[round(r['eval_return_mean']) for r in evals]} | "
                  f"steps/s {rows[-1]['steps_per_second']:.0f} | wall incl. eval+startup {wall:.2f}s", flush=True)
    solved = [r for r in results if r]
    if solved:
        print(f"median over solved seeds ({len(solved)}/{len(results)}): steps "
              f"{statistics.median(r['global_step'] for r in solved):.0f}, train_seconds "
              f"{statistics.median(r['train_seconds'] for r in solved):.2f}")


if __name__ == "__main__":
    main()
