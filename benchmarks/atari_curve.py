"""Learning curves of proxrl Atari runs against frames, beside a uniform-random policy measured the same way.

For each RUN_DIR (a ``proxrl train ALE/...`` run directory): the training episodic return (the training envs'
episodes, i.e. single lives with clipped rewards; running mean over 10 updates) and the logged evaluations
(whole games, raw scores; greedy or sampled actions as the run's ``eval_deterministic``), both against emulator
frames (4 per agent step). The random policy's figures are measured here on the same envs: ``--random-steps``
vector steps of 8 training envs (per-life clipped return) and ``--random-games`` evaluation games through
:class:`proxrl.control.evaluate.Evaluator` with uniform logits (whole-game score).

Usage::

    python benchmarks/atari_curve.py RUN_DIR [RUN_DIR ...] --out benchmarks/img/breakout_curve.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

FRAMES_PER_STEP = 4


def random_baselines(env_id: str, vector_mode: str, steps: int, games: int, seed: int = 0) -> tuple[float, float]:
    """(mean per-episode return in the training envs, mean whole-game return in the evaluation envs) of a
    uniform-random policy."""
    from gymnasium import spaces

    from proxrl.control.cnn import CNNActorCritic
    from proxrl.control.distributions import action_dist_for
    from proxrl.control.envs import make_vector_env
    from proxrl.control.evaluate import Evaluator
    from proxrl.control.running_stats import ObsNormalizer

    venv, info = make_vector_env(env_id, 8, vector_mode)
    try:
        venv.reset(seed=seed)
        rng = np.random.default_rng(seed)
        ret, done_before, episodes = np.zeros(8), np.zeros(8, bool), []
        for _ in range(steps):
            _, r, term, trunc, _ = venv.step(rng.integers(0, info.dist.out_dim, 8))
            ret += np.where(done_before, 0.0, r)
            done_before = term | trunc
            episodes += ret[done_before].tolist()
            ret[done_before] = 0.0
    finally:
        venv.close()
    policy = CNNActorCritic(info.obs_shape, action_dist_for(spaces.Discrete(info.dist.out_dim)))
    with torch.no_grad():
        policy.actor_head.weight.zero_()
        policy.actor_head.bias.zero_()
    ev = Evaluator(env_id, games, vector_mode, deterministic=False)
    try:
        game = ev.evaluate(policy, ObsNormalizer(1, enabled=False), seed)["mean_return"]
    finally:
        ev.close()
    return float(np.mean(episodes)), float(game)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--random-steps", type=int, default=3000)
    p.add_argument("--random-games", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    baselines: dict[tuple[str, str], tuple[float, float]] = {}
    for run, color in zip(a.runs, ("tab:blue", "tab:orange", "tab:green", "tab:purple")):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        label = f"{run.name} ({cfg['vector_mode']}, bf16={cfg.get('bf16', False)})"
        x = np.array([r["global_step"] * FRAMES_PER_STEP for r in rows], float)
        y = np.array([r.get("episodic_return", np.nan) for r in rows], float)
        ok = np.isfinite(y)
        k = 10
        smooth = np.convolve(y[ok], np.ones(k) / k, mode="valid")
        ax_train.plot(x[ok][k - 1:], smooth, color=color, label=label)
        ev = [(r["global_step"] * FRAMES_PER_STEP, r["eval_return_mean"]) for r in rows if "eval_return_mean" in r]
        if ev:
            ax_eval.plot(*np.array(ev).T, "o-", color=color, label=label)
        key = (cfg["env_id"], cfg["vector_mode"])
        if key not in baselines:
            baselines[key] = random_baselines(cfg["env_id"], cfg["vector_mode"], a.random_steps, a.random_games)
            print(f"random policy, {key}: training episodes {baselines[key][0]:.3f}, whole games {baselines[key][1]:.2f}")
        train_base, game_base = baselines[key]
        ax_train.axhline(train_base, color=color, linestyle=":", linewidth=1)
        ax_eval.axhline(game_base, color=color, linestyle=":", linewidth=1)
        last = ev[-1][1] if ev else float("nan")
        print(f"{run}: last training mean (10 updates) {smooth[-1]:.3f}, last evaluation {last:.2f}, "
              f"{int(x[-1])} frames")
    ax_train.set_title("training episodes (one life, clipped rewards); dotted: random policy")
    ax_eval.set_title("evaluation, whole games, raw score; dotted: random policy")
    for ax in (ax_train, ax_eval):
        ax.set_xlabel("emulator frames")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax_train.set_ylabel("return")
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
