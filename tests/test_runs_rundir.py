"""Run directory debris (issue 10 item 6) and the run directory lock (item 9).

A run that failed before its first checkpoint leaves a directory a rerun reuses; a kill mid-save leaves temp
directories the next start removes; a second process on a locked run directory gets one line naming the holder."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from proxrl.errors import UserError
from proxrl.runs import (
    MetricsLogger,
    RunDir,
    checkpoint_dir,
    clean_interrupted_saves,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    read_metrics,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _failed_run(path: Path) -> RunDir:
    """What a run that died before its first checkpoint leaves: config, metrics, tb, empty dirs."""
    rd = RunDir(path).create()
    rd.write_config({"env_id": "CartPole-v1", "lr": 0.1})
    with MetricsLogger(rd, tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
        log.log(2, {"loss": 2.0})
    (rd.tb).mkdir()
    (rd.tb / "events.out.tfevents.1").write_bytes(b"x")
    return rd


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- reuse after a failed run

def test_rerun_reuses_a_directory_left_without_a_checkpoint(tmp_path):
    rd = _failed_run(tmp_path / "run")
    (rd.path / "samples.md").write_text("stale")
    with pytest.raises(UserError, match=r"already exists; it has no checkpoint but holds files a run does not write "
                                         r"before its first one \(samples\.md\); delete it"):
        RunDir(rd.path).create()  # samples.md: not a file the trainer declared
    RunDir(rd.path).create(outputs=("samples.md",))  # before: "already exists; pass --resume" for a dead run
    assert sorted(p.name for p in rd.path.iterdir()) == ["checkpoints", "plots"]
    assert read_metrics(rd) == [] and not rd.has_run()
    rd.write_config({"env_id": "CartPole-v1", "lr": 0.2})
    with MetricsLogger(rd, tensorboard=False) as log:
        log.log(1, {"loss": 5.0})
    assert [r["loss"] for r in read_metrics(rd)] == [5.0]  # no stale rows from the failed try


def test_resume_create_keeps_everything(tmp_path):
    rd = _failed_run(tmp_path / "run")
    RunDir(rd.path).create(exist_ok=True)
    assert rd.has_run() and len(read_metrics(rd)) == 2


def test_directory_with_a_checkpoint_or_foreign_files_is_never_cleared(tmp_path):
    rd = _failed_run(tmp_path / "a")
    save_checkpoint(rd.checkpoint_dir(5), {"x": torch.ones(1)}, {"step": 5})
    with pytest.raises(UserError, match=r"already exists; pass --resume .*a to continue it"):
        RunDir(rd.path).create()
    assert latest_checkpoint(rd) == rd.checkpoint_dir(5) and len(read_metrics(rd)) == 2

    rd = _failed_run(tmp_path / "b")
    (rd.path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already exists; .*\(notes\.txt\)"):
        RunDir(rd.path).create()
    assert (rd.path / "notes.txt").read_text() == "mine" and rd.has_run()

    hand = tmp_path / "c"  # a config.yaml the user wrote (e.g. --config c/config.yaml --run-dir c)
    hand.mkdir()
    (hand / "config.yaml").write_text("env_id: CartPole-v1\n")
    with pytest.raises(UserError, match="already exists; its config.yaml was not written by this proxrl"):
        RunDir(hand).create()
    assert (hand / "config.yaml").read_text() == "env_id: CartPole-v1\n"


def test_written_config_is_marked_and_reads_back(tmp_path):
    rd = RunDir(tmp_path).create()
    rd.write_config({"a": 1, "b": [1, 2]})
    assert rd.config_path.read_text().startswith("# proxrl run config")
    assert rd.read_config() == {"a": 1, "b": [1, 2]}
    assert not hasattr(rd, "metrics_csv_path")  # dead code removed (issue 6)


# ----------------------------------------------------------------------------- interrupted saves

_KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from proxrl.runs import checkpoint_dir, save_checkpoint
    run, when = sys.argv[1], sys.argv[2]
    save_checkpoint(checkpoint_dir(run, 4), {"x": torch.full((3,), 4.0)}, {"step": 4})
    save_checkpoint(checkpoint_dir(run, 8), {"x": torch.full((3,), 8.0)}, {"step": 8})
    real = os.replace
    def replace(src, dst):
        if when == "before_rename" and ".tmp-" in str(src):
            os.kill(os.getpid(), signal.SIGKILL)       # new checkpoint complete, not yet in place
        if when == "old_aside" and ".tmp-" in str(src):
            os.kill(os.getpid(), signal.SIGKILL)       # old one of the same name already moved aside
        return real(src, dst)
    os.replace = replace
    step = 12 if when == "before_rename" else 8
    save_checkpoint(checkpoint_dir(run, step), {"x": torch.full((3,), 99.0)}, {"step": 99})
""")


@pytest.mark.parametrize("start", ["lock", "create", "load_latest"])
@pytest.mark.parametrize("when", ["before_rename", "old_aside"])
def test_kill_mid_save_leaves_temp_dirs_that_the_next_start_removes(tmp_path, when, start):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(run), when], env=ENV, capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers and all(".tmp-" in n or ".old-" in n for n in leftovers)
    if when == "old_aside":
        assert not checkpoint_dir(run, 8).exists()  # step 8 is only in the .old- directory
    if start == "lock":
        with RunDir(run).lock():
            pass
    elif start == "create":
        RunDir(run).create(exist_ok=True)
    else:
        assert load_latest_checkpoint(run)[0] == checkpoint_dir(run, 8)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000004", "step_000000008"]
    tensors, state = load_checkpoint(latest_checkpoint(run))
    assert state == {"step": 8} and torch.equal(tensors["x"], torch.full((3,), 8.0))


def test_temp_dirs_of_a_live_process_are_kept(tmp_path):
    live = tmp_path / "checkpoints" / f".step_000000003.tmp-{os.getpid()}-0123abcd"
    dead = tmp_path / "checkpoints" / f".step_000000003.tmp-{_dead_pid()}-0123abcd"
    live.mkdir(parents=True)
    dead.mkdir()
    stray = tmp_path / f".config.yaml.tmp-{_dead_pid()}-89abcdef"  # an atomic_write killed mid-write
    stray.write_text("half")
    assert clean_interrupted_saves(tmp_path) == [dead]
    assert live.exists() and not dead.exists()
    RunDir(tmp_path).create()
    assert not stray.exists() and live.exists()


# ----------------------------------------------------------------------------- the lock

_HOLD = textwrap.dedent("""
    import sys
    from proxrl.runs import RunDir
    with RunDir(sys.argv[1]).lock():
        print("locked", flush=True)
        sys.stdin.read()
""")


def _holder(path: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], env=ENV, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "locked\n"
    return p


def test_second_writer_gets_one_line_naming_the_holder_pid(tmp_path):
    run = tmp_path / "run"
    p = _holder(run)
    try:
        assert (run / ".lock").read_text().strip() == str(p.pid)
        with pytest.raises(UserError) as e:
            with RunDir(run).lock():
                pass
        assert str(e.value) == (f"run directory {run} is in use by process {p.pid}; wait for it to finish or use "
                                f"another --run-dir")
        with pytest.raises(UserError, match=f"in use by process {p.pid}"):
            RunDir(run).create(exist_ok=True)  # a trainer that forgot the lock is still refused
    finally:
        p.stdin.close()
        assert p.wait(timeout=60) == 0
    assert not run.exists()  # the holder created it and wrote nothing else: nothing left behind
    with RunDir(run).lock():  # free again
        assert (run / ".lock").read_text().strip() == str(os.getpid())


def test_lock_of_a_killed_holder_is_released_by_the_kernel(tmp_path):
    run = tmp_path / "run"
    RunDir(run).create()
    p = _holder(run)
    p.kill()
    p.wait(timeout=60)
    assert (run / ".lock").read_text().strip() == str(p.pid)  # stale file left by the crash does not block
    with RunDir(run).lock() as lk:
        assert lk.held and (run / ".lock").read_text().strip() == str(os.getpid())
        RunDir(run).create(exist_ok=True)
    assert not (run / ".lock").exists() and run.is_dir()


def test_lock_is_reentrant_in_one_process_and_released_on_exception(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with RunDir(run).lock():
            with RunDir(run).lock():  # e.g. the CLI and the trainer it calls
                RunDir(run).create()
                (run / "config.yaml").write_text("a: 1\n")
            assert (run / ".lock").exists()  # the outer one still holds it
            raise RuntimeError("boom")
    assert not (run / ".lock").exists() and (run / "config.yaml").exists()
    p = _holder(run)  # another process can take it now
    p.stdin.close()
    assert p.wait(timeout=60) == 0


def test_lock_on_a_file_is_one_line(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        RunDir(f).lock().acquire()
