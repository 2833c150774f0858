"""Checkpoint and resume of a plain supervised training loop (SFT, reward model).

One :func:`proxrl.runs.save_checkpoint` directory holds everything the loop needs to continue exactly as if it
had never stopped: the model's weights (``model.*``), the AdamW state (``optim.<param id>.<key>``), the LR
scheduler's position, the data-order generator, the global RNG and the loop's own counters (``loop``: a small
JSON-able dict such as the pending shuffled order and the current logging window).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from proxrl.errors import UserError
from proxrl.runs import (
    CheckpointError,
    RunDir,
    generator_state,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_generator_state,
    set_rng_state,
    verify_checkpoint,
)
from proxrl.runs.finite import check_finite

__all__ = ["resume_checkpoint", "save_train_state", "load_train_state", "pack_optimizer", "unpack_optimizer"]

#: what :func:`save_train_state` writes into a checkpoint's state.json (checked on load)
STATE_KEYS = ("step", "optimizer", "scheduler", "generator", "rng", "loop")


def resume_checkpoint(run: RunDir) -> Path:
    """The checkpoint to resume ``run`` from: its newest, verified (sha256 of both files).

    Raises:
        UserError (one line): the directory holds no run or no checkpoint, or its newest checkpoint is corrupt or
        incomplete (naming it, and the previous good one to fall back to by deleting the newest, if any).
    """
    if not run.has_run():
        raise UserError(f"cannot resume {str(run.path)!r}: it holds no run (no config.yaml)")
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UserError(f"cannot resume {str(run.path)!r}: it has no complete checkpoint (runs save them with "
                        f"--checkpoint-every N); delete it or pass --overwrite to start again")
    try:
        verify_checkpoint(ckpt)
    except CheckpointError:
        load_latest_checkpoint(run)  # raises the one-line error that names the previous good checkpoint
        raise
    return ckpt


def _jsonable(obj: Any) -> bool:
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


def pack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Put the optimizer's tensor state into ``tensors`` as ``optim.<param id>.<key>``; return the JSON part
    (``param_groups`` and the non-tensor per-parameter values)."""
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return {"param_groups": opt["param_groups"], "scalars": scalars}


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], packed: dict[str, Any],
                     path: Path) -> None:
    """Inverse of :func:`pack_optimizer`; UserError naming ``path`` if the state does not fit ``optimizer``."""
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v
    for pid, sc in packed.get("scalars", {}).items():
        opt_state.setdefault(int(pid), {}).update(sc)
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": packed["param_groups"]})
    except (ValueError, KeyError) as e:
        raise UserError(f"optimizer state in {path} does not match this config ({e}); resume with the run's "
                        f"own config") from e


def save_train_state(run: RunDir, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, generator: torch.Generator, loop: dict[str, Any], keep: int = 0) -> Path:
    """Write ``run/checkpoints/step_<step>`` (atomic); keep the newest ``keep`` checkpoints (0 = all)."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        check_finite(f"weight {k!r}", v, f"step {step}", "start again with a lower --learning-rate")
        tensors[f"model.{k}"] = v
    opt_json = pack_optimizer(optimizer, tensors)
    rng_t, rng_s = rng_state()
    tensors.update(rng_t)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas" and _jsonable(v)}
    state = {"step": int(step), "optimizer": opt_json,
             "scheduler": sched, "generator": generator_state(generator), "rng": rng_s, "loop": loop}
    path = save_checkpoint(run.checkpoint_dir(step), tensors, state)
    if keep:
        prune_checkpoints(run, keep=keep)
    return path


def load_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     generator: torch.Generator) -> tuple[int, dict[str, Any]]:
    """Restore what :func:`save_train_state` wrote into the given objects; returns ``(step, loop)``."""
    tensors, state = load_checkpoint(path, require_state=STATE_KEYS)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not match this model ({' '.join(str(e).split())[:200]}); "
                        f"resume with the run's own config") from e
    unpack_optimizer(optimizer, tensors, state["optimizer"], path)
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    set_generator_state(generator, state["generator"])
    set_rng_state(tensors, state["rng"])
    return int(state["step"]), dict(state["loop"])
