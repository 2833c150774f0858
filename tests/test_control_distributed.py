"""`proxrl train` under torchrun (issue 7): 2 gloo processes on the CPU compute what 1 process computes, a run
resumes with another number of processes, and a rank that raises or is killed ends the job with one line.

The end-to-end tests launch the real CLI: ``torchrun --standalone --nproc_per_node 2 -m proxrl.cli train ...``;
two unit tests check which minibatches the processes split (proxrl.control.ppo._shared_minibatch_step).
Tolerance: each process acts on its envs with a smaller batch, and a large minibatch is split over the processes
with its weighted gradient all-reduced, so the sums run in another order than in one process; after the few
hundred Adam steps here every tensor agrees to 1e-4 relative + 1e-5 absolute (measured: largest weight gap
6e-8 on Pendulum, 3e-8 on the split CartPole run).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from proxrl.control import PRESETS, ControlConfig
from proxrl.control.cnn import CNNActorCritic
from proxrl.control.distributions import action_dist_for
from proxrl.control.flat_params import flatten_parameters
from proxrl.control.policy import ActorCritic
from proxrl.control.ppo import TorchPPOGradient, _shared_minibatch_step
from proxrl.core import normalize
from proxrl.runs import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_metrics,
)

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-5
# Pendulum: obs and reward normalisers (synchronised every step), Box actions, 4 envs x 64 steps, 4 minibatches
PENDULUM = ["Pendulum-v1", "--total-steps", "768", "--num-envs", "4", "--rollout-steps", "64", "--num-minibatches", "4",
            "--epochs", "2", "--vector-mode", "sync", "--eval-episodes", "1", "--eval-every", "0",
            "--checkpoint-every", "256", "--keep-checkpoints", "5", "--no-progress", "--tensorboard", "false",
            "--threads", "1"]
# CartPole (sync envs, so 1 and 2 processes step the same episodes) with 256x256 MLPs and 2 minibatches of ~128:
# 128 x 135k parameters is above _shared_minibatch_step's min_split_work, so the processes split each minibatch
BIG_CARTPOLE = ["CartPole-v1", "--total-steps", "768", "--num-envs", "4", "--rollout-steps", "64",
                "--num-minibatches", "2", "--epochs", "2", "--hidden-sizes", "256,256", "--vector-mode", "sync",
                "--eval-episodes", "1", "--eval-every", "0", "--no-progress", "--tensorboard", "false",
                "--threads", "1"]


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PROXRL_DIST_TIMEOUT="30")
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _proxrl(n: int, *args, extra_path: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    if n == 1:
        cmd = [sys.executable, "-m", "proxrl.cli", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "proxrl.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(extra_path), cwd=ROOT, timeout=timeout)


def _final(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(latest_checkpoint(run))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")


def test_two_processes_compute_what_one_computes(tmp_path):
    one = _proxrl(1, "train", *PENDULUM, "--run-dir", tmp_path / "n1")
    assert one.returncode == 0, one.stderr
    two = _proxrl(2, "train", *PENDULUM, "--run-dir", tmp_path / "n2")
    assert two.returncode == 0, two.stderr
    assert "device=cpu x 2 processes" in two.stdout and two.stdout.count("run directory:") == 1  # rank 0 reports
    _assert_close(_final(tmp_path / "n1"), _final(tmp_path / "n2"))
    rows1, rows2 = read_metrics(tmp_path / "n1"), read_metrics(tmp_path / "n2")
    assert [r["global_step"] for r in rows1] == [r["global_step"] for r in rows2] == [256, 512, 768]
    for r1, r2 in zip(rows1, rows2):  # the logged metrics are the job's, not rank 0's share
        for k in ("value_loss", "approx_kl", "explained_variance", "eval_return_mean"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-3, abs=1e-6), k
        assert r2["batch_transitions"] == r1["batch_transitions"] and r2["steps_per_second"] > 0
    saved = (tmp_path / "n2" / "config.yaml").read_text()
    assert "processes: 2" in saved and "device: cpu" in saved
    assert not list(tmp_path.glob("n2/**/*rank*"))  # nothing written by rank 1


def test_split_minibatches_and_gathered_episodes_equal_one_process(tmp_path):
    """Large minibatches, split over the processes with one all-reduce each, give one process's weights; the
    logged episode statistics are the job's (gather_rollout gathers every process's episodes)."""
    one = _proxrl(1, "train", *BIG_CARTPOLE, "--run-dir", tmp_path / "n1")
    assert one.returncode == 0, one.stderr
    two = _proxrl(2, "train", *BIG_CARTPOLE, "--run-dir", tmp_path / "n2")
    assert two.returncode == 0, two.stderr
    _assert_close(_final(tmp_path / "n1"), _final(tmp_path / "n2"))
    rows1, rows2 = read_metrics(tmp_path / "n1"), read_metrics(tmp_path / "n2")
    assert [r["global_step"] for r in rows1] == [r["global_step"] for r in rows2] == [256, 512, 768]
    assert sum(r["episodes"] for r in rows1) > 10
    for r1, r2 in zip(rows1, rows2):
        assert r2["episodes"] == r1["episodes"]
        assert r2["episodic_length"] == pytest.approx(r1["episodic_length"], nan_ok=True)
        for k in ("episodic_return", "value_loss", "approx_kl", "explained_variance"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-3, abs=1e-6, nan_ok=True), k


def _minibatch(policy: torch.nn.Module, m: int, obs_shape: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    obs = (torch.randint(0, 256, (m, *obs_shape), generator=g, dtype=torch.uint8) if len(obs_shape) > 1
           else torch.randn(m, *obs_shape, generator=g))
    actions = torch.randint(0, 2, (m,), generator=g)
    with torch.no_grad():
        logp, _, values = policy.evaluate(obs, actions, False)
    return [obs, actions, logp + 0.2 * torch.randn(m, generator=g), values + 0.2 * torch.randn(m, generator=g),
            torch.randn(m, generator=g) * 3 + 1, values + torch.randn(m, generator=g)]


def test_small_minibatches_are_computed_whole_large_ones_split(monkeypatch):
    """_shared_minibatch_step without a process group (its all-reduce is then a no-op), as rank 1 of 2: below
    min_split_work it computes the whole minibatch (bit-exact one-process gradient and loss terms, no collective
    needed); from it on, only rank 1's half, with advantages normalised over the whole minibatch first. Processes
    on several machines split small minibatches too."""
    torch.manual_seed(0)
    policy = ActorCritic(4, 2, True, (64, 64), "tanh")
    flat = flatten_parameters(policy)
    cfg = ControlConfig(**PRESETS["CartPole-v1"])
    m, p = 256, flat.numel()
    batch = _minibatch(policy, m, (4,))
    whole_stats = TorchPPOGradient(policy, flat, cfg, 0.2)(*batch)  # normalises the advantages itself
    whole_grad = flat.grad.clone()
    shared = TorchPPOGradient(policy, flat, cfg, 0.2, normalize_advantages=False)

    stats = _shared_minibatch_step(shared, batch, slice(None), flat.grad, 2, 1, True, min_split_work=m * p + 1)
    assert torch.equal(flat.grad, whole_grad) and np.array_equal(stats, whole_stats)

    half = [t[m // 2:] for t in batch]
    half[4] = normalize(batch[4])[m // 2:]
    half_stats = shared(*half)
    half_grad = flat.grad.clone()
    stats = _shared_minibatch_step(shared, batch, slice(None), flat.grad, 2, 1, True, min_split_work=m * p)
    torch.testing.assert_close(flat.grad, half_grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats, half_stats, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(half_grad, whole_grad, rtol=1e-2, atol=1e-4)

    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, but no process group: a collective raises
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one machine: the small minibatch is computed whole
    _shared_minibatch_step(shared, batch, slice(None), flat.grad, 2, 1, True)
    assert torch.equal(flat.grad, whole_grad)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two machines: split, so it reaches for the all-reduce
    with pytest.raises(RuntimeError, match="not initialised"):
        _shared_minibatch_step(shared, batch, slice(None), flat.grad, 2, 1, True)


def test_a_split_minibatch_gathers_only_this_process_share_of_the_indices():
    """With minibatch indices (not the whole batch), rank 1 of 2 computes exactly the second half of
    ``batch[idx]``, advantages normalised over all of ``batch[4][idx]``."""
    torch.manual_seed(1)
    policy = ActorCritic(4, 2, True, (16,), "tanh")
    flat = flatten_parameters(policy)
    cfg = ControlConfig(**PRESETS["CartPole-v1"])
    batch = _minibatch(policy, 40, (4,))
    idx = torch.randperm(40)[:15]  # odd size: rank 1 gets 7 of 15
    shared = TorchPPOGradient(policy, flat, cfg, 0.2, normalize_advantages=False)
    expected = [t[idx][8:] for t in batch]
    expected[4] = normalize(batch[4][idx])[8:]
    want_stats = shared(*expected)
    want_grad = flat.grad.clone()
    stats = _shared_minibatch_step(shared, batch, idx, flat.grad, 2, 1, True, min_split_work=0)
    torch.testing.assert_close(flat.grad, want_grad, rtol=1e-6, atol=1e-7)  # (x * 7 / 7: one rounding)
    np.testing.assert_allclose(stats, want_stats, rtol=1e-6, atol=1e-7)


def test_the_split_threshold_keeps_mlp_presets_whole_and_splits_atari():
    """The default min_split_work: CartPole's 256-transition minibatch through its 64x64 MLPs (~2.3e6) stays
    whole; Breakout's 256 frames through the Nature CNN (~4.3e8) are split."""
    import inspect

    default = inspect.signature(_shared_minibatch_step).parameters["min_split_work"].default
    mlp = flatten_parameters(ActorCritic(4, 2, True, (64, 64), "tanh")).numel()
    cnn = flatten_parameters(CNNActorCritic((4, 84, 84), action_dist_for(gym.spaces.Discrete(4)))).numel()
    assert 256 * mlp < default <= 256 * cnn


def test_resume_with_another_number_of_processes(tmp_path):
    """Saved with 2 processes, resumed with 1, and saved with 1, resumed with 2: the uninterrupted run's weights."""
    for saved_n, resumed_n in ((2, 1), (1, 2)):
        full, cut = tmp_path / f"full{saved_n}", tmp_path / f"cut{saved_n}to{resumed_n}"
        r = _proxrl(saved_n, "train", *PENDULUM, "--run-dir", full)
        assert r.returncode == 0, r.stderr
        shutil.copytree(full, cut)
        for extra in list_checkpoints(cut)[1:]:  # "crash" after the first checkpoint
            shutil.rmtree(extra)
        r = _proxrl(resumed_n, "train", "--resume", cut, "--no-progress")
        assert r.returncode == 0, r.stderr
        _assert_close(_final(full), _final(cut))
        assert [row["global_step"] for row in read_metrics(cut)] == [256, 512, 768]
        assert f"processes: {resumed_n}" in (cut / "config.yaml").read_text()


ENV_MODULE = '''
import os
import signal
import time

import gymnasium as gym
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class Env(gym.Env):
    """Rank 1's envs fail at their 40th step: they raise, or kill their process."""
    observation_space = spaces.Box(-1, 1, (3,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, how):
        self.how, self.t = how, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        if os.environ.get("RANK") == "0" and self.t == 40 and self.how == "kill_while_busy":
            time.sleep(90)  # busy in its own code, not in a collective, when rank 1 dies
        if os.environ.get("RANK") == "1" and self.t == 40:
            if self.how.startswith("kill"):
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("the simulator lost its state")
        return np.zeros(3, np.float32), 1.0, False, self.t % 50 == 0, {}


def raising():
    return Env("raise")


def killed():
    return Env("kill")


def killed_while_busy():
    return Env("kill_while_busy")
'''


@pytest.mark.parametrize("how", ["raising", "killed"])
def test_a_failing_rank_ends_the_job_with_one_line(tmp_path, how):
    (tmp_path / "rank_envs.py").write_text(ENV_MODULE)
    t0 = time.monotonic()
    r = _proxrl(2, "train", f"rank_envs:{how}", "--run-dir", tmp_path / "run", "--total-steps", "4096",
                "--num-envs", "2", "--rollout-steps", "32", "--eval-every", "0", "--no-progress",
                "--tensorboard", "false", extra_path=tmp_path, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: rank")]
    assert len(ours) == 1, r.stderr
    if how == "raising":
        assert ours[0].startswith("error: rank 1: env 'rank_envs:raising' raised in step(): RuntimeError"), ours
    else:  # rank 1 cannot speak; rank 0 loses it in a collective, or torchrun stops rank 0 first: it says so
        assert ours[0].startswith(("error: rank 0: lost contact with another rank",
                                   "error: rank 0: stopped by the launcher (SIGTERM)")), ours
    assert "Traceback" not in r.stderr.split(ours[0])[0]  # (torchrun's own summary after it has one)
    assert elapsed < 60, elapsed  # well within PROXRL_DIST_TIMEOUT + start-up


def test_a_rank_stopped_by_torchrun_says_why(tmp_path):
    """Rank 1 is killed while rank 0 is busy in its own code: torchrun stops rank 0 with SIGTERM, and rank 0's
    one line says so (instead of dying silently), then it ends by that signal."""
    (tmp_path / "rank_envs.py").write_text(ENV_MODULE)
    t0 = time.monotonic()
    r = _proxrl(2, "train", "rank_envs:killed_while_busy", "--run-dir", tmp_path / "run", "--total-steps", "4096",
                "--num-envs", "2", "--rollout-steps", "32", "--eval-every", "0", "--no-progress",
                "--tensorboard", "false", extra_path=tmp_path, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: rank")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0: stopped by the launcher (SIGTERM)"), r.stderr
    assert "Traceback" not in r.stderr.split(ours[0])[0]
    assert "exitcode  : -15" in r.stderr  # rank 0 still ends by the signal, as torchrun reports it
    assert elapsed < 60, elapsed  # not the 90 s rank 0 would have slept
