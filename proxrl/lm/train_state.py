"""Checkpoint and resume of a plain supervised training loop (SFT, reward model).

One :func:`proxrl.runs.save_checkpoint` directory holds everything the loop needs to continue exactly as if it
had never stopped: the model's weights (``model.*``), the AdamW state (``optim.<param id>.<key>``), the LR
scheduler's position, the data-order generator, the global RNG and the loop's own counters (``loop``: a small
JSON-able dict such as the pending shuffled order and the current logging window).

The files do not depend on how the run was laid out: tensors are saved on the CPU (a run saved on a GPU resumes on
a CPU and back), the weights are the whole model's and the optimizer state is in ``torch.optim``'s own id-keyed
layout, also when the model was DDP-wrapped or sharded with FSDP2 (:func:`model_state` and
:func:`optimizer_state` gather the shards), so a checkpoint written with N processes resumes with M, with or
without ``--fsdp``. Under torchrun every rank calls :func:`save_train_state` (gathering shards is collective) and
rank 0 writes; every rank calls :func:`load_train_state` and reads the files itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from proxrl import distributed as D
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

__all__ = ["resume_checkpoint", "save_train_state", "load_train_state", "pack_optimizer", "unpack_optimizer",
           "model_state", "optimizer_state", "load_model_state", "load_optimizer_state"]

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


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _param_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name in ``model`` of each parameter of ``optimizer``, in the optimizer's id order."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            out.append(names[id(p)])
    return out


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU: :func:`proxrl.distributed.full_state_dict` (plain, DDP or FSDP;
    collective under FSDP, where ranks other than 0 get ``{}``)."""
    return D.full_state_dict(model)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` in ``torch.optim``'s id-keyed layout, whole (not sharded) tensors.

    For an FSDP-sharded ``model`` the shards are gathered (collective: every rank calls it; ranks other than 0 get
    ``{}``) and keyed by the same ids a plain model's optimizer uses, so the checkpoint does not depend on FSDP.
    """
    if not _is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:
        return {}
    ids = {fqn: i for i, fqn in enumerate(_param_fqns(model, optimizer))}
    groups = [{**g, "params": [ids[f] for f in g["params"]]} for g in osd["param_groups"]]
    return {"state": {ids[f]: st for f, st in osd["state"].items()}, "param_groups": groups}


def load_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load whole-model ``weights`` (strict) into a plain, DDP or FSDP-sharded ``model`` (each rank keeps its shard)."""
    D.load_full_state_dict(model, weights)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`: load an id-keyed whole state, sharding it for an FSDP ``model``."""
    if not _is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    fqns = _param_fqns(model, optimizer)
    osd = {"state": {fqns[int(i)]: st for i, st in state["state"].items()},
           "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def pack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Put the optimizer's tensor state into ``tensors`` as ``optim.<param id>.<key>``; return the JSON part
    (``param_groups`` and the non-tensor per-parameter values). ``state``: an id-keyed state dict to pack instead
    of ``optimizer.state_dict()`` (e.g. :func:`optimizer_state` of an FSDP model)."""
    opt = optimizer.state_dict() if state is None else state
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return {"param_groups": opt["param_groups"], "scalars": scalars}


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], packed: dict[str, Any],
                     path: Path, model: torch.nn.Module | None = None) -> None:
    """Inverse of :func:`pack_optimizer`; UserError naming ``path`` if the state does not fit ``optimizer``.
    ``model``: the optimizer's model, needed when it is FSDP-sharded (see :func:`load_optimizer_state`)."""
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v
    for pid, sc in packed.get("scalars", {}).items():
        opt_state.setdefault(int(pid), {}).update(sc)
    try:
        full = {"state": opt_state, "param_groups": packed["param_groups"]}
        if model is None:
            optimizer.load_state_dict(full)
        else:
            load_optimizer_state(model, optimizer, full)
    except (ValueError, KeyError, IndexError) as e:
        raise UserError(f"optimizer state in {path} does not match this config ({e}); resume with the run's "
                        f"own config") from e


def save_train_state(run: RunDir, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, generator: torch.Generator, loop: dict[str, Any], keep: int = 0) -> Path:
    """Write ``run/checkpoints/step_<step>`` (atomic); keep the newest ``keep`` checkpoints (0 = all).

    ``model`` may be plain, DDP-wrapped or FSDP-sharded (or a ModuleDict of such). Under torchrun every rank calls
    it (gathering FSDP shards is collective) and only rank 0 writes; returns the checkpoint's path on every rank.
    """
    weights = model_state(model)
    opt_state = optimizer_state(model, optimizer)
    if not D.is_main():
        return run.checkpoint_dir(step)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        check_finite(f"weight {k!r}", v, f"step {step}", "start again with a lower --learning-rate")
        tensors[f"model.{k}"] = v
    opt_json = pack_optimizer(optimizer, tensors, opt_state)
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
    """Restore what :func:`save_train_state` wrote into the given objects; returns ``(step, loop)``.

    ``model`` may be plain, DDP-wrapped or FSDP-sharded: every rank reads the files and keeps what it holds, so the
    checkpoint may have been written with any number of processes, with or without FSDP, on any device.
    """
    tensors, state = load_checkpoint(path, require_state=STATE_KEYS)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        load_model_state(model, weights)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path} does not match this model ({' '.join(str(e).split())[:200]}); "
                        f"resume with the run's own config") from e
    unpack_optimizer(optimizer, tensors, state["optimizer"], path, model=model if _is_fsdp(model) else None)
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    set_generator_state(generator, state["generator"])
    set_rng_state(tensors, state["rng"])
    return int(state["step"]), dict(state["loop"])
