"""A tqdm progress bar that stays quiet in logs (non-TTY) and shows a compact postfix."""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm


def _compact(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        try:
            v = v.item()  # 0-d tensor / numpy scalar
        except (ValueError, RuntimeError):
            pass
    if isinstance(v, bool) or isinstance(v, int):
        return v
    if isinstance(v, float):
        return f"{v:.3g}"
    return v


class _Bar(tqdm):
    """tqdm whose ``set_postfix`` formats floats (and 0-d tensors) with 3 significant digits."""

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {})
        items.update(kwargs)
        super().set_postfix({k: _compact(v) for k, v in items.items()}, refresh=refresh)


def progress_bar(total: int | None, desc: str = "", unit: str = "it", disable: bool | None = None) -> tqdm:
    """tqdm bar on stderr with ``.update(n)``, ``.set_postfix(dict)``, ``.close()``; usable as context manager.

    ``disable=None``: shown only when stderr is a TTY (quiet in log files and CI); ``False`` forces it on,
    ``True`` turns it off.
    """
    if disable is None:
        disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return _Bar(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, unit_scale=unit != "it", smoothing=0.1)
