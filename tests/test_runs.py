"""Tests for proxrl.runs: atomic checkpoints, corrupt files, metrics resume, CSV growth, plots, RNG."""
from __future__ import annotations

import ast
import csv
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from proxrl.errors import UserError
from proxrl.runs import (
    MetricsLogger,
    RunDir,
    checkpoint_dir,
    generator_state,
    latest_checkpoint,
    load_checkpoint,
    plot_metrics,
    plot_xy,
    progress_bar,
    prune_checkpoints,
    read_metrics,
    rng_state,
    save_checkpoint,
    set_generator_state,
    set_rng_state,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- layering

def test_runs_imports_only_errors_from_proxrl():
    pkg = Path(__file__).resolve().parents[1] / "proxrl" / "runs"
    for f in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n == "proxrl" or n.startswith("proxrl."):
                    assert n == "proxrl.errors" or n.startswith("proxrl.runs"), f"{f.name} imports {n}"


# ----------------------------------------------------------------------------- run dir / config

def test_rundir_create_refuses_existing_run_and_roundtrips_config(tmp_path):
    rd = RunDir(tmp_path / "run").create()
    cfg = {"env_id": "CartPole-v1", "lr": 3e-4, "hidden": (64, 64), "nested": {"a": None, "b": True}}
    rd.write_config(cfg)
    assert rd.read_config() == {**cfg, "hidden": [64, 64]}
    (rd.path / "keep.txt").write_text("x")
    with pytest.raises(UserError, match=r"run already exists; it has no checkpoint but holds .*\(keep\.txt\)"):
        RunDir(tmp_path / "run").create()
    RunDir(tmp_path / "run").create(exist_ok=True)
    assert (rd.path / "keep.txt").read_text() == "x"  # nothing deleted
    assert not list(rd.path.glob(".*tmp*"))


def test_read_config_errors_name_the_file(tmp_path):
    rd = RunDir(tmp_path).create()
    with pytest.raises(UserError, match="config.yaml not found"):
        rd.read_config()
    rd.config_path.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match=r"config.yaml.*invalid YAML") as e:
        rd.read_config()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- checkpoints

def _tensors():
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {"w": w, "w_t": w.t(), "w_alias": w, "row": w[1], "b": torch.ones(2, dtype=torch.bfloat16)}


def test_checkpoint_roundtrip_shared_and_noncontiguous(tmp_path):
    state = {"step": 7, "lr": 0.1, "big": 2**70, "nested": {"xs": [1.5, 2, "a"], "k": {"z": -1e-300}}, "none": None}
    d = save_checkpoint(tmp_path / "checkpoints" / "step_000000007", _tensors(), state)
    tensors, loaded = load_checkpoint(d)
    assert loaded == state
    for k, v in _tensors().items():
        assert torch.equal(tensors[k], v), k
        assert tensors[k].is_contiguous()
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temp leftovers


def test_save_replaces_existing_checkpoint_of_same_name(tmp_path):
    d = checkpoint_dir(tmp_path, 3)
    save_checkpoint(d, {"x": torch.zeros(2)}, {"v": 1})
    save_checkpoint(d, {"x": torch.ones(2)}, {"v": 2})
    t, s = load_checkpoint(d)
    assert s == {"v": 2} and torch.equal(t["x"], torch.ones(2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000000003"]


@pytest.mark.parametrize("fail_on", ["any", "tmp_into_place"])
def test_atomic_save_survives_crash_in_os_replace(tmp_path, monkeypatch, fail_on):
    old = checkpoint_dir(tmp_path, 10)
    save_checkpoint(old, {"x": torch.full((3,), 1.0)}, {"v": "old"})
    real_replace = os.replace

    def crashing_replace(src, dst):
        if fail_on == "any" or ".tmp-" in Path(src).name:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(old, {"x": torch.full((3,), 2.0)}, {"v": "new"})  # overwrite same name
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(checkpoint_dir(tmp_path, 20), {"x": torch.zeros(3)}, {"v": "newer"})
    monkeypatch.setattr(os, "replace", real_replace)

    t, s = load_checkpoint(old)
    assert s == {"v": "old"} and torch.equal(t["x"], torch.full((3,), 1.0))
    assert latest_checkpoint(tmp_path) == old
    assert not checkpoint_dir(tmp_path, 20).exists()


def test_latest_checkpoint_ignores_partial_and_temp_dirs(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 40, 300):
        save_checkpoint(checkpoint_dir(tmp_path, step), {"x": torch.tensor([float(step)])}, {"step": step})
    partial = checkpoint_dir(tmp_path, 999)  # e.g. created by hand / older tool: weights but no state
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    stale = tmp_path / "checkpoints" / ".step_000001000.tmp-1-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x")
    (stale / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 300)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert checkpoint_dir(tmp_path, 5) in removed and stale in removed
    assert not checkpoint_dir(tmp_path, 5).exists()
    assert checkpoint_dir(tmp_path, 40).exists() and latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 300)
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep=0)


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nope does not exist"):
        load_checkpoint(tmp_path / "nope")
    d = save_checkpoint(tmp_path / "ck", {"x": torch.randn(64, 64)}, {"a": 1})
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError, match=r"model\.safetensors is truncated or corrupt") as e:
        load_checkpoint(d)
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    weights.write_bytes(b"\xff" * 5)  # garbage
    with pytest.raises(UserError, match=r"model\.safetensors"):
        load_checkpoint(d)
    weights.write_bytes(data)
    (d / "state.json").write_text('{"a": 1,')
    with pytest.raises(UserError, match=r"state\.json is not valid JSON"):
        load_checkpoint(d)
    (d / "state.json").unlink()
    with pytest.raises(UserError, match=r"state\.json is missing"):
        load_checkpoint(d)


def test_checkpoint_never_pickles(tmp_path):
    d = save_checkpoint(tmp_path / "ck", {"x": torch.ones(1)}, {"a": [1, 2]})
    assert sorted(p.name for p in d.iterdir()) == ["model.safetensors", "state.json"]
    json.loads((d / "state.json").read_text())
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "ck2", {}, {"obj": object()})
    assert not (tmp_path / "ck2").exists()


# ----------------------------------------------------------------------------- rng

def _draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist())


def test_rng_roundtrip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    random.gauss(0, 1)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    assert random.getstate()[2] is not None
    tensors, state = rng_state()
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(1), **tensors}, {"rng": state})
    expected = _draw()
    assert _draw() != expected  # the stream moves on
    t, s = load_checkpoint(tmp_path / "ck")
    set_rng_state(t, s["rng"])
    assert _draw() == expected
    set_rng_state(t, s)  # whole checkpoint state with an "rng" entry works too
    assert _draw() == expected


def test_explicit_generator_state_roundtrip():
    tg = torch.Generator().manual_seed(5)
    ng = np.random.default_rng(6)
    rs = np.random.RandomState(7)
    torch.rand(4, generator=tg), ng.random(4), rs.rand(2)
    states = [json.loads(json.dumps(generator_state(g))) for g in (tg, ng, rs)]
    expected = (torch.rand(4, generator=tg).tolist(), ng.random(4).tolist(), ng.integers(0, 2**62), rs.rand(2).tolist())
    for g, s in zip((tg, ng, rs), states):
        set_generator_state(g, s)
    assert (torch.rand(4, generator=tg).tolist(), ng.random(4).tolist(), ng.integers(0, 2**62), rs.rand(2).tolist()) == expected
    with pytest.raises(TypeError):
        set_generator_state(ng, states[0])


# ----------------------------------------------------------------------------- metrics

def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_metrics_csv_header_grows_and_nan_is_null(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"loss": 0.5})
    log.log(2, {"loss": 0.25, "kl": torch.tensor(0.01)})
    log.log(3, {"loss": float("nan"), "kl": np.float32(0.5), "ret": float("inf")})
    log.close()
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert rows[0] == ["step", "loss", "kl", "ret"]
    assert rows[1] == ["1", "0.5", "", ""] and rows[2] == ["2", "0.25", "0.009999999776482582", ""]
    assert rows[3] == ["3", "", "0.5", ""]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[2]) == {"step": 3, "loss": None, "kl": 0.5, "ret": None}
    assert "NaN" not in lines[2] and "Infinity" not in lines[2]
    got = read_metrics(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3] and math.isnan(got[2]["loss"])


def test_metrics_resume_drops_rows_after_checkpoint(tmp_path):
    def run(logger, steps):
        for s in steps:
            logger.log(s, {"a": s * 0.5} if s < 4 else {"a": s * 0.5, "late": float(s)})

    ref = tmp_path / "ref"
    with MetricsLogger(ref, tensorboard=False) as log:
        run(log, range(1, 7))

    crashed = tmp_path / "crashed"
    with MetricsLogger(crashed, tensorboard=False) as log:
        run(log, range(1, 6))  # checkpoint at step 2, crash after logging 5
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "a"')  # partial line from the crash
    with MetricsLogger(crashed, tensorboard=False, resume_from_step=2) as log:
        assert [r["step"] for r in read_metrics(crashed)] == [1, 2]
        assert _csv_rows(crashed / "metrics.csv")[0] == ["step", "a"]
        run(log, range(3, 7))
    assert (crashed / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert (crashed / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()

    with MetricsLogger(crashed, tensorboard=False) as log:  # plain reopen appends
        log.log(7, {"a": 3.5})
    assert [r["step"] for r in read_metrics(crashed)] == [1, 2, 3, 4, 5, 6, 7]


def test_read_metrics_corrupt_middle_line_is_user_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl line 2"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path / "missing") == []


def test_metrics_tensorboard_events_written(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, tensorboard=True) as log:
        log.log(1, {"loss": 1.0})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ----------------------------------------------------------------------------- plots / progress

def test_plot_metrics_writes_png_and_skips_missing_keys(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(5):
            log.log(s, {"loss": 1.0 / (s + 1), "ret": float(s)})
    p = plot_metrics(tmp_path, "step", ["loss", "ret", "absent"], "train", "CartPole")
    assert p == tmp_path / "plots" / "train.png"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    with pytest.raises(UserError, match="'nosuch' not found"):
        plot_metrics(tmp_path, "nosuch", ["loss"], "x", "t")
    q = plot_xy(tmp_path / "xy.png", [0, 1, 2], {"ppo": [1, 2, 3], "sb3": [1, 1.5, 2]}, "steps", "cmp")
    assert q.read_bytes()[:4] == b"\x89PNG"


def test_progress_bar_quiet_when_not_tty_and_compact_postfix(capsys):
    bar = progress_bar(10, "train", "step")  # pytest's stderr is not a TTY
    assert bar.disable
    bar.update(3)
    bar.close()
    bar = progress_bar(10, "train", "step", disable=False)
    bar.set_postfix({"loss": 0.123456789, "kl": torch.tensor(1e-5), "it": 3})
    assert bar.postfix == "loss=0.123, kl=1e-05, it=3"
    bar.close()


def test_metrics_without_tensorboard_warns_once_and_keeps_logging(tmp_path, monkeypatch):
    import sys

    import proxrl.runs.metrics as m

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setattr(m, "_TB_WARNED", False)
    with pytest.warns(UserWarning, match="TensorBoard logging disabled"):
        with MetricsLogger(tmp_path / "a") as log:
            log.log(1, {"x": 1.0})
            log.log(2, {"x": 2.0})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with MetricsLogger(tmp_path / "b") as log:  # second logger: no second warning
            log.log(1, {"x": 1.0})
    assert len(read_metrics(tmp_path / "a")) == 2 and not (tmp_path / "a" / "tb").exists()
