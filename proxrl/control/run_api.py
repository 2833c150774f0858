"""Entry points on a finished (or checkpointed) run directory: :func:`evaluate_run` and :func:`plot_run`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from proxrl.control.checkpointing import load_agent
from proxrl.control.envs import EnvFactory
from proxrl.control.evaluate import Evaluator
from proxrl.control.train import eval_seed

__all__ = ["evaluate_run", "plot_run"]


def evaluate_run(
    run_dir: str | Path, episodes: int = 10, seed: int | None = None, env_fn: EnvFactory | None = None
) -> dict[str, Any]:
    """Evaluate the latest checkpoint of ``run_dir`` deterministically (greedy actions, frozen obs stats).

    ``seed=None`` uses the run's own evaluation seed, so with ``episodes = eval_episodes`` this reproduces
    the final ``eval_return_mean`` logged during training. ``env_fn`` is needed only for runs trained on a
    Python env factory. Returns ``{"mean_return", "std_return", "episodes", "returns", "lengths", "checkpoint"}``.
    """
    from proxrl.config import check

    check(episodes >= 1, f"episodes={episodes} must be at least 1")
    agent = load_agent(run_dir)
    evaluator = Evaluator(agent.cfg.env_id, episodes, agent.cfg.vector_mode, env_fn)
    try:
        result = evaluator.evaluate(agent.policy, agent.obs_norm, eval_seed(agent.cfg.seed) if seed is None else seed)
    finally:
        evaluator.close()
    return {**result, "episodes": episodes, "checkpoint": str(agent.checkpoint)}


def plot_run(run_dir: str | Path, dims: tuple[int, int] | None = None, env_fn: EnvFactory | None = None) -> list[Path]:
    """Write the run's figures to ``run_dir/plots`` and return their paths (see :mod:`proxrl.control.plots`)."""
    from proxrl.control.plots import plot_all

    return plot_all(run_dir, dims=dims, env_fn=env_fn)
