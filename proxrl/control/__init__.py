"""proxrl.control: PPO on Gymnasium environments (Discrete, Box, MultiDiscrete, MultiBinary actions; vector,
image and Dict observations), CleanRL-style and fast.

Public API::

    ControlConfig, PRESETS
    train(cfg, run_dir, resume=False, progress=True, env_fn=None) -> dict
    evaluate_run(run_dir, episodes=None, seed=None, env_fn=None) -> dict
    plot_run(run_dir, dims=None, env_fn=None) -> list[Path]

The names are resolved on first use (PEP 562), so ``import proxrl.control.config`` (what ``proxrl --help``
needs) does not import torch or gymnasium's environments.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ControlConfig": "config",
    "Sizes": "config",
    "sizes": "config",
    "PRESETS": "presets",
    "train": "trainer",
    "evaluate_run": "evaluate",
    "plot_run": "plots",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'proxrl.control' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"proxrl.control.{_WHERE[name]}"), name)
    globals()[name] = value  # resolved once (no module of this package is named like a public function)
    return value
