"""Checkpoints: safetensors weights + JSON state, written atomically, verified by sha256 on load. Never pickle.

Layout: ``<run_dir>/checkpoints/step_%09d/{model.safetensors,state.json}``. A checkpoint directory is
built under a hidden sibling temp name (``.step_%09d.tmp-PID-HEX``) and renamed into place only once both files
are complete and fsync'ed, so a crash mid-save leaves the previous checkpoints untouched and no partial
``step_*`` directory for :func:`latest_checkpoint` to pick; :func:`clean_interrupted_saves` (called by
``RunDir.create``) removes what such a crash left.

Integrity: ``state.json`` carries ``"_checksums": {"model.safetensors": "sha256:HEX", "state.json": "sha256:HEX"}``
(the weights file's bytes; the state's canonical JSON without this key: ``json.dumps(state, sort_keys=True,
separators=(",", ":"))``). :func:`load_checkpoint` verifies both and raises :class:`CheckpointError` (a one-line
UserError naming the checkpoint directory and the file) on a mismatch; checkpoints written before checksums
existed load unverified. The key is stripped from the state that is returned.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from proxrl.errors import UserError
from proxrl.runs.rundir import PathLike, as_path, fsync_dir, temp_owner_alive

WEIGHTS = "model.safetensors"
STATE = "state.json"
CHECKSUMS = "_checksums"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"
_TEMP_DIR_RE = re.compile(r"^\.(step_\d+)\.(tmp|old)-\d+-[0-9a-f]+$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, truncated, corrupt (checksum mismatch) or lacking an entry.

    ``directory``: the checkpoint directory; ``file``: the file at fault (``model.safetensors``/``state.json``,
    or None); ``reason``: a short phrase for composing messages (e.g. "model.safetensors fails its sha256 check").
    """

    def __init__(self, message: str, directory: Path, file: str | None, reason: str) -> None:
        super().__init__(message)
        self.directory = directory
        self.file = file
        self.reason = reason


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


def _sha256_file(path: Path) -> str:
    """``"sha256:HEX"`` of a file's bytes (and fsync it: the bytes hashed are the bytes on disk)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _sha256_state(state: dict[str, Any]) -> str:
    """``"sha256:HEX"`` of a (JSON-loaded) state's canonical JSON text, without the checksums entry."""
    body = {k: v for k, v in state.items() if k != CHECKSUMS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def save_checkpoint(directory: str | os.PathLike[str], tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/state.json`` atomically; return ``directory``.

    ``tensors``: name -> tensor of any shape/dtype (moved to CPU; shared or non-contiguous ones are cloned).
    ``state``: JSON-serialisable nested dict (dicts/lists of float/int/str/bool/None; big ints are fine); the
    key ``"_checksums"`` is reserved (sha256 of both files, checked by :func:`load_checkpoint`).
    An existing checkpoint of the same name is replaced only after the new one is complete.
    """
    directory = Path(directory)
    if CHECKSUMS in state:
        raise ValueError(f"checkpoint state key {CHECKSUMS!r} is reserved for the checksums")
    try:
        plain = json.loads(json.dumps(state))  # JSON's view of the state (tuples -> lists, int keys -> str)
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
        with open(tmp / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        plain[CHECKSUMS] = {WEIGHTS: _sha256_file(tmp / WEIGHTS), STATE: _sha256_state(plain)}
        _write_file(tmp / STATE, json.dumps(plain, indent=1).encode("utf-8"))
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


def _fail(directory: Path, file: str | None, reason: str, message: str) -> CheckpointError:
    return CheckpointError(message, directory, file, reason)


def _read_state(directory: Path) -> dict[str, Any]:
    """state.json of a checkpoint, its checksum verified (if it has one). CheckpointError naming the file."""
    if not directory.is_dir():
        raise _fail(directory, None, "missing",
                    f"checkpoint directory {directory} does not exist; check the path or resume from another "
                    f"checkpoint")
    weights, state_path = directory / WEIGHTS, directory / STATE
    for p in (weights, state_path):
        if not p.is_file():
            raise _fail(directory, p.name, f"{p.name} is missing",
                        f"checkpoint file {p} is missing; the checkpoint is incomplete, delete {directory} or use "
                        f"another one")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(directory, STATE, "state.json is not valid JSON",
                    f"checkpoint file {state_path} is not valid JSON ({_one_line(e)}); delete {directory} or use "
                    f"another checkpoint") from e
    if not isinstance(state, dict):
        raise _fail(directory, STATE, "state.json is not a JSON object",
                    f"checkpoint file {state_path} holds a {type(state).__name__}, expected a JSON object; delete "
                    f"{directory} or use another checkpoint")
    sums = state.get(CHECKSUMS)
    if sums is not None:
        if not isinstance(sums, dict) or not isinstance(sums.get(WEIGHTS), str) or not isinstance(sums.get(STATE), str):
            raise _fail(directory, STATE, "state.json has a malformed checksums entry",
                        f"checkpoint file {state_path} has a malformed {CHECKSUMS!r} entry; it was edited or is "
                        f"corrupt: delete {directory} or use another checkpoint")
        if _sha256_state(state) != sums[STATE]:
            raise _corrupt(directory, STATE)
    return state


def _corrupt(directory: Path, name: str) -> CheckpointError:
    return _fail(directory, name, f"{name} fails its sha256 check",
                 f"checkpoint file {directory / name} is truncated or corrupt (its sha256 differs from the one saved "
                 f"with it); delete {directory} or use another checkpoint")


def _verify_weights(directory: Path, state: dict[str, Any]) -> None:
    sums = state.get(CHECKSUMS)
    if sums is not None and _sha256_file(directory / WEIGHTS) != sums[WEIGHTS]:
        raise _corrupt(directory, WEIGHTS)


def _require(directory: Path, state: dict[str, Any], tensor_names: Iterable[str],
             require_state: Iterable[str], require_tensors: Iterable[str]) -> None:
    names = set(tensor_names)
    missing_t = [t for t in require_tensors if t not in names]
    if missing_t:
        more = f" and {len(missing_t) - 3} more" if len(missing_t) > 3 else ""
        shown = ", ".join(repr(t) for t in missing_t[:3]) + more
        raise _fail(directory, WEIGHTS, f"{WEIGHTS} lacks tensor {shown}",
                    f"checkpoint {directory} lacks tensor {shown} in {WEIGHTS}; it was written by another proxrl "
                    f"version or for another model: delete it or use another checkpoint")
    for key in require_state:
        node: Any = state
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise _fail(directory, STATE, f"{STATE} lacks {key!r}",
                            f"checkpoint {directory} lacks {key!r} in {STATE}; it was edited or written by another "
                            f"proxrl version: delete it or use another checkpoint")
            node = node[part]


def load_checkpoint(
    directory: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    require_state: Iterable[str] = (),
    require_tensors: Iterable[str] = (),
    verify: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, state)``.

    Verifies the sha256 checksums of both files (``verify=False`` skips that; older checkpoints without
    checksums load unverified). ``require_state``: keys the state must hold, dotted for nesting
    (``"counters.global_step"``); ``require_tensors``: tensor names the weights file must hold.
    Raises :class:`CheckpointError` (a one-line UserError naming the directory and the file) if the directory or
    a file is missing, truncated or corrupt, or lacks a required entry. The ``"_checksums"`` key is not returned.
    """
    directory = Path(directory)
    state = _read_state(directory)
    if verify:
        _verify_weights(directory, state)
    weights = directory / WEIGHTS
    try:
        tensors = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _fail(directory, WEIGHTS, f"{WEIGHTS} is unreadable",
                    f"checkpoint file {weights} is truncated or corrupt ({_one_line(e)}); delete {directory} or use "
                    f"another checkpoint") from e
    _require(directory, state, tensors, require_state, require_tensors)
    state.pop(CHECKSUMS, None)
    return tensors, state


def verify_checkpoint(
    directory: str | os.PathLike[str], *, require_state: Iterable[str] = (), require_tensors: Iterable[str] = ()
) -> None:
    """Check a checkpoint without loading its tensors: both files present, state.json valid, checksums match
    (for a checkpoint without checksums: the weights file's header parses), required entries present.
    Raises :class:`CheckpointError` like :func:`load_checkpoint`."""
    directory = Path(directory)
    state = _read_state(directory)
    _verify_weights(directory, state)
    try:
        with safe_open(str(directory / WEIGHTS), framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _fail(directory, WEIGHTS, f"{WEIGHTS} is unreadable",
                    f"checkpoint file {directory / WEIGHTS} is truncated or corrupt ({_one_line(e)}); delete "
                    f"{directory} or use another checkpoint") from e
    _require(directory, state, names, require_state, require_tensors)


def check_tensor_shapes(
    directory: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, Sequence[int]],
    fix: str = "the config no longer matches the checkpoint: restore the values it was saved with",
) -> None:
    """One-line UserError if a tensor of ``expected`` (name -> shape, e.g. ``{k: v.shape for k, v in
    model.state_dict().items()}``) is missing from ``tensors`` or has another shape; ``fix`` ends the message."""
    for name, shape in expected.items():
        if name not in tensors:
            raise UserError(f"checkpoint {directory} has no tensor {name!r} that the model needs; {fix}")
        got, want = tuple(tensors[name].shape), tuple(int(s) for s in shape)
        if got != want:
            raise UserError(f"checkpoint {directory}: tensor {name!r} has shape {list(got)} but the model expects "
                            f"{list(want)}; {fix}")


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
    """Complete checkpoint directories of a run (both files present, not verified), oldest first."""
    return [p for _, p in _step_dirs(run_dir)]


def latest_checkpoint(run_dir: PathLike, verify: bool = False) -> Path | None:
    """The complete ``checkpoints/step_%09d`` directory with the highest step, or None.

    ``verify=True``: the newest one that passes :func:`verify_checkpoint` (checksums), or None.
    """
    dirs = [p for _, p in _step_dirs(run_dir)]
    if not verify:
        return dirs[-1] if dirs else None
    for p in reversed(dirs):
        try:
            verify_checkpoint(p)
        except CheckpointError:
            continue
        return p
    return None


def load_latest_checkpoint(
    run_dir: PathLike,
    device: str | torch.device = "cpu",
    *,
    require_state: Iterable[str] = (),
    require_tensors: Iterable[str] = (),
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """Load the newest checkpoint of a run for ``--resume``: ``(directory, tensors, state)``, or None if it has none.

    If the newest one is corrupt or incomplete, raises a one-line UserError that names it and the file, and
    offers the newest older checkpoint that verifies ("...; the previous good one is step_W: delete
    <newest> to resume from it") or says none does. Never falls back silently. First tidies what a save killed
    midway left (:func:`clean_interrupted_saves`).
    """
    require_state, require_tensors = tuple(require_state), tuple(require_tensors)
    try:
        clean_interrupted_saves(run_dir)  # puts back a checkpoint a kill left set aside mid-replace
    except OSError:
        pass
    dirs = [p for _, p in _step_dirs(run_dir)]
    if not dirs:
        return None
    newest = dirs[-1]
    try:
        tensors, state = load_checkpoint(newest, device, require_state=require_state, require_tensors=require_tensors)
    except CheckpointError as e:
        for older in reversed(dirs[:-1]):
            try:
                verify_checkpoint(older, require_state=require_state, require_tensors=require_tensors)
            except CheckpointError:
                continue
            raise UserError(f"checkpoint {newest} is corrupt or incomplete ({e.reason}); the previous good one is "
                            f"{older.name}: delete {newest} to resume from it") from e
        others = "no earlier checkpoint is usable either" if len(dirs) > 1 else "it is the run's only checkpoint"
        raise UserError(f"checkpoint {newest} is corrupt or incomplete ({e.reason}) and {others}; the run cannot be "
                        f"resumed: start it again (delete {as_path(run_dir)} or choose another --run-dir)") from e
    return newest, tensors, state


def clean_interrupted_saves(run_dir: PathLike) -> list[Path]:
    """Tidy ``run_dir/checkpoints`` after a process died mid-save; returns the removed paths.

    Removes ``.step_*.tmp-PID-*`` directories (never complete) and ``.step_*.old-PID-*`` ones, first moving an
    ``.old`` one back to ``step_*`` if the crash came between setting it aside and renaming its replacement into
    place. Skips the temp directories of processes that are still alive (a save in progress).
    """
    root = as_path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    removed: list[Path] = []
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        m = _TEMP_DIR_RE.match(p.name)
        if m is None or not p.is_dir() or temp_owner_alive(p.name):
            continue
        target = root / m.group(1)
        if m.group(2) == "old" and not target.exists() and (p / WEIGHTS).is_file() and (p / STATE).is_file():
            os.replace(p, target)  # the checkpoint that was being replaced: put it back
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        fsync_dir(root)
    return removed


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
