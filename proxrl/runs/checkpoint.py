"""Checkpoints: safetensors weights + JSON state, written atomically. Never pickle.

Layout: ``<run_dir>/checkpoints/step_%09d/{model.safetensors,state.json}``. A checkpoint directory is
built under a hidden sibling temp name and renamed into place only once both files are complete and
fsync'ed, so a crash mid-save leaves the previous checkpoints untouched and no partial
``step_*`` directory for :func:`latest_checkpoint` to pick.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from proxrl.errors import UserError
from proxrl.runs.rundir import PathLike, as_path, fsync_dir

WEIGHTS = "model.safetensors"
STATE = "state.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def checkpoint_dir(run_dir: PathLike, step: int) -> Path:
    """``run_dir/checkpoints/step_%09d``."""
    return as_path(run_dir) / "checkpoints" / f"step_{int(step):09d}"


def checkpoint_step(directory: str | os.PathLike[str]) -> int:
    """The step encoded in a ``step_%09d`` directory name. ValueError if the name does not match."""
    m = _STEP_RE.match(Path(directory).name)
    if m is None:
        raise ValueError(f"{directory} is not a step_%09d checkpoint directory")
    return int(m.group(1))


def _prepare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU, make contiguous, and clone tensors that share storage with another tensor."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"checkpoint tensor names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not whole or (ptr != 0 and ptr in seen):
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr != 0:
            seen.add(ptr)
        out[name] = t
    return out


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(directory: str | os.PathLike[str], tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/state.json`` atomically; return ``directory``.

    ``tensors``: name -> tensor of any shape/dtype (moved to CPU; shared or non-contiguous ones are cloned).
    ``state``: JSON-serialisable nested dict (dicts/lists of float/int/str/bool/None; big ints are fine).
    An existing checkpoint of the same name is replaced only after the new one is complete.
    """
    directory = Path(directory)
    try:
        state_text = json.dumps(state, indent=1)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint state for {directory} is not JSON-serialisable: {e}") from e
    prepared = _prepare_tensors(tensors)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = parent / f".{directory.name}{_TMP_MARK}{token}"
    old = parent / f".{directory.name}{_OLD_MARK}{token}"
    tmp.mkdir()
    try:
        save_file(prepared, str(tmp / WEIGHTS))
        _fsync_file(tmp / WEIGHTS)
        _write_file(tmp / STATE, state_text.encode("utf-8"))
        fsync_dir(tmp)
        if directory.exists():
            os.replace(directory, old)  # the new checkpoint is complete: only now move the old one aside
        try:
            os.replace(tmp, directory)
        except BaseException:
            if old.exists() and not directory.exists():
                os.replace(old, directory)  # put the old checkpoint back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_checkpoint(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, state)``.

    UserError naming the path if the directory or a file is missing, truncated or corrupt.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint directory {directory} does not exist; check the path or resume from another checkpoint")
    weights, state_path = directory / WEIGHTS, directory / STATE
    for p in (weights, state_path):
        if not p.is_file():
            raise UserError(f"checkpoint file {p} is missing; the checkpoint is incomplete, delete {directory} or use another one")
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(
            f"checkpoint file {weights} is truncated or corrupt ({_one_line(e)}); delete {directory} or use another checkpoint"
        ) from e
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"checkpoint file {state_path} is not valid JSON ({_one_line(e)}); delete {directory} or use another checkpoint"
        ) from e
    if not isinstance(state, dict):
        raise UserError(f"checkpoint file {state_path} holds a {type(state).__name__}, expected a JSON object; delete {directory}")
    return tensors, state


def _step_dirs(run_dir: PathLike) -> list[tuple[int, Path]]:
    """Complete ``step_*`` checkpoint directories of a run, sorted by step (ascending)."""
    root = as_path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / WEIGHTS).is_file() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    found.sort()
    return found


def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    return [p for _, p in _step_dirs(run_dir)]


def latest_checkpoint(run_dir: PathLike) -> Path | None:
    """The complete ``checkpoints/step_%09d`` directory with the highest step, or None."""
    dirs = _step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def prune_checkpoints(run_dir: PathLike, keep: int = 2) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (and stale temp dirs of interrupted saves).

    Returns the deleted paths. ``keep`` must be >= 1 so the latest checkpoint always survives.
    """
    if keep < 1:
        raise ValueError(f"prune_checkpoints keep={keep}: must be >= 1")
    dirs = _step_dirs(run_dir)
    removed = [p for _, p in dirs[:-keep]]
    root = as_path(run_dir) / "checkpoints"
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.startswith(".step_") and _TMP_MARK in p.name and p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
