"""Typed dataclass configs <-> command line and YAML, with one-line errors.

Every config is a ``@dataclass`` whose fields are declared with :func:`opt`, which carries the help text
shown by ``--help``. The CLI builds an ``argparse`` parser from the fields (``--learning-rate 3e-4``),
a YAML file given with ``--config`` supplies values first, and explicit flags override it.
Configs are never mutated after construction: derived quantities live in separate objects.

Two optional class attributes of a config dataclass drive shared behaviour:

* ``renamed_fields: ClassVar[dict[str, str]]`` (old name -> new name): a config file or resumed run that uses an
  old name gets a one-line error naming the new one.
* ``resumable_fields: ClassVar[frozenset[str]]``: the options a ``--resume`` may change; :func:`resume_config`
  applies those and rejects any other option that differs from the saved run.

Every float option must be finite (NaN and +-inf are refused with a one-line error naming the option).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from proxrl.errors import UserError

T = TypeVar("T")

RUN_INFO_KEY = "run_info"
"""A run's ``config.yaml`` also holds this section (device, processes, env preprocessing of the latest session):
information about the run, not an option; :func:`from_dict` and :func:`given_options` skip it."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and the help text ``--help`` prints for it."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for ``X``, ``X | None`` and ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(tp: Any, optional: bool):
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)

        def conv(text: str):
            if optional and text.lower() in ("none", "null"):
                return None
            if text not in choices:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, choices))}, got {text!r}")
            return text

        return conv
    base = {bool: _parse_bool, int: int, float: float, str: str}.get(tp, str)

    def conv(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            value = base(text)
        except ValueError as e:  # int("abc") etc.
            raise argparse.ArgumentTypeError(f"expected {getattr(tp, '__name__', tp)}, got {text!r}") from e
        if base is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value

    return conv


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of ``cls`` with its help text, type and default."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp, optional = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if typing.get_origin(tp) is typing.Literal:
            metavar = "{" + ",".join(map(str, typing.get_args(tp))) + "}"
        else:
            metavar = getattr(tp, "__name__", "VALUE").upper()
        if "(default:" not in help_text:
            help_text = f"{help_text} (default: {default})"
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=_converter(tp, optional),
            default=argparse.SUPPRESS,
            metavar=f.metadata.get("metavar", metavar),
            help=help_text.replace("%", "%%"),  # argparse %-formats help strings
        )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; one-line errors for a missing or malformed file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file {str(p)!r} is not a UTF-8 text file (binary?); give a YAML file") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {str(p)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping; unknown keys and badly typed values are one-line errors.

    Keys may use dashes or underscores (``learning-rate`` or ``learning_rate``).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    renamed: dict[str, str] = getattr(cls, "renamed_fields", {})
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name == RUN_INFO_KEY:
            continue
        if name not in names and name in renamed:
            raise UserError(f"{source}: option {name!r} was renamed to {renamed[name]!r}; use {renamed[name]!r} "
                            f"(flag {_flag(renamed[name])})")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown key {key!r} in {source}{hint}")
        tp, optional = _base_type(hints[name])
        if value is None and optional:
            kwargs[name] = None
            continue
        try:
            if typing.get_origin(tp) is typing.Literal:
                if value not in typing.get_args(tp):
                    raise ValueError
            elif tp is bool:
                value = value if isinstance(value, bool) else _parse_bool(str(value))
            elif tp is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif tp is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not math.isfinite(value):
                    raise UserError(f"{source}: {key!r} = {value!r} must be a finite number")
            elif tp is str:
                value = str(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise UserError(f"{source}: {key!r} = {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain mapping (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def build(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Config from ``base`` (e.g. a preset), then ``--config FILE``, then explicit flags."""
    cfg_file = getattr(args, "config", None)
    values = {**(base or {}), **given_options(cls, args)}
    return from_dict(cls, values, source=str(cfg_file) if cfg_file else "config")


def given_options(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``cls`` the user gave explicitly: a ``--config`` file's values, then the flags on the command
    line (the parser's defaults are ``SUPPRESS``, so only given flags are in ``args``)."""
    values: dict[str, Any] = {}
    cfg_file = getattr(args, "config", None)
    if cfg_file:
        values.update({str(k).replace("-", "_"): v for k, v in load_yaml(cfg_file).items() if k != RUN_INFO_KEY})
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return values


def resume_config(cls: type[T], saved: dict[str, Any], given: dict[str, Any], source: str = "config") -> T:
    """The config of a resumed run: ``saved`` with the ``given`` values of ``cls.resumable_fields`` applied.

    A given option outside ``resumable_fields`` whose value differs from the saved run's is a one-line
    :class:`UserError` naming it, its saved value and the options a resume may change; giving the saved value
    again is accepted. The result is validated like any other config (``from_dict``).
    """
    allowed: frozenset[str] = getattr(cls, "resumable_fields", frozenset())
    base = from_dict(cls, saved, source=source)
    if given:
        checked = from_dict(cls, {**saved, **given}, source="the given options")
        for key in given:
            name = str(key).replace("-", "_")
            if name in allowed:
                continue
            if getattr(checked, name) != getattr(base, name):
                can = ", ".join(_flag(n) for n in sorted(allowed)) or "none"
                raise UserError(
                    f"{_flag(name)} cannot change on --resume (the run was started with {name}="
                    f"{getattr(base, name)!r}); a resume may change only: {can}"
                )
        return checked
    return base


def check(cond: bool, message: str) -> None:
    """Raise a :class:`UserError` with ``message`` unless ``cond`` holds (for ``__post_init__`` validation)."""
    if not cond:
        raise UserError(message)
