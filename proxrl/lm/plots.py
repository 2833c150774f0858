"""PNG plots of a PPO (RLHF) run from its metrics.jsonl: reward, KL, entropy, length, clipfrac, value loss."""
from __future__ import annotations

import os
from pathlib import Path

from proxrl.runs import plot_metrics

__all__ = ["plot_run", "PLOTS"]

# filename -> (title, metric keys); x axis is the update number ("step" in metrics.jsonl)
PLOTS: dict[str, tuple[str, list[str]]] = {
    "reward": ("Reward", ["score", "reward", "reward_std"]),
    "kl": ("KL to the reference (ref_kl) and between updates (approx_kl)",
           ["ref_kl", "ref_kl_k3", "kl_coef", "approx_kl"]),
    "policy": ("Policy", ["entropy", "clipfrac", "policy_loss", "response_length", "eos_rate"]),
    "value": ("Value function", ["value_loss", "explained_variance"]),
    "speed": ("Throughput", ["tokens_per_second", "time_generation", "time_scoring", "time_training"]),
}


def plot_run(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``run_dir/plots/{reward,kl,policy,value,speed}.png`` (metrics vs update); returns their paths.

    UserError if the run has no metrics yet.
    """
    return [plot_metrics(run_dir, "step", keys, name, f"PPO: {title} vs update")
            for name, (title, keys) in PLOTS.items()]
