"""Training data for the LM stages, read through Hugging Face ``datasets``, with one-line errors.

One entry point, :func:`load_rows`, takes what a user passes as ``--data`` (or ``--prompts``):

* a local file: ``.jsonl`` / ``.json`` (one object per line, or one JSON array of objects), ``.csv``,
  ``.parquet``, or ``.txt`` / ``.txt.gz`` (one example per non-blank line, in a column ``text``); each also
  compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``);
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``DIR`` or ``DIR:split``), or a
  directory of data files;
* a hub name ``org/name`` or ``org/name:split`` (default split ``train``), loaded with ``datasets.load_dataset``;
  offline, this is one line saying so and asking for a local file.

Local files are parsed into a temporary cache that is removed once the rows are in memory (a user's data is not
copied into ``~/.cache``); hub data sets use the usual ``datasets`` cache (so a data set downloaded once loads
offline later). Errors name the file, the row (1-based, in file order, blank lines not counted) and the columns
that are there.
"""
from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import datasets
import fsspec

from proxrl.errors import UserError
from proxrl.lm.chat import check_messages

__all__ = ["Table", "load_table", "load_rows", "check_value", "write_jsonl"]

Kind = Literal["text", "messages", "text_or_messages"]

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_HUB_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<split>[\w.%\[\]:+-]+))?$")
_FORMATS = "JSONL, JSON, CSV, Parquet, .txt, a save_to_disk directory or a hub name org/name[:split]"


@dataclass(frozen=True)
class Table:
    """Rows read from one source. ``source`` is how messages name it (file name, ``DIR:split``, ``org/name:split``)."""

    source: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]

    def require(self, column: str, key: str | None = None) -> None:
        """UserError naming the present columns unless ``column`` is one (``key``: our name for it, for the hint)."""
        if column not in self.columns:
            have = ", ".join(repr(c) for c in self.columns) or "none"
            flag = f"; pass --{key.replace('_', '-')}-column with the column to use" if key else ""
            raise UserError(f"{self.source} has no column {column!r} (columns: {have}){flag}")


def _data_format(path: Path) -> str | None:
    """The ``datasets`` builder for a file name (``data.jsonl.gz`` -> ``json``), or None if unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars and no log lines from ``datasets`` (its errors reach the user as one UserError)."""
    bars = datasets.utils.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars:
            datasets.enable_progress_bars()


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    text = str(e).strip() or (str(cause).strip() if cause else "") or type(e).__name__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text}: {str(cause).strip()}"
    return " ".join(text.split())[:240]


def _diagnose_text(path: Path, fmt: str, what: str) -> str | None:
    """Why ``datasets`` could not parse a file, if it is plain text: the first bad line (``"NAME line N: ..."``),
    or no records at all; None if that is not it."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if path.suffix.lower() in _COMPRESSION:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return f"{path.name} line {line}: not valid UTF-8 (byte {raw[e.start]:#x}); save the file as UTF-8"
    if not text.strip():
        return f"{path.name}: no records; give a non-empty {what} file"
    if fmt != "json":
        return None
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"{path.name} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
        return None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return (f"{path.name} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                    f"JSON object")
        if not isinstance(obj, dict):
            return (f"{path.name} line {lineno}: expected a JSON object like {{\"prompt\": ...}}, got "
                    f"{type(obj).__name__}")
    return None


def _csv_text_features(path: Path) -> datasets.Features | None:
    """Every column of a CSV file as text (CSV has no types: ``012`` is a string, not the number 12), from its
    header line; None if the header cannot be read (``datasets`` then reports the problem)."""
    try:
        with fsspec.open(str(path), mode="rt", compression="infer", encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not header or len(set(header)) != len(header):
        return None
    return datasets.Features({name: datasets.Value("string") for name in header})


def _load_file(path: Path, what: str) -> Table:
    fmt = _data_format(path)
    if fmt is None:
        raise UserError(f"{what} file {path.name!r} has an unknown format; give {_FORMATS}")
    cache = tempfile.mkdtemp(prefix="proxrl-data-")
    try:
        with _quiet():
            kwargs = {"features": _csv_text_features(path)} if fmt == "csv" else {}
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache, **kwargs)
        rows = ds.to_list()
        columns = tuple(ds.column_names)
    except StopIteration:  # `datasets` on a file with no rows
        rows, columns = [], ()
    except Exception as e:  # any parse failure of the user's file becomes one line naming it
        detail = _diagnose_text(path, fmt, what)
        if detail:
            raise UserError(detail) from e
        raise UserError(f"cannot read {what} file {path.name} as {fmt.upper()}: {_first_line(e)}") from e
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if fmt == "text":  # one example per non-blank line, surrounding whitespace stripped
        rows = [{"text": r["text"].strip()} for r in rows if r["text"] and r["text"].strip()]
    if not rows:
        raise UserError(f"{path.name}: no records; give a non-empty {what} file")
    return Table(path.name, columns, rows)


def _pick_split(obj: Any, split: str | None, name: str) -> Any:
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None and len(obj) == 1:
            split = next(iter(obj))
        if (split or "train") not in obj:
            raise UserError(f"{name} has no split {split or 'train'!r} (splits: {', '.join(obj)}); give {name}:SPLIT")
        return obj[split or "train"]
    if split:
        raise UserError(f"{name} is one data set without splits; give {name} without ':{split}'")
    return obj


def _load_directory(path: Path, split: str | None, what: str) -> Table:
    source = f"{path.name}:{split}" if split else path.name
    on_disk = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    cache = None if on_disk else tempfile.mkdtemp(prefix="proxrl-data-")
    try:
        with _quiet():
            if on_disk:
                obj = datasets.load_from_disk(str(path))
            else:  # a folder of data files
                obj = datasets.load_dataset(str(path), cache_dir=cache)
        ds = _pick_split(obj, split, path.name)
        rows, columns = ds.to_list(), tuple(ds.column_names)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {what} directory {str(path)!r}: {_first_line(e)}; give {_FORMATS}") from e
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    if not rows:
        raise UserError(f"{source}: no records; give a non-empty {what} data set")
    return Table(source, columns, rows)


def _load_hub(name: str, split: str | None, spec: str, what: str) -> Table:
    source = f"{name}:{split or 'train'}"
    try:
        with _quiet():
            ds = datasets.load_dataset(name, split=split or "train")
        rows, columns = ds.to_list(), tuple(ds.column_names)
    except ConnectionError as e:
        raise UserError(f"{what} {spec!r} is not a local file, and the hub data set {name!r} cannot be loaded: the hub "
                        f"is unreachable or offline (HF_HUB_OFFLINE) and it is not in the local cache; pass a local "
                        f"file ({_FORMATS.rsplit(',', 1)[0]})") from e
    except Exception as e:
        raise UserError(f"{what} {spec!r} is not a local file, and loading it as a hub data set failed: "
                        f"{_first_line(e)}; pass a local file") from e
    if not rows:
        raise UserError(f"{source}: no records; give a non-empty {what} data set")
    return Table(source, columns, rows)


def load_table(spec: str | Path, what: str = "data") -> Table:
    """All rows and columns of a data source (see the module doc for what ``spec`` may be).

    Args:
        spec: a file, a directory (``DIR`` or ``DIR:split``) or a hub name ``org/name[:split]``.
        what: how messages call the data ("data", "prompts", "preference data").

    Raises:
        UserError: a missing file, an unknown format, a file that does not parse (naming the line for JSON and
        text), an empty source, or a hub name that cannot be loaded (offline says so in one line).
    """
    text = str(spec)
    if not text:
        raise UserError(f"no {what}: give a file ({_FORMATS})")
    path = Path(text).expanduser()
    if path.is_file():
        return _load_file(path, what)
    if path.is_dir():
        return _load_directory(path, None, what)
    head, sep, split = text.rpartition(":")
    if sep and head and Path(head).expanduser().is_dir():
        return _load_directory(Path(head).expanduser(), split, what)
    hub = _HUB_NAME.match(text)
    if hub and _data_format(Path(hub["name"])) is None:
        return _load_hub(hub["name"], hub["split"], text, what)
    raise UserError(f"{what} file {text!r} does not exist; check the path (or give {_FORMATS})")


def check_value(value: Any, kind: Kind, where: str, column: str) -> None:
    """UserError unless a row's ``value`` of ``column`` is of ``kind`` (``where`` names the source and row)."""
    if value is None:
        raise UserError(f"{where}: {column!r} is empty (null); every row needs a value there")
    if kind == "messages" or (kind == "text_or_messages" and isinstance(value, list)):
        check_messages(value, f"{where}: {column!r}")
    elif not isinstance(value, str):
        wanted = "a string or a list of messages" if kind == "text_or_messages" else "a string"
        raise UserError(f"{where}: {column!r} must be {wanted}, got {type(value).__name__} ({str(value)[:40]!r})")


def load_rows(spec: str | Path, *, columns: Mapping[str, str], optional: Iterable[str] = (),
              kinds: Mapping[str, Kind] | None = None, what: str = "data") -> list[dict[str, Any]]:
    """Rows of a data source reduced to the columns a stage needs, under the stage's own names.

    Args:
        spec: see :func:`load_table`.
        columns: ``{our key: column name in the data}``, e.g. ``{"prompt": "question"}`` (from ``--prompt-column``).
        optional: our keys whose column may be absent or null (then the key's value is None).
        kinds: ``{our key: "text" | "messages" | "text_or_messages"}`` (default ``"text"``: a string); a list of
            messages is ``[{"role": str, "content": str}, ...]``.
        what: how messages call the data ("data", "prompts", "preference data").

    Returns:
        one dict per row, ``{our key: value}`` for every key of ``columns``, in the source's order.

    Raises:
        UserError: a column that is not there (naming the columns present and the ``--KEY-column`` flag), a row
        whose value is null or of the wrong kind (naming the source, the row and the column), or what
        :func:`load_table` raises.
    """
    table = load_table(spec, what)
    optional = set(optional)
    kinds = dict(kinds or {})
    for key, column in columns.items():
        if key not in optional:
            table.require(column, key)
    out = []
    for i, row in enumerate(table.rows, start=1):
        picked = {key: row.get(column) for key, column in columns.items()}
        for key, value in picked.items():
            if value is not None or key not in optional:
                check_value(value, kinds.get(key, "text"), f"{table.source} row {i}", columns[key])
        out.append(picked)
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p
