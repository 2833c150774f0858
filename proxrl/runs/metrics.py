"""Scalar metrics: metrics.jsonl (source of truth) + metrics.csv + TensorBoard scalars in tb/.

Each JSONL line is one object ``{"step": int, key: float | null, ...}``; NaN/inf are written as null.
metrics.csv holds the same rows under the union of all keys seen (first-appearance order); when a
new key appears the CSV is rewritten from the JSONL with the grown header.
"""
from __future__ import annotations

import csv
import io
import json
import math
import numbers
import re
import warnings
from pathlib import Path
from typing import Any

from proxrl.errors import UserError
from proxrl.runs.rundir import PathLike, RunDir, as_path, atomic_write

_TB_WARNED = False


def _metrics_file(run_dir: PathLike) -> Path:
    p = as_path(run_dir)
    return p if p.suffix == ".jsonl" else p / RunDir.METRICS


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Rows of a metrics.jsonl and whether its last line is unterminated (a crash mid-write; dropped if partial)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], False
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; fix or delete the file") from e
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    dropped = bool(text) and not text.endswith("\n")  # needs rewriting before anything is appended
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("expected an object with a 'step' key")
        except ValueError as e:
            if i == len(lines) - 1:  # no trailing newline: a partial line from an interrupted write
                dropped = True
                continue
            raise UserError(f"{path} line {i + 1}: invalid metrics record ({e}); fix or delete the line") from e
        rows.append(row)
    return rows, dropped


def read_metrics(run_dir: PathLike) -> list[dict[str, Any]]:
    """All rows of ``run_dir/metrics.jsonl`` (or of a ``.jsonl`` path) in order; null values become NaN.

    Returns [] if the file does not exist. A truncated last line is ignored.
    """
    rows, _ = _parse_lines(_metrics_file(run_dir))
    return [{k: (math.nan if v is None else v) for k, v in row.items()} for row in rows]


def _union_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {"step": None}
    for row in rows:
        for k in row:
            keys.setdefault(k, None)
    return list(keys)


def _csv_text(header: list[str], rows: list[dict[str, Any]], write_header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if write_header:
        w.writerow(header)
    for row in rows:
        w.writerow(["" if row.get(k) is None else row[k] for k in header])
    return buf.getvalue()


def _scalar(key: str, value: Any) -> int | float | None:
    """Plain int/float (None for NaN/inf) from python/numpy/0-d torch numbers."""
    if hasattr(value, "item") and not isinstance(value, numbers.Number):
        try:
            value = value.item()
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"metric {key!r} must be a scalar, got {type(value).__name__} ({e})") from e
    elif hasattr(value, "item"):
        value = value.item()  # numpy scalar
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ValueError(f"metric {key!r} must be a number, got {value!r}")


class MetricsLogger:
    """Append scalar metrics per step to metrics.jsonl, metrics.csv and TensorBoard (``run_dir/tb``).

    ``resume_from_step=N`` drops rows with step > N (logged by a crashed run after its last checkpoint)
    and purges TensorBoard events after N, so the resumed run's metrics equal an uninterrupted run's.
    Without it an existing metrics.jsonl is appended to.
    """

    def __init__(self, run_dir: PathLike, tensorboard: bool = True, resume_from_step: int | None = None) -> None:
        self.run_dir = as_path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / RunDir.METRICS
        self.csv_path = self.run_dir / RunDir.METRICS_CSV
        self.tb_dir = self.run_dir / "tb"
        self._tensorboard = tensorboard
        self._writer: Any = None
        self._purge_step = None if resume_from_step is None else int(resume_from_step) + 1
        rows, dropped = _parse_lines(self.jsonl_path)
        kept = rows if resume_from_step is None else [r for r in rows if r["step"] <= resume_from_step]
        if dropped or len(kept) != len(rows):
            atomic_write(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in kept))
        self._header = _union_keys(kept)
        if kept or self.csv_path.exists():
            atomic_write(self.csv_path, _csv_text(self._header, kept))
        self._closed = False

    def _tb(self) -> Any:
        global _TB_WARNED
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # tensorboard missing or broken: keep JSONL/CSV logging going
                self._tensorboard = False
                if not _TB_WARNED:
                    _TB_WARNED = True
                    warnings.warn(f"TensorBoard logging disabled ({e}); metrics still go to metrics.jsonl/csv",
                                  stacklevel=3)
                return None
            self._writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=self._purge_step)
        return self._writer

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (name -> python/numpy/0-d tensor number) at integer ``step``."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"step must be an int, got {step!r}")
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step'; pass it as the step argument")
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            row[str(k)] = _scalar(k, v)
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        new_keys = [k for k in row if k not in self._header]
        if new_keys or not self.csv_path.exists():
            self._header += new_keys
            rows, _ = _parse_lines(self.jsonl_path)
            atomic_write(self.csv_path, _csv_text(self._header, rows))
        else:
            with open(self.csv_path, "a", encoding="utf-8", newline="") as f:
                f.write(_csv_text(self._header, [row], write_header=False))
        writer = self._tb()
        if writer is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    writer.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer; JSONL/CSV are written through on every log."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SECTION_RE = re.compile(r"^<!-- step (-?\d+) -->$")


class StepLog:
    """An append-only text log in sections tagged by step (e.g. ``samples.md``), safe to resume.

    Each :meth:`append` writes a marker line ``<!-- step N -->`` (invisible in rendered Markdown) and then the text.
    ``resume_from_step=N`` drops the sections with step > N (written by a crashed run after its last checkpoint), so
    a resumed run's file equals an uninterrupted run's instead of holding those sections twice. Text before the first
    marker (a file written without markers) is kept.
    """

    def __init__(self, path: str | Path, resume_from_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_from_step is not None and self.path.is_file():
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {self.path}: {e}; fix or delete the file") from e
            kept: list[str] = []
            keep = True
            for line in text.splitlines(keepends=True):
                m = _SECTION_RE.match(line.rstrip("\n"))
                if m is not None:
                    keep = int(m.group(1)) <= resume_from_step
                if keep:
                    kept.append(line)
            new = "".join(kept)
            if new != text:
                atomic_write(self.path, new)

    def append(self, step: int, text: str) -> None:
        """Append ``text`` (a trailing newline is added if missing) as the section of ``step``."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"step must be an int, got {step!r}")
        if not text.endswith("\n"):
            text += "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"<!-- step {int(step)} -->\n{text}")
