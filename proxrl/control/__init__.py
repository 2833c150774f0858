"""proxrl.control: PPO on Gymnasium environments (Discrete and Box actions), CleanRL-style and fast.

Public API::

    ControlConfig, PRESETS
    train(cfg, run_dir, resume=False, progress=True, env_fn=None) -> dict
    evaluate_run(run_dir, episodes=10, seed=None, env_fn=None) -> dict
    plot_run(run_dir, dims=None, env_fn=None) -> list[Path]
"""
from proxrl.control.config import ControlConfig, Sizes, sizes
from proxrl.control.evaluate import evaluate_run
from proxrl.control.plots import plot_run
from proxrl.control.presets import PRESETS
from proxrl.control.train import train

__all__ = ["ControlConfig", "Sizes", "sizes", "PRESETS", "train", "evaluate_run", "plot_run"]
