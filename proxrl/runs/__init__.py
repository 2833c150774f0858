"""Run directory plumbing: layout, config YAML, metrics, checkpoints, RNG state, plots, progress bars.

Imports nothing of proxrl except ``proxrl.errors``.
"""
from proxrl.runs.checkpoint import (
    CheckpointError,
    check_tensor_shapes,
    checkpoint_dir,
    checkpoint_step,
    clean_interrupted_saves,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from proxrl.runs.finite import NonFiniteError, check_finite, first_non_finite
from proxrl.runs.metrics import MetricsLogger, StepLog, read_metrics
from proxrl.runs.plots import plot_metrics, plot_xy
from proxrl.runs.progress import progress_bar
from proxrl.runs.rng import generator_state, rng_state, set_generator_state, set_rng_state
from proxrl.runs.rundir import RunDir, RunLock, atomic_write

__all__ = [
    "RunDir",
    "RunLock",
    "atomic_write",
    "MetricsLogger",
    "StepLog",
    "read_metrics",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "verify_checkpoint",
    "check_tensor_shapes",
    "CheckpointError",
    "clean_interrupted_saves",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "checkpoint_dir",
    "checkpoint_step",
    "rng_state",
    "set_rng_state",
    "generator_state",
    "set_generator_state",
    "plot_metrics",
    "plot_xy",
    "progress_bar",
    "NonFiniteError",
    "check_finite",
    "first_non_finite",
]
