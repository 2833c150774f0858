"""proxrl.distributed: devices, whole-batch statistics over ranks, work split, DDP, failure handling.

Multi-process tests run 2 CPU processes with gloo, either spawned here (``torch.multiprocessing``, torchrun's
environment variables set by hand on a free port) or under a real ``torchrun --standalone``. Every
reference value is the single-process :mod:`proxrl.core` function on the concatenated data, in float64.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from proxrl import distributed as D
from proxrl.core import explained_variance as core_ev
from proxrl.core import masked_mean as core_mean
from proxrl.core import masked_var as core_var
from proxrl.core import normalize as core_normalize
from proxrl.errors import UserError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in TORCHRUN_VARS + (D.TIMEOUT_ENV,):
        monkeypatch.delenv(k, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)


def _spawn(worker, *args) -> None:  # noqa: ANN001
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(_free_port(), *args), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------- data
# Rank 0 holds rows [0, 4), rank 1 rows [4, 10): unequal shares, so a mean of per-rank means would be wrong.
SPLIT = 4


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64) * 3 + 1.5
    mask = torch.rand(10, 6, generator=g) > 0.35
    weights = torch.rand(10, 1, generator=g, dtype=torch.float64)      # fractional, broadcast over columns
    values = torch.randn(10, 6, generator=g, dtype=torch.float64)
    returns = values + 0.5 * torch.randn(10, 6, generator=g, dtype=torch.float64)
    x[~mask] = float("nan")  # masked-out entries must never reach a masked statistic
    return {"x": x, "mask": mask, "weights": weights, "values": values, "returns": returns,
            "x_clean": torch.nan_to_num(x, nan=0.25)}


def _rows(rank: int) -> slice:
    return slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)


def _stats_worker(rank: int, port: int, out_dir: str) -> None:
    _set_rank_env(rank, 2, port)
    info = D.init_distributed()
    d = {k: v[_rows(rank)] for k, v in _data().items()}
    res: dict = {"info": [info.rank, info.world_size, info.local_rank, info.is_main, info.distributed]}
    res["mean_mask"] = D.masked_mean(d["x"], d["mask"]).item()
    res["var_mask"] = D.masked_var(d["x"], d["mask"]).item()
    res["var_mask_biased"] = D.masked_var(d["x"], d["mask"], unbiased=False).item()
    res["mean_none"] = D.masked_mean(d["x_clean"]).item()
    res["var_none"] = D.masked_var(d["x_clean"]).item()
    res["mean_w"] = D.masked_mean(d["x_clean"], d["weights"]).item()
    res["var_w"] = D.masked_var(d["x_clean"], d["weights"]).item()
    res["norm_mask"] = D.global_normalize(d["x"], d["mask"]).tolist()
    res["norm_none"] = D.global_normalize(d["x_clean"]).tolist()
    res["scale_mask"] = D.global_normalize(d["x"], d["mask"], shift_mean=False).tolist()
    res["ev"] = D.explained_variance(d["values"], d["returns"], d["mask"])
    res["ev_none"] = D.explained_variance(d["values"], d["returns"])
    # one valid entry in the whole job: unbiased var is NaN, normalize treats std as 0
    one = torch.zeros(3, 1, dtype=torch.bool)
    if rank == 1:
        one[2, 0] = True
    res["var_one"] = D.masked_var(torch.full((3, 1), 2.0, dtype=torch.float64), one).item()
    res["norm_one"] = D.global_normalize(torch.full((3, 1), 2.0, dtype=torch.float64), one).tolist()
    res["stop_one"] = D.all_ranks_agree_stop(rank == 1)
    res["stop_none"] = D.all_ranks_agree_stop(False)
    res["stop_all"] = D.all_ranks_agree_stop(True)
    res["bcast"] = D.broadcast_object({"ckpt": "runs/x/step_8", "step": 8, "f": [1.5, None]} if rank == 0 else None)
    flat = np.full(5, float(rank + 1))
    back = D.all_reduce_mean_(flat)
    res["np_mean"] = flat.tolist()
    res["np_same_object"] = back is flat
    t = torch.arange(4, dtype=torch.float32) * (rank + 1)
    res["sum"] = D.all_reduce_sum(t).tolist()
    res["mean"] = D.all_reduce_mean(t).tolist()
    res["t_unchanged"] = t.tolist()
    res["mean_int"] = D.all_reduce_mean(torch.tensor([rank + 1])).tolist()
    wflat = torch.full((3,), 2.0 if rank == 0 else 5.0, dtype=torch.float64)
    D.all_reduce_mean_(wflat, weight=1.0 if rank == 0 else 2.0)
    res["weighted_flat"] = wflat.tolist()
    res["max"] = D.all_reduce_max(torch.tensor([3, 9]) if rank == 0 else torch.tensor([7, 1])).tolist()
    res["gather"] = D.all_gather_cat(d["x_clean"]).tolist()
    res["gather_mask"] = D.all_gather_cat(d["mask"]).tolist()
    cols = slice(0, 2) if rank == 0 else slice(2, 6)  # (T, n_envs_local) rollouts gathered along the env axis
    res["gather_dim1"] = D.all_gather_cat(_data()["values"][:, cols], dim=1).tolist()
    res["metrics_equal"] = D.mean_over_ranks({"a": float(rank), "b": 10.0 * (rank + 1)})
    res["metrics_weighted"] = D.mean_over_ranks({"ret": 100.0 if rank == 0 else 40.0,
                                                 "only1": float("nan") if rank == 0 else 7.0,
                                                 "none": float("nan")}, weight=1.0 if rank == 0 else 3.0)
    D.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    D.shutdown()


@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> list[dict]:
    """The results of :func:`_stats_worker` on ranks 0 and 1 (one 2-process run for the tests below)."""
    out = tmp_path_factory.mktemp("stats")
    _spawn(_stats_worker, str(out))
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


def test_global_statistics_equal_single_process_on_the_concatenation(stats):
    r = stats
    d = _data()
    x, m, w, xc = d["x"], d["mask"], d["weights"], d["x_clean"]
    assert r[0]["info"] == [0, 2, 0, True, True] and r[1]["info"] == [1, 2, 1, False, True]
    expect = {
        "mean_mask": core_mean(x, m).item(), "var_mask": core_var(x, m).item(),
        "var_mask_biased": core_var(x, m, unbiased=False).item(),
        "mean_none": core_mean(xc).item(), "var_none": core_var(xc).item(),
        "mean_w": core_mean(xc, w).item(), "var_w": core_var(xc, w).item(),
        "ev": core_ev(d["values"], d["returns"], m), "ev_none": core_ev(d["values"], d["returns"]),
    }
    for rank in range(2):
        for k, v in expect.items():
            assert r[rank][k] == pytest.approx(v, rel=1e-12, abs=1e-12), (rank, k)
        assert np.isnan(r[rank]["var_one"])
    for key, ref in (("norm_mask", core_normalize(x, m)), ("norm_none", core_normalize(xc)),
                     ("scale_mask", core_normalize(x, m, shift_mean=False))):
        got = torch.tensor(r[0][key] + r[1][key], dtype=torch.float64)
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12), key
    assert not torch.isnan(torch.tensor(r[0]["norm_mask"])).any()  # NaNs at masked entries did not leak
    one = torch.zeros(6, 1, dtype=torch.bool)
    one[5, 0] = True
    ref_one = core_normalize(torch.full((6, 1), 2.0, dtype=torch.float64), one)
    assert torch.equal(torch.tensor(r[0]["norm_one"] + r[1]["norm_one"], dtype=torch.float64), ref_one)


def test_collectives_vote_broadcast_and_flat_gradient(stats):
    r = stats
    for rank in range(2):
        assert (r[rank]["stop_one"], r[rank]["stop_none"], r[rank]["stop_all"]) == (True, False, True)
        assert r[rank]["bcast"] == {"ckpt": "runs/x/step_8", "step": 8, "f": [1.5, None]}
        assert r[rank]["np_mean"] == [1.5] * 5 and r[rank]["np_same_object"]
        assert r[rank]["sum"] == [0.0, 3.0, 6.0, 9.0]
        assert r[rank]["mean"] == [0.0, 1.5, 3.0, 4.5]
        assert r[rank]["mean_int"] == [1.5]
        assert r[rank]["metrics_equal"] == {"a": 0.5, "b": 15.0}
        assert r[rank]["weighted_flat"] == [4.0] * 3  # (1 * 2 + 2 * 5) / 3
        assert r[rank]["max"] == [7, 9]
        d = _data()
        assert torch.equal(torch.tensor(r[rank]["gather"], dtype=torch.float64), d["x_clean"])  # 4 + 6 rows
        assert torch.equal(torch.tensor(r[rank]["gather_mask"]), d["mask"])
        assert torch.equal(torch.tensor(r[rank]["gather_dim1"], dtype=torch.float64), d["values"])
        # (100 * 1 + 40 * 3) / 4 = 55; "only1" from rank 1 alone; "none" has no value anywhere
        mw = r[rank]["metrics_weighted"]
        assert mw["ret"] == 55.0 and mw["only1"] == 7.0 and np.isnan(mw["none"])
    assert r[0]["t_unchanged"] == [0.0, 1.0, 2.0, 3.0]


# ---------------------------------------------------------------------------------------------- DDP

def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    from safetensors.torch import save_file

    _set_rank_env(rank, 2, port)
    info = D.init_distributed(torch.device("cpu"))
    if rank == 1:
        torch.manual_seed(123)  # a different local init: DDP must broadcast rank 0's weights
        model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    else:
        model = _mlp()
    ddp = D.wrap_ddp(model, torch.device("cpu"))
    x, y = _batch()
    s = D.shard_indices(8, info.rank, info.world_size)
    _train(ddp, x[s], y[s])
    save_file({k: v.contiguous() for k, v in D.unwrap_model(ddp).state_dict().items()},
              str(Path(out_dir, f"rank{rank}.safetensors")))
    del ddp, model  # the DDP reducer holds the process group: drop it first, as a returning trainer does
    D.shutdown()


def test_ddp_on_two_halves_equals_one_process_on_the_full_batch(tmp_path):
    from safetensors.torch import load_file

    _spawn(_ddp_worker, str(tmp_path))
    ref = _mlp()
    assert D.wrap_ddp(ref, torch.device("cpu")) is ref  # 1 process: no wrapper
    _train(ref, *_batch())
    init = _mlp().state_dict()
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for k, v in ref.state_dict().items():
            assert torch.allclose(got[k], v, rtol=0, atol=1e-6), (rank, k)
            assert not torch.allclose(got[k], init[k], atol=1e-4), k  # and training did move them


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.lin(h))


class _Tiny(torch.nn.Module):
    """A transformer-shaped MLP: an input layer, a ModuleList of identical blocks, a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(3, 8)
        self.blocks = torch.nn.ModuleList([_Block() for _ in range(3)])
        self.head = torch.nn.Linear(8, 1)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule

    _set_rank_env(rank, 2, port)
    info = D.init_distributed(torch.device("cpu"))
    model = D.fsdp_shard(_Tiny(), torch.device("cpu"))
    n_units = sum(isinstance(m, FSDPModule) for m in model.modules())
    x, y = _batch()
    _train(model, *(t[D.shard_indices(8, info.rank, info.world_size)] for t in (x, y)))
    sd = D.full_state_dict(model)
    # reload into a fresh, differently initialised sharded model (rank 0 alone holds the weights)
    fresh = D.fsdp_shard(_Tiny(seed=5), torch.device("cpu"))
    D.load_full_state_dict(fresh, sd if rank == 0 else {})
    with torch.no_grad():
        out = fresh(x)
    tensors = {"out": out.contiguous()}
    if rank == 0:
        tensors.update({f"sd.{k}": v.contiguous() for k, v in sd.items()})
    save_file(tensors, str(Path(out_dir, f"rank{rank}.safetensors")))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"units": n_units, "sd_keys": len(sd)}))
    del model, fresh  # the sharded modules hold the process group: drop them first, as a returning trainer does
    D.shutdown()


def test_fsdp_two_ranks_equal_one_process_save_and_reload(tmp_path):
    from safetensors.torch import load_file

    _spawn(_fsdp_worker, str(tmp_path))
    ref = _Tiny()
    x, y = _batch()
    _train(ref, x, y)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    meta = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert meta[0] == {"units": 4, "sd_keys": 10} and meta[1] == {"units": 4, "sd_keys": 0}  # 3 blocks + root
    for k, v in ref.state_dict().items():
        assert torch.allclose(r0[f"sd.{k}"], v, rtol=0, atol=1e-6), k
    with torch.no_grad():
        expect = ref(x)
    for rank in range(2):
        assert torch.allclose(load_file(str(tmp_path / f"rank{rank}.safetensors"))["out"], expect, atol=1e-12)


def test_fsdp_needs_torchrun_and_finds_gpt2_blocks():
    with pytest.raises(UserError, match="--fsdp needs several processes"):
        D.fsdp_shard(_Tiny(), torch.device("cpu"))
    tiny = _Tiny()
    assert [id(b) for b in D.transformer_blocks(tiny)] == [id(b) for b in tiny.blocks]
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=32,
                                                                n_positions=16))
    blocks = D.transformer_blocks(gpt2)
    assert len(blocks) == 3 and all(b is h for b, h in zip(blocks, gpt2.transformer.h))
    assert D.transformer_blocks(torch.nn.Linear(2, 2)) == []
    plain = _Tiny()
    assert D.full_state_dict(plain).keys() == plain.state_dict().keys()
    other = _Tiny(seed=3)
    D.load_full_state_dict(other, D.full_state_dict(plain))
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), plain.parameters()))


# ---------------------------------------------------------------------------------------------- failure

RAISE_SCRIPT = """
import os, sys, time, torch
from proxrl import distributed as D
from proxrl.errors import UserError
mode = sys.argv[1]

def job():
    info = D.init_distributed()
    if mode == "rank1_raises":
        if info.rank == 1:
            time.sleep(0.5)
            raise ValueError("boom at step 3")
        D.all_reduce_sum(torch.ones(1))  # rank 0 waits for a peer that never comes
    elif mode == "all_bad_input":
        raise UserError("rollout_size 7 cannot be split over 2 processes")
    elif mode == "sys_exit":
        if info.rank == 0:
            sys.exit("stop: config broken")
        D.all_reduce_sum(torch.ones(1))
    elif mode == "rank1_killed":
        if info.rank == 1:
            os._exit(9)
        D.all_reduce_sum(torch.ones(1))
    elif mode == "rank1_hangs":
        if info.rank == 1:
            time.sleep(600)
        D.all_reduce_sum(torch.ones(1))
    print(f"rank {info.rank} passed", flush=True)

D.run_main(job)
"""


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "job.py"
    p.write_text(textwrap.dedent(RAISE_SCRIPT))
    return p


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env.update({"OMP_NUM_THREADS": "1", "PROXRL_DIST_TIMEOUT": "10", **extra})
    return env


def _torchrun(tmp_path: Path, mode: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(_script(tmp_path)), mode]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    return res, time.monotonic() - t0


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: rank")]


def test_a_raising_rank_ends_the_torchrun_job_with_one_line(tmp_path):
    res, secs = _torchrun(tmp_path, "rank1_raises")
    assert res.returncode != 0
    assert _error_lines(res.stderr) == ["error: rank 1: ValueError: boom at step 3"], res.stderr[-3000:]
    assert "passed" not in res.stdout
    assert secs < 30  # torchrun tears rank 0 down well before the 10 s collective timeout would


def test_bad_input_on_every_rank_is_reported_once_by_rank_0(tmp_path):
    res, _ = _torchrun(tmp_path, "all_bad_input")
    assert res.returncode != 0
    assert _error_lines(res.stderr) == ["error: rank 0: rollout_size 7 cannot be split over 2 processes"], \
        res.stderr[-3000:]


def test_sys_exit_with_text_is_reported_as_the_cause(tmp_path):
    res, _ = _torchrun(tmp_path, "sys_exit")
    assert res.returncode != 0
    assert _error_lines(res.stderr) == ["error: rank 0: stop: config broken"], res.stderr[-3000:]


def test_a_killed_rank_ends_the_torchrun_job(tmp_path):
    res, secs = _torchrun(tmp_path, "rank1_killed")
    assert res.returncode != 0 and "passed" not in res.stdout
    assert "exitcode  : 9" in res.stderr  # torchrun's summary names the killed rank's exit
    assert len(_error_lines(res.stderr)) <= 1  # rank 0, left alone in its collective, reports at most once
    assert secs < 30


def _plain_pair(tmp_path: Path, mode: str, timeout_env: str) -> list[subprocess.Popen]:
    """Two ranks started by hand, no torchrun agent: only the process-group timeout can end a hang."""
    script, port = _script(tmp_path), _free_port()
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PROXRL_DIST_TIMEOUT=timeout_env)
        procs.append(subprocess.Popen([sys.executable, str(script), mode], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def test_a_killed_peer_ends_the_waiting_rank_without_torchrun(tmp_path):
    procs = _plain_pair(tmp_path, "rank1_killed", "10")
    try:
        t0 = time.monotonic()
        _, err0 = procs[0].communicate(timeout=40)
        secs = time.monotonic() - t0
        assert procs[1].wait(timeout=10) == 9
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1
    lines = _error_lines(err0)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: lost contact with another rank (killed, "), \
        err0[-2000:]
    assert secs < 25


def test_a_hung_peer_ends_the_waiting_rank_after_the_timeout(tmp_path):
    procs = _plain_pair(tmp_path, "rank1_hangs", "3")
    try:
        t0 = time.monotonic()
        _, err0 = procs[0].communicate(timeout=40)
        secs = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    lines = _error_lines(err0)
    assert len(lines) == 1, err0[-2000:]
    assert lines[0].startswith("error: rank 0: lost contact with another rank (killed, crashed, or stuck for over "
                               "PROXRL_DIST_TIMEOUT=3 s; the launcher's summary names it): ")
    assert "Timed out" in lines[0] and ".cc:" not in lines[0]
    assert 3 <= secs < 25


def test_one_process_run_main_lets_exceptions_through():
    assert D.run_main(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="plain"):
        D.run_main(lambda: (_ for _ in ()).throw(ValueError("plain")))
    with pytest.raises(UserError):
        with D.fail_fast():
            raise UserError("x")


# ---------------------------------------------------------------------------------------------- one process

def test_one_process_needs_no_process_group():
    info = D.init_distributed()
    assert info == D.DistInfo(rank=0, world_size=1, local_rank=0, is_main=True) and not info.distributed
    assert not torch.distributed.is_initialized()
    assert D.is_main() and not D.is_distributed()
    x = torch.tensor([[1.0, 2.0, 4.0]])
    m = torch.tensor([[1, 1, 0]])
    assert D.masked_mean(x, m).item() == 1.5 and D.masked_var(x, m).item() == 0.5
    assert torch.equal(D.global_normalize(x, m), core_normalize(x, m))
    assert D.all_ranks_agree_stop(True) and not D.all_ranks_agree_stop(False)
    assert D.broadcast_object([1, "a"]) == [1, "a"]
    g = np.array([1.0, 2.0])
    assert D.all_reduce_mean_(g) is g and g.tolist() == [1.0, 2.0]
    assert D.all_reduce_mean_(g, weight=3.0) is g and g.tolist() == [1.0, 2.0]
    assert D.all_gather_cat(x) is x and torch.equal(D.all_reduce_max(x), x)
    assert D.mean_over_ranks({"a": 2.0}) == {"a": 2.0}
    D.barrier()
    D.shutdown()


def test_torchrun_with_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert D.init_distributed().world_size == 1 and not torch.distributed.is_initialized()


def test_collectives_refuse_to_run_unjoined_under_a_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="init_distributed"):
        D.all_reduce_sum(torch.ones(1))


@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK=5 is outside"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
      "PROXRL_DIST_TIMEOUT": "-3"}, "PROXRL_DIST_TIMEOUT='-3' must be a positive number"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
      "PROXRL_DIST_TIMEOUT": "nan"}, "must be a positive number"),
])
def test_bad_launch_environment_is_one_line(monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=match) as e:
        D.init_distributed()
    assert "\n" not in str(e.value)


def test_single_node(monkeypatch):
    assert D.single_node()  # one process
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not D.single_node()  # LOCAL_WORLD_SIZE unknown: maybe several machines
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not D.single_node()  # 2 machines x 2 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert D.single_node()


def test_require_distributed():
    with pytest.raises(UserError, match="--fsdp needs several processes: launch with `torchrun"):
        D.require_distributed("--fsdp")


# ---------------------------------------------------------------------------------------------- work split

def test_shard_indices_keep_groups_whole():
    assert [D.shard_indices(8, r, 2) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    assert [D.shard_indices(12, r, 3, group_size=2) for r in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert D.shard_indices(5, 0, 1) == slice(0, 5)
    items = list(range(12))
    shards = [items[D.shard_indices(12, r, 2, group_size=3)] for r in range(2)]
    assert shards == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]  # groups {0,1,2},{3,4,5} | {6,7,8},{9,10,11}


@pytest.mark.parametrize("args, match", [
    ((6, 0, 4), "rollout of 6 samples cannot be split evenly over 4 processes; make it a multiple of 4 or run "
                "1/2/3/6 processes"),
    ((12, 0, 4, 2), "rollout of 6 groups of 2 cannot be split evenly over 4 processes"),
    ((9, 0, 1, 2), "rollout of 9 samples is not a whole number of groups of 2"),
])
def test_shard_indices_refuse_uneven_splits(args, match):
    with pytest.raises(UserError, match=match):
        D.shard_indices(*args)


def test_shard_indices_programming_errors():
    with pytest.raises(ValueError):
        D.shard_indices(8, 2, 2)
    with pytest.raises(ValueError):
        D.shard_indices(0, 0, 1)


def test_per_rank_seed():
    assert D.per_rank_seed(42, 0) == 42
    seeds = {D.per_rank_seed(42, r) for r in range(1, 8)} | {42, D.per_rank_seed(43, 1)}
    assert len(seeds) == 9 and all(0 <= s < 2**31 for s in seeds)
    assert D.per_rank_seed(42, 3) == D.per_rank_seed(42, 3)


# ---------------------------------------------------------------------------------------------- devices

def test_resolve_device_on_this_machine():
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device(" CPU ") == torch.device("cpu")
    expect = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert D.resolve_device("auto") == expect


@pytest.mark.parametrize("spec, match", [
    ("gpu", "device 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:", None), ("cuda:x", None), ("cpu:0", "is not a device"), ("", "is not a device"),
])
def test_resolve_device_garbage(spec, match):
    with pytest.raises(UserError, match=match) as e:
        D.resolve_device(spec)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_resolve_device_cuda_without_cuda(spec):
    with pytest.raises(UserError, match=r"CUDA is not available .*use --device cpu or auto"):
        D.resolve_device(spec)


def test_resolve_device_mps_unavailable(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="MPS .* is not available"):
        D.resolve_device("mps")


def test_resolve_device_indices_and_local_rank(monkeypatch):
    """torch's CUDA queries faked to report 2 GPUs (nothing is placed on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert D.resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"device 'cuda:2': this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        D.resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert D.resolve_device("auto") == torch.device("cuda", 1)
    assert D.resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="would put them all on one GPU; use --device cuda"):
        D.resolve_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError, match="LOCAL_RANK=2 but only 2 CUDA device"):
        D.resolve_device("auto")


def test_autocast_and_configure_on_cpu():
    cpu = torch.device("cpu")
    D.configure_device(cpu)  # no-op
    a = torch.randn(4, 4)
    with D.autocast(cpu, bf16=True):
        assert (a @ a).dtype == torch.bfloat16
    with D.autocast(cpu, bf16=False):
        assert (a @ a).dtype == torch.float32
    with D.autocast(torch.device("meta"), bf16=True):  # neither CUDA nor CPU: no autocast
        assert (a @ a).dtype == torch.float32



@pytest.mark.parametrize("native", [False, True])
def test_bf16_refused_only_on_a_cpu_without_native_bfloat16(monkeypatch, native):
    # torch's own probe (oneDNN: AVX512-BF16 or AMX) decides; without it bf16 autocast is emulated, ~10-20x slower
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    assert D.native_bf16(cpu) is native
    assert D.native_bf16(torch.device("cuda", 0)) and not D.native_bf16(torch.device("meta"))
    if native:
        D.require_native_bf16(cpu)
    else:
        with pytest.raises(UserError, match=r"^--bf16 true: this CPU has no native bfloat16 .*use --bf16 false"):
            D.require_native_bf16(cpu)
    D.require_native_bf16(torch.device("cuda", 0))  # CUDA computes bf16 natively
    D.require_native_bf16(torch.device("meta"))  # no autocast there (D.autocast): nothing to refuse


# ---------------------------------------------------------------------------------------------- CUDA (lent GPUs)

@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_autocast_and_tf32(bf16):
    dev = D.resolve_device("auto")
    assert dev == torch.device("cuda", 0)
    D.configure_device(dev)
    assert torch.get_float32_matmul_precision() == "high"
    a = torch.randn(64, 64, device=dev)
    with D.autocast(dev, bf16):
        assert (a @ a).dtype == (torch.bfloat16 if bf16 else torch.float32)
    x = torch.randn(8, 5, device=dev, dtype=torch.float64)
    m = torch.rand(8, 5, device=dev) > 0.5
    assert torch.allclose(D.masked_mean(x, m), core_mean(x, m)) and D.masked_mean(x, m).device == dev
    assert torch.allclose(D.global_normalize(x, m), core_normalize(x, m))


def _nccl_worker(rank: int, port: int, out_dir: str) -> None:
    _set_rank_env(rank, 2, port)
    dev = D.resolve_device("cuda")
    D.init_distributed(dev)
    d = {k: v[_rows(rank)].to(dev) for k, v in _data().items()}
    res = {"mean": D.masked_mean(d["x"], d["mask"]).item(), "var": D.masked_var(d["x"], d["mask"]).item(),
           "stop": D.all_ranks_agree_stop(rank == 0), "device": str(D.masked_mean(d["x"], d["mask"]).device)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    D.shutdown()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_two_gpus_global_statistics(tmp_path):
    _spawn(_nccl_worker, str(tmp_path))
    d = _data()
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["mean"] == pytest.approx(core_mean(d["x"], d["mask"]).item(), rel=1e-12)
        assert r["var"] == pytest.approx(core_var(d["x"], d["mask"]).item(), rel=1e-12)
        assert r["stop"] and r["device"] == f"cuda:{rank}"
