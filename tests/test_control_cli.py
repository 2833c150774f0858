"""`proxrl train/eval` on bad input and on resume: one line and the right exit status, nothing rewritten or lost.

Each test names the defect it guards (issue 10's numbering where it has one).
"""
from __future__ import annotations

import re
import sys

import pytest
import yaml
from conftest import importable_module

from proxrl.cli import main
from proxrl.runs import list_checkpoints, load_checkpoint, read_metrics, save_checkpoint

QUICK = ["--total-steps", "512", "--eval-every", "0", "--eval-episodes", "2", "--no-progress", "--tensorboard", "false"]


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles, exit_code=2):
    assert code == exit_code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def cartpole_run(tmp_path, capsys):
    """A finished 512-step CartPole run with checkpoints at 256 and 512."""
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "CartPole-v1", "--run-dir", run, "--checkpoint-every", "256", *QUICK)
    assert code == 0, err
    return run


def _files(run):
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------ eval seed
def test_eval_reproduces_the_logged_final_evaluation_by_default(tmp_path, capsys):
    """Issue 6: `proxrl eval`'s default seed was 12345, not the run's evaluation seed."""
    run = tmp_path / "pd"
    code, _, err = run_cli(capsys, "train", "Pendulum-v1", "--run-dir", run, "--total-steps", "1024",
                           "--eval-every", "0", "--eval-episodes", "3", "--no-progress", "--tensorboard", "false")
    assert code == 0, err
    logged = read_metrics(run)[-1]["eval_return_mean"]
    code, out, err = run_cli(capsys, "eval", run)
    assert code == 0, err
    assert f"mean return {logged:.2f} " in out and "over 3 greedy episodes" in out, (logged, out)
    code, out, _ = run_cli(capsys, "eval", run, "--seed", "12345")
    assert code == 0 and f"mean return {logged:.2f} " not in out  # another seed, other episodes
    code, out, _ = run_cli(capsys, "eval", run, "--sampled")
    assert code == 0 and "over 3 sampled episodes" in out and f"mean return {logged:.2f} " not in out
    code, again, _ = run_cli(capsys, "eval", run, "--sampled")
    assert again == out  # sampled, but from a seeded generator


# ------------------------------------------------------------------------------------------------ item 4: seeds
@pytest.mark.parametrize("argv, needle", [
    (["train", "CartPole-v1", "--seed", "-1"], "seed=-1"),
    (["train", "CartPole-v1", "--seed", str(2**63)], f"seed={2**63}"),
    (["train", "CartPole-v1", "--value-coef", "inf"], "--value-coef"),
    (["train", "CartPole-v1", "--entropy-coef", "inf"], "--entropy-coef"),
    (["train", "Pendulum-v1", "--init-log-std", "nan"], "--init-log-std"),
    (["train", "CartPole-v1", "--max-grad-norm", "0"], "use none"),
])
def test_bad_numbers_are_one_line_errors(capsys, tmp_path, argv, needle):
    code, _, err = run_cli(capsys, *argv, "--run-dir", tmp_path / "r")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "r").exists()


def test_eval_negative_seed_is_one_line(capsys, cartpole_run):
    code, _, err = run_cli(capsys, "eval", cartpole_run, "--seed", "-5")
    assert_one_line_error(code, err, "seed=-5")


def test_renamed_option_in_a_config_file_names_the_new_one(capsys, tmp_path):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("norm_adv: false\n")
    code, _, err = run_cli(capsys, "train", "CartPole-v1", "--config", cfg, "--run-dir", tmp_path / "r")
    assert_one_line_error(code, err, "'norm_adv' was renamed to 'normalize_advantages'")


# ------------------------------------------------------------------------------------------------ items 7 and 8: resume
def test_resume_rejects_a_learning_change_and_leaves_config_alone(capsys, cartpole_run):
    before = _files(cartpole_run)
    code, _, err = run_cli(capsys, "train", "--resume", cartpole_run, "--learning-rate", "5", "--no-progress")
    assert_one_line_error(code, err, "--learning-rate", "--total-steps")
    assert _files(cartpole_run) == before


def test_resume_refuses_a_total_below_the_steps_done_and_keeps_config(capsys, cartpole_run):
    before = _files(cartpole_run)
    code, _, err = run_cli(capsys, "train", "--resume", cartpole_run, "--total-steps", "256", "--no-progress")
    assert_one_line_error(code, err, "total_steps=256", "512")
    assert _files(cartpole_run) == before  # config.yaml not rewritten by the failed resume


def test_resume_applies_the_options_it_may_change(capsys, cartpole_run):
    code, _, err = run_cli(capsys, "train", "--resume", cartpole_run, "--total-steps", "1024", "--eval-episodes", "3",
                           "--keep-checkpoints", "1", "--no-progress")
    assert code == 0, err
    saved = yaml.safe_load((cartpole_run / "config.yaml").read_text())
    assert (saved["total_steps"], saved["eval_episodes"], saved["keep_checkpoints"]) == (1024, 3, 1)
    assert [p.name for p in list_checkpoints(cartpole_run)] == ["step_000001024"]
    assert read_metrics(cartpole_run)[-1]["global_step"] == 1024


# ------------------------------------------------------------------------------------------------ item 4: checkpoints
def _rewrite_latest(run, drop_state=(), drop_tensors=(), state=None):
    ckpt = list_checkpoints(run)[-1]
    tensors, saved = load_checkpoint(ckpt)
    saved = dict(saved) if state is None else state
    for k in drop_state:
        del saved[k]
    for k in drop_tensors:
        del tensors[k]
    save_checkpoint(ckpt, tensors, saved)  # with fresh checksums: the content is wrong, not the bytes
    return ckpt


@pytest.mark.parametrize("change, needles", [
    ({"state": {}}, ["state.json lacks 'global_step'"]),
    ({"drop_state": ["optim_steps"]}, ["state.json lacks 'optim_steps'"]),
    ({"drop_tensors": ["optim.exp_avg"]}, ["lacks tensor 'optim.exp_avg'"]),
    ({"drop_tensors": ["policy.actor.2.bias"]}, ["lacks tensor 'policy.actor.2.bias'"]),
])
def test_resume_from_an_incomplete_checkpoint_is_one_line(capsys, cartpole_run, change, needles):
    ckpt = _rewrite_latest(cartpole_run, **change)
    config_before = (cartpole_run / "config.yaml").read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", cartpole_run, "--total-steps", "1024", "--no-progress")
    assert_one_line_error(code, err, str(ckpt), *needles)
    assert (cartpole_run / "config.yaml").read_bytes() == config_before


def test_eval_of_a_checkpoint_missing_a_policy_tensor_is_one_line(capsys, cartpole_run):
    ckpt = _rewrite_latest(cartpole_run, drop_tensors=["policy.critic.0.weight"])
    code, _, err = run_cli(capsys, "eval", cartpole_run)
    assert_one_line_error(code, err, str(ckpt), "policy.critic.0.weight")


def test_changed_hidden_sizes_in_config_yaml_is_one_line(capsys, cartpole_run):
    path = cartpole_run / "config.yaml"
    path.write_text(path.read_text().replace("hidden_sizes: 64,64", "hidden_sizes: '32'"))
    edited = path.read_bytes()
    code, _, err = run_cli(capsys, "train", "--resume", cartpole_run, "--total-steps", "1024", "--no-progress")
    assert_one_line_error(code, err, "hidden_sizes='32'", "'64,64'")
    assert path.read_bytes() == edited


def test_eval_on_an_lm_run_is_one_line(capsys, tmp_path):
    run = tmp_path / "sft"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: gpt2\ndata: train.jsonl\n")
    import torch

    save_checkpoint(run / "checkpoints" / "step_000000010", {"w": torch.zeros(2)}, {"step": 10})
    code, _, err = run_cli(capsys, "eval", run)
    assert_one_line_error(code, err, "not a control run")


# ------------------------------------------------------------------------------------------------ user envs
ENV_MODULE = '''
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class Env(gym.Env):
    """obs [t / 100, 1, 0]; after `nan_after` steps of this process the observations are NaN; `step` raises
    at step `raise_at`."""
    observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = spaces.Discrete(2)
    total = 0

    def __init__(self, nan_after=None, raise_at=None):
        self.nan_after, self.raise_at, self.t = nan_after, raise_at, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0, 1, 0], np.float32), {}

    def step(self, action):
        Env.total += 1
        self.t += 1
        if self.raise_at is not None and Env.total >= self.raise_at:
            raise RuntimeError("the simulator lost its state")
        obs = np.array([self.t / 100, 1, 0], np.float32)
        if self.nan_after is not None and Env.total > self.nan_after:
            obs[1] = np.nan
        return obs, 1.0, self.t >= 50, False, {}


def nan_env():
    return Env(nan_after=150)


def raising_env():
    return Env(raise_at=40)
'''


@pytest.fixture
def user_envs(tmp_path):
    with importable_module(tmp_path, "user_envs", ENV_MODULE) as name:
        yield name


def test_nan_observation_stops_with_one_line_and_keeps_the_last_good_checkpoint(capsys, tmp_path, user_envs):
    """Issue 10 item 2: an env returning NaN observations trained to NaN; now the first one stops the run."""
    run = tmp_path / "nan"
    code, _, err = run_cli(capsys, "train", f"{user_envs}:nan_env", "--run-dir", run, "--num-envs", "1",
                           "--rollout-steps", "64", "--num-minibatches", "2", "--checkpoint-every", "64",
                           "--total-steps", "640", "--eval-every", "0", "--no-progress", "--tensorboard", "false")
    # the 151st call of step() returns the first NaN; with the two NEXT_STEP reset steps (after each 50-step
    # episode, no step() call) that is env step 153, in update 3 (env steps 129..192)
    assert_one_line_error(code, err, "non-finite observation", "update 3", "env step 153", "step_000000128")
    assert [p.name for p in list_checkpoints(run)] == ["step_000000064", "step_000000128"]
    assert [r["global_step"] for r in read_metrics(run)] == [64, 128]  # nothing logged for the bad update
    tensors, _ = load_checkpoint(list_checkpoints(run)[-1])
    assert all(bool(t.isfinite().all()) for k, t in tensors.items() if t.is_floating_point())


def test_env_step_that_raises_is_one_line_exit_1(capsys, tmp_path, user_envs):
    code, _, err = run_cli(capsys, "train", f"{user_envs}:raising_env", "--run-dir", tmp_path / "r", "--num-envs", "1",
                           *QUICK)
    assert_one_line_error(code, err, f"env '{user_envs}:raising_env' raised in step()", "RuntimeError",
                          "the simulator lost its state", exit_code=1)


# ------------------------------------------------------------------------------------------------ item 10
def test_train_keeps_only_keep_checkpoints(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "CartPole-v1", "--run-dir", run, "--checkpoint-every", "256",
                           "--total-steps", "1024", "--eval-every", "0", "--eval-episodes", "1", "--no-progress",
                           "--tensorboard", "false")
    assert code == 0, err
    assert [p.name for p in list_checkpoints(run)] == ["step_000000768", "step_000001024"]  # default 2
    code, _, err = run_cli(capsys, "train", "CartPole-v1", "--run-dir", tmp_path / "three", "--checkpoint-every", "256",
                           "--keep-checkpoints", "3", "--total-steps", "1024", "--eval-every", "0", "--eval-episodes",
                           "1", "--no-progress", "--tensorboard", "false")
    assert code == 0, err
    assert len(list_checkpoints(tmp_path / "three")) == 3


def test_resume_help_names_exactly_the_resumable_options(capsys):
    from proxrl.control import ControlConfig

    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    text = " ".join(out.split())
    resume = text[text.index("--resume RUN_DIR continue"):text.index("--no-preset ignore")]
    resume = re.sub(r"(\w-) (\w)", r"\1\2", resume)  # undo argparse's line wrap inside a flag
    for name in ControlConfig.resumable_fields:
        assert "--" + name.replace("_", "-") in resume, name
    assert "--learning-rate" not in resume


# ------------------------------------------------------------------------------------------------ items 3 and 9 (runs/)
def test_resume_names_a_corrupt_newest_checkpoint_and_the_previous_good_one(capsys, cartpole_run):
    weights = list_checkpoints(cartpole_run)[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte inside a tensor: only the checksum sees it
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "train", "--resume", cartpole_run, "--total-steps", "1024", "--no-progress")
    assert_one_line_error(code, err, "step_000000512", "previous good one is step_000000256")


def test_a_second_process_on_a_running_run_gets_one_line(capsys, cartpole_run):
    import subprocess

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from proxrl.runs import RunDir; RunDir(sys.argv[1]).lock().acquire(); "
                               "print('held', flush=True); time.sleep(60)", str(cartpole_run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(capsys, "train", "--resume", cartpole_run, "--total-steps", "1024", "--no-progress")
        assert_one_line_error(code, err, str(holder.pid))
    finally:
        holder.kill()
        holder.wait()
    assert read_metrics(cartpole_run)[-1]["global_step"] == 512  # nothing written by the refused run


def test_bf16_cnn_on_a_cpu_without_native_bfloat16_is_one_line(capsys, tmp_path, monkeypatch):
    """bf16 autocast emulated on an AVX2-only CPU made the Nature CNN's forward+backward ~12x slower, silently."""
    pytest.importorskip("ale_py")
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "ALE/Breakout-v5", "--bf16", "true", "--device", "cpu", "--num-envs", "1",
                           "--vector-mode", "sync", "--run-dir", run, *QUICK)
    assert_one_line_error(code, err, "--bf16 true", "no native bfloat16", "use --bf16 false")
    assert list_checkpoints(run) == [] and not (run / "metrics.jsonl").exists()  # (the directory is reused on a rerun)
