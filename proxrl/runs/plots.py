"""PNG plots of logged metrics (matplotlib Agg canvas; pyplot and the global backend are left alone)."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from proxrl.errors import UserError
from proxrl.runs.metrics import read_metrics
from proxrl.runs.rundir import PathLike, as_path, atomic_write


def _figure(nrows: int, ncols: int, width: float, height: float):  # -> (Figure, FigureCanvasAgg)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100)
    return fig, FigureCanvasAgg(fig)


def _save_png(fig, canvas, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    canvas.print_png(buf)
    return atomic_write(path, buf.getvalue())


def plot_metrics(run_dir: PathLike, x: str, keys: Sequence[str], filename: str, title: str) -> Path:
    """Grid of line plots, one subplot per key of ``keys`` present in metrics.jsonl, against column ``x``.

    Keys absent from every row are skipped (a note lists them). Written to ``run_dir/plots/<filename>``
    (".png" appended if missing); returns that path. UserError if the run has no metrics or no ``x``.
    """
    root = as_path(run_dir)
    rows = read_metrics(root)
    if not rows:
        raise UserError(f"no metrics in {root / 'metrics.jsonl'}; train the run first or check the run directory")
    if not any(x in r for r in rows):
        raise UserError(f"x-axis column {x!r} not found in {root / 'metrics.jsonl'}; use one of: {', '.join(rows[0])}")
    present = [k for k in keys if any(k in r for r in rows)]
    missing = [k for k in keys if k not in present]
    n = max(len(present), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, canvas = _figure(nrows, ncols, 4.6, 3.2)
    fig.suptitle(title)
    if not present:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no data for: " + ", ".join(keys), ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for i, key in enumerate(present):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = [(r[x], r[key]) for r in rows if x in r and key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.2, marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    if missing and present:
        fig.text(0.01, 0.01, "not logged: " + ", ".join(missing), fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    name = filename if filename.lower().endswith(".png") else f"{filename}.png"
    return _save_png(fig, canvas, root / "plots" / name)


def plot_xy(
    path: str | os.PathLike[str],
    xs: Sequence[float],
    ys_dict: Mapping[str, Sequence[float]],
    xlabel: str,
    title: str,
    ylabel: str = "",
) -> Path:
    """One axes with a line per ``ys_dict`` entry (label -> ys, each len(xs)); PNG written to ``path``."""
    xs = list(xs)
    for label, ys in ys_dict.items():
        if len(ys) != len(xs):
            raise ValueError(f"plot_xy series {label!r} has {len(ys)} points but xs has {len(xs)}")
    fig, canvas = _figure(1, 1, 6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for label, ys in ys_dict.items():
        ax.plot(xs, list(ys), label=label, linewidth=1.4)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ys_dict:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_png(fig, canvas, Path(path))
