"""Reading prompt/preference/SFT data files with one-line errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from proxrl.errors import UserError

__all__ = ["read_jsonl", "read_text_lines", "write_jsonl"]


def _read_text(path: str | Path, what: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} file {str(path)!r} does not exist; check the path")
    if not p.is_file():
        raise UserError(f"{what} path {str(path)!r} is not a file")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{p.name} line {line}: not valid UTF-8 (byte {e.object[e.start]:#x}); save the file as "
                        f"UTF-8") from e
    except OSError as e:
        raise UserError(f"cannot read {what} file {str(path)!r}: {e.strerror or e}") from e


def read_jsonl(path: str | Path, required_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a JSON-lines file: one JSON object per non-blank line.

    Args:
        path: the file.  required_keys: keys every object must have.

    Returns:
        the objects, in file order.

    Raises:
        UserError: ``"data.jsonl line 7: invalid JSON (Expecting ',' delimiter at column 12)"``,
        ``"data.jsonl line 9: missing key 'completion' ..."``, a line that is not an object, a missing file,
        or a file with no records.
    """
    name = Path(path).name
    text = _read_text(path, "data")
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be "
                            f"one JSON object") from e
        if not isinstance(obj, dict):
            raise UserError(f"{name} line {lineno}: expected a JSON object like {{\"prompt\": ...}}, got "
                            f"{type(obj).__name__}")
        for key in required_keys:
            if key not in obj:
                have = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
                raise UserError(f"{name} line {lineno}: missing key {key!r} (required: "
                                f"{', '.join(required_keys)}; found: {have})")
        rows.append(obj)
    if not rows:
        raise UserError(f"{name}: no records; put one JSON object per line")
    return rows


def read_text_lines(path: str | Path, strip: bool = True, skip_blank: bool = True) -> list[str]:
    """The lines of a UTF-8 text file (stripped, blank lines skipped by default); UserError if none remain."""
    name = Path(path).name
    lines = _read_text(path, "text").splitlines()
    if strip:
        lines = [line.strip() for line in lines]
    if skip_blank:
        lines = [line for line in lines if line.strip()]
    if not lines:
        raise UserError(f"{name}: no non-blank lines; put one example per line")
    return lines


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p
