"""One-line texts for error messages (a :class:`~proxrl.errors.UserError` message is always one line)."""
from __future__ import annotations

from typing import Any

__all__ = ["one_line", "describe", "short_repr"]


def one_line(text: Any, limit: int = 200) -> str:
    """``str(text)`` with whitespace runs squeezed to one space, cut to ``limit`` characters (``...`` marks a cut)."""
    msg = " ".join(str(text).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def describe(exc: BaseException, limit: int = 300) -> str:
    """``TypeName: message`` of an exception on one line (just ``TypeName`` when it has no message)."""
    msg = one_line(exc, limit)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def short_repr(text: str, limit: int = 40) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters (for quoting a prompt or completion in a message)."""
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")
