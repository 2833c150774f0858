"""Stopping a run at the first NaN or infinity, with one line saying what and where.

A trainer calls :func:`check_finite` on what it must not let through (a loss, a gradient, a batch of
observations or rewards, the weights before a checkpoint). The first non-finite value raises
:class:`NonFiniteError`, a :class:`~proxrl.errors.UserError`: the CLI prints its one line and exits with its
``exit_code`` (2). Raise it *before* writing the next checkpoint, so the last good checkpoint is the newest one
and ``--resume`` (with, say, a lower learning rate) starts from it.

Message shape::

    non-finite <name> (<value> at index <i>) at <where>[; <hint>]

e.g. ``non-finite gradient (nan at index 17) at update 3 (env step 768), epoch 2, minibatch 1``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from proxrl.errors import UserError

__all__ = ["NonFiniteError", "check_finite", "first_non_finite"]


class NonFiniteError(UserError):
    """A NaN or +-infinity in training: names the quantity and where (update, step, minibatch) it appeared."""


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device, in any float dtype
        value = value.detach()
        if value.dtype.is_floating_point and value.element_size() < 4:
            value = value.float()  # numpy has no bfloat16
        value = value.cpu().numpy()
    return np.asarray(value)


def first_non_finite(value: Any) -> tuple[tuple[int, ...], float] | None:
    """``(index, value)`` of the first NaN/inf in ``value`` (a float, numpy array or torch tensor) in C order, or
    None when every entry is finite. Integer and boolean arrays are always finite.

    ``index`` is ``()`` for a scalar.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isfinite(value) else ((), float(value))
    arr = _as_numpy(value)
    if not np.issubdtype(arr.dtype, np.floating):
        return None
    bad = ~np.isfinite(arr)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), arr.shape)) if arr.ndim else ()
    return index, float(arr[index])


def check_finite(name: str, value: Any, where: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` if ``value`` (float, numpy array or torch tensor) holds a NaN or infinity.

    ``name``: what it is (``"policy_loss"``, ``"gradient"``, ``"observation"``); ``where``: the position in
    training (``"update 3 (env step 768)"``); ``hint``: optional advice appended after ``"; "``.
    The message names the first bad entry's value and index (for arrays), and is one line.
    """
    found = first_non_finite(value)
    if found is None:
        return
    index, bad = found
    at = f" at index {index[0] if len(index) == 1 else index}" if index else ""
    raise NonFiniteError(f"non-finite {name} ({bad}{at}) at {where}" + (f"; {hint}" if hint else ""))
