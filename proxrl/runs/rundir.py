"""Run directory layout, atomic file writes, the YAML config of a run and the run directory's lock.

A run directory holds::

    config.yaml        the resolved config (written atomically; first line is CONFIG_MARK)
    metrics.jsonl      one JSON object per logged step (see metrics.py)
    metrics.csv        the same rows as a CSV table
    tb/                TensorBoard event files
    checkpoints/       step_000012345/{model.safetensors,state.json}
    plots/             PNG figures
    .lock              exists while a process holds the run directory's lock; holds that process's PID

The order a trainer follows (so a failed or refused command never leaves a directory that blocks the next try)::

    rd = RunDir(run_dir)
    with rd.lock():                       # 1. the lock, for the life of the run (one writer at a time)
        ...                               # 2. validate everything: the config, the resume checkpoint
                                          #    (load_latest_checkpoint), models, data, user code
        rd.create(exist_ok=resume)        # 3. the tree; reuses a directory left by a failed run
        rd.write_config(to_dict(cfg))     # 4. config.yaml, only now that the run is known to be valid
        ...                               # 5. train: MetricsLogger(rd, resume_from_step=...), checkpoints
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Union

import yaml

from proxrl.errors import UserError

PathLike = Union[str, "os.PathLike[str]", "RunDir"]

#: First line of every config.yaml written by :meth:`RunDir.write_config`. A directory whose config.yaml lacks it
#: (hand-written, or from an older proxrl) is never cleared by :meth:`RunDir.create`.
CONFIG_MARK = "# proxrl run config (written by proxrl; --resume reads it back)"


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


# ----------------------------------------------------------------------------- the lock

LOCK_FILE = ".lock"
# run directories this process holds the lock of: realpath -> [fd (or -1 where locking is unsupported), depth]
_HELD: dict[str, list[int]] = {}
_NO_LOCK_WARNED = False


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _holder_pid(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _in_use_error(path: Path, lock_path: Path) -> UserError:
    pid = _holder_pid(lock_path)
    who = f"process {pid}" if pid else "another process"
    return UserError(f"run directory {path} is in use by {who}; wait for it to finish or use another --run-dir")


def _lock_unsupported(path: Path, e: OSError) -> None:
    global _NO_LOCK_WARNED
    if not _NO_LOCK_WARNED:
        _NO_LOCK_WARNED = True
        warnings.warn(f"cannot lock run directory {path} ({e.strerror or e}); running without the lock, so do not "
                      f"start a second run on it", stacklevel=4)


class RunLock:
    """Advisory exclusive lock on a run directory (``fcntl.flock`` on ``RUN_DIR/.lock``) for the life of a run.

    ``acquire()`` creates the directory if needed and raises a one-line UserError naming the holder's PID if
    another process holds the lock. Re-entrant within one process (a CLI and the trainer it calls may both take
    it). Released by ``release()`` / leaving the ``with`` block, and by the kernel when the process dies (a
    stale ``.lock`` file left by a killed run does not block the next one). While held, ``.lock`` holds the PID;
    ``release()`` removes it (and the directory itself if acquiring created it and nothing else was written).
    On file systems without ``flock`` it warns once and runs unlocked. Forked children share the lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._key: str | None = None
        self._created = False

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._key is not None

    def acquire(self) -> "RunLock":
        """Take the lock (UserError if another process holds it); returns self."""
        if self._key is not None:
            raise RuntimeError(f"RunLock on {self.path} is already acquired by this object")
        key = _key(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run directory {self.path} exists and is not a directory; choose another --run-dir")
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run directory {self.path}: {e.strerror}; choose another --run-dir") from e
        fd = self._lock_fd()
        if fd >= 0:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        _HELD[key] = [fd, 1]
        self._key, self._created = key, created
        _tidy(self.path)  # what a killed run left: nobody else can be writing now
        return self

    def _lock_fd(self) -> int:
        try:
            import fcntl
        except ImportError:  # not POSIX
            _lock_unsupported(self.path, OSError(errno.ENOSYS, "no fcntl module"))
            return -1
        lock_path = self.path / LOCK_FILE
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise UserError(f"cannot open {lock_path}: {e.strerror}; check the permissions of the run "
                                f"directory or use another --run-dir") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _in_use_error(self.path, lock_path) from None
                _lock_unsupported(self.path, e)
                return -1
            # the holder we waited for may have removed the file before we locked it: lock the current one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def release(self) -> None:
        """Give the lock back (no-op if not held)."""
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        fd = entry[0]
        if fd >= 0:
            try:
                (self.path / LOCK_FILE).unlink(missing_ok=True)  # still holding it: nobody else can own this file
            except OSError:
                pass
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children that share this open file
            except OSError:
                pass
            os.close(fd)
        if self._created:
            try:
                self.path.rmdir()  # only if nothing was written into it
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"


def _tidy(path: Path) -> None:
    """Remove the temp files and directories of writers that died (see ``clean_interrupted_saves``)."""
    from proxrl.runs.checkpoint import clean_interrupted_saves

    try:
        clean_temp_files(path)
        clean_interrupted_saves(path)
    except OSError:
        pass


def _check_not_locked_elsewhere(path: Path) -> None:
    """UserError if another process holds the lock of ``path`` (no-op if this process holds it)."""
    if _key(path) in _HELD or not (path / LOCK_FILE).is_file():
        return
    try:
        import fcntl
    except ImportError:
        return
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _in_use_error(path, path / LOCK_FILE) from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the run directory

_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[0-9a-f]+$")


def _is_temp_name(name: str) -> bool:
    """A hidden temp name written by :func:`atomic_write` or a checkpoint save: ``.NAME.tmp-PID-HEX``."""
    return _TEMP_RE.match(name) is not None


def temp_owner_alive(name: str) -> bool:
    """True if the process whose PID a temp name ``.NAME.tmp-PID-HEX`` carries is still running (or unknown)."""
    m = _TEMP_RE.match(name)
    if m is None:
        return True
    pid = int(m.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def clean_temp_files(directory: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-HEX`` files that :func:`atomic_write` left in ``directory`` when its process died."""
    removed = []
    for p in directory.iterdir() if directory.is_dir() else ():
        if _is_temp_name(p.name) and p.is_file() and not temp_owner_alive(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class RunDir:
    """The files of one training run.

    Order for a trainer (a refused or failed command then never blocks the next try)::

        rd = RunDir(cfg.run_dir)
        with rd.lock():                    # the whole run; a second writer gets "in use by process N"
            ckpt = load_latest_checkpoint(rd, ...) if resume else None   # validate first
            rd.create(exist_ok=resume)     # reuses a directory a failed run left without a checkpoint
            rd.write_config(to_dict(cfg))  # only once the run/resume is known to be valid (atomic)
            logger = MetricsLogger(rd, resume_from_step=step if resume else None)
            ...

    :meth:`create` never deletes a checkpoint, nor a file proxrl did not write.
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    METRICS_CSV = "metrics.csv"
    #: what a run writes before its first checkpoint; :meth:`create` clears these from a failed run's directory
    RUN_FILES: tuple[str, ...] = (CONFIG, METRICS, METRICS_CSV, "tb", "plots", "checkpoints", LOCK_FILE)

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

    def lock(self) -> RunLock:
        """The run directory's advisory lock, to hold for the life of a run: ``with RunDir(p).lock(): ...``.

        A second process gets a one-line UserError: "run directory P is in use by process N; ...".
        See :class:`RunLock` (re-entrant in one process; released on exit and by the kernel on a crash).
        """
        return RunLock(self.path)

    def _written_by_proxrl(self) -> bool:
        try:
            with open(self.config_path, encoding="utf-8", errors="replace") as f:
                return f.readline().rstrip("\n") == CONFIG_MARK
        except OSError:
            return False

    def _stale_entries(self, outputs: Iterable[str]) -> tuple[list[Path] | None, str]:
        """The entries of a directory a failed run left (no complete checkpoint, only files a run writes before
        its first checkpoint, a config.yaml written by proxrl), or ``(None, why it is not such a directory)``."""
        from proxrl.runs.checkpoint import list_checkpoints

        if list_checkpoints(self.path):
            return None, f"pass --resume {self.path} to continue it or choose another --run-dir"
        if self.config_path.exists() and not self._written_by_proxrl():
            return None, ("its config.yaml was not written by this proxrl and it has no checkpoint; delete it or "
                          "choose another --run-dir")
        known = set(self.RUN_FILES) | set(outputs)
        entries = sorted(self.path.iterdir())
        foreign = [p.name for p in entries if p.name not in known and not _is_temp_name(p.name)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            return None, (f"it has no checkpoint but holds files a run does not write before its first one "
                          f"({shown}); delete it or choose another --run-dir")
        return [p for p in entries if p.name != LOCK_FILE], ""

    def create(self, exist_ok: bool = False, outputs: Iterable[str] = ()) -> "RunDir":
        """Create the directory tree, ready for a new run (``exist_ok=False``) or a resumed one (``exist_ok=True``).

        Removes what an interrupted checkpoint save left (see :func:`clean_interrupted_saves`). Without
        ``exist_ok``, a directory left by a run that failed before its first checkpoint (only :attr:`RUN_FILES`
        and the trainer's ``outputs`` names, e.g. ``("samples.md",)``, and a config.yaml written by proxrl) is
        cleared and reused; a directory holding a checkpoint or other files is refused with a one-line UserError
        ("already exists; pass --resume ..."). Also UserError if another process holds the directory's lock.
        ``outputs`` must name only files written during a run, never final results.
        """
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run directory {self.path} exists and is not a directory; choose another --run-dir")
        if self.path.is_dir():
            _check_not_locked_elsewhere(self.path)
            _tidy(self.path)
            if not exist_ok:
                stale, why = self._stale_entries(outputs)
                if stale is None and self.has_run():
                    raise UserError(f"run directory {self.path} already exists; {why}")
                for p in stale or ():
                    if p.name == "checkpoints" and p.is_dir() and not p.is_symlink():
                        for q in p.iterdir():  # partial step dirs; temp dirs of a save still running are kept
                            if not (_is_temp_name(q.name) and temp_owner_alive(q.name)):
                                _remove(q)
                    else:
                        _remove(p)
        try:
            for d in (self.path, self.checkpoints, self.plots):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run directory {self.path}: {e.strerror}; choose another --run-dir") from e
        return self

    def write_config(self, config: dict[str, Any]) -> Path:
        """Write ``config`` (nested dict of plain values) to config.yaml atomically; returns the path.

        Call it only once the run (or the resume) is known to be valid, so a refused command leaves the old file.
        """
        text = yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
        return atomic_write(self.config_path, f"{CONFIG_MARK}\n{text}")

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
