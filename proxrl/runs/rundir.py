"""Run directory layout, atomic file writes and the YAML config of a run.

A run directory holds::

    config.yaml        the resolved config (written once, atomically)
    metrics.jsonl      one JSON object per logged step (see metrics.py)
    metrics.csv        the same rows as a CSV table
    tb/                TensorBoard event files
    checkpoints/       step_000012345/{model.safetensors,state.json}
    plots/             PNG figures
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Union

import yaml

from proxrl.errors import UserError

PathLike = Union[str, "os.PathLike[str]", "RunDir"]


def as_path(run_dir: PathLike) -> Path:
    """Return the filesystem path of a ``RunDir``, ``str`` or ``os.PathLike``."""
    if isinstance(run_dir, RunDir):
        return run_dir.path
    return Path(run_dir)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _plain(obj: Any) -> Any:
    """Convert tuples, paths and numpy/torch scalars to plain YAML-safe Python values."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    item = getattr(obj, "item", None)  # numpy scalars, 0-d tensors
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"cannot write value {obj!r} of type {type(obj).__name__} to YAML")


class RunDir:
    """The files of one training run; creating it never deletes anything."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    METRICS_CSV = "metrics.csv"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def metrics_csv_path(self) -> Path:
        return self.path / self.METRICS_CSV

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    def checkpoint_dir(self, step: int) -> Path:
        """``checkpoints/step_%09d`` for an environment/update step."""
        return self.checkpoints / f"step_{int(step):09d}"

    def has_run(self) -> bool:
        """True if the directory already holds a run (its config.yaml exists)."""
        return self.config_path.is_file()

    def create(self, exist_ok: bool = False) -> "RunDir":
        """Create the directory tree. UserError if it already holds a run, unless ``exist_ok`` (resuming)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run directory {self.path} exists and is not a directory; choose another --run-dir")
        if self.has_run() and not exist_ok:
            raise UserError(
                f"run directory {self.path} already exists; pass --resume {self.path} to continue it "
                "or choose another --run-dir"
            )
        try:
            for d in (self.path, self.checkpoints, self.plots):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run directory {self.path}: {e.strerror}; choose another --run-dir") from e
        return self

    def write_config(self, config: dict[str, Any]) -> Path:
        """Write ``config`` (nested dict of plain values) to config.yaml atomically; returns the path."""
        text = yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
        return atomic_write(self.config_path, text)

    def read_config(self) -> dict[str, Any]:
        """Read config.yaml. UserError naming the file if it is missing, unreadable or not a mapping."""
        path = self.config_path
        if not path.is_file():
            raise UserError(f"{path} not found; is {self.path} a proxrl run directory? check the --run-dir/--resume path")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}; fix or delete the file") from e
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"{path}{where}: invalid YAML ({problem}); fix the file") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of config keys, got {type(data).__name__}; fix the file")
        return data
