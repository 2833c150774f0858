"""The `proxrl` command line: --help explains options; bad input -> one line `error: ...`, exit 2, nothing lost."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxrl.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_train_help_lists_every_hyperparameter_with_default(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    for flag in ("--learning-rate", "--gamma", "--gae-lambda", "--clip-coef", "--value-coef", "--entropy-coef",
                 "--epochs", "--num-minibatches", "--num-envs", "--rollout-steps", "--target-kl",
                 "--max-grad-norm", "--total-steps", "--seed", "--config", "--resume"):
        assert flag in out, flag
    assert "(default: 0.99)" in out  # gamma's default is shown


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "CartPol-v1"], ["'CartPol-v1'", "did you mean 'CartPole-v1'"]),
        (["train", "CartPole-v1", "--learning-rate", "0"], ["learning_rate=0.0"]),
        (["train", "CartPole-v1", "--learning-rate", "-1e-3"], ["learning_rate=-0.001"]),
        (["train", "CartPole-v1", "--clip-coef", "0"], ["clip_coef=0.0"]),
        (["train", "CartPole-v1", "--gamma", "1.5"], ["gamma=1.5"]),
        (["train", "CartPole-v1", "--gamma", "0"], ["gamma=0.0"]),
        (["train", "CartPole-v1", "--gae-lambda", "1.2"], ["gae_lambda=1.2"]),
        (["train", "CartPole-v1", "--num-minibatches", "1000"], ["num_minibatches=1000"]),
        (["train", "CartPole-v1", "--epochs", "many"], ["'many'"]),
        (["eval", "no/such/run"], ["no/such/run"]),
        (["train", "--resume", "no/such/run"], ["no/such/run"]),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, needles):
    code, _, err = run_cli(capsys, *argv, *(["--run-dir", str(tmp_path / "r")] if argv[0] == "train" else []))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_unknown_config_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.001\nclip_cof: 0.1\n")
    code, _, err = run_cli(capsys, "train", "CartPole-v1", "--config", str(cfg), "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(code, err, "'clip_cof'", "clip_coef")


def test_unsupported_spaces(capsys, tmp_path):
    # a Text observation space (no policy reads text), via a factory 'module:function'
    mod = tmp_path / "weird_env.py"
    mod.write_text(
        "import gymnasium as gym\nfrom gymnasium import spaces\n"
        "class E(gym.Env):\n"
        "    observation_space = spaces.Text(8)\n"
        "    action_space = spaces.Discrete(2)\n"
        "    def reset(self, seed=None, options=None):\n        return 'ab', {}\n"
        "    def step(self, a):\n        return 'ab', 0.0, True, False, {}\n"
        "def make():\n    return E()\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        code, _, err = run_cli(capsys, "train", "weird_env:make", "--run-dir", str(tmp_path / "r"), "--no-progress")
    finally:
        sys.path.remove(str(tmp_path))
    assert_one_line_error(code, err, "Text")
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_existing_run_dir_is_not_overwritten_and_corrupt_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "CartPole-v1", "--run-dir", str(run), "--total-steps", "512",
                           "--eval-every", "0", "--eval-episodes", "1", "--no-progress", "--tensorboard", "false")
    assert code == 0, err
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # same run dir again: refused, nothing lost
    code, _, err = run_cli(capsys, "train", "CartPole-v1", "--run-dir", str(run), "--total-steps", "512", "--no-progress")
    assert_one_line_error(code, err, str(run))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # corrupt the weights: eval and resume name the file
    weights = sorted(run.glob("checkpoints/*/model.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli(capsys, "eval", str(run))
    assert_one_line_error(code, err, "model.safetensors")
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "--no-progress")
    assert_one_line_error(code, err, "model.safetensors")
    assert (run / "config.yaml").read_bytes() == before[run / "config.yaml"]


def test_real_process_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "proxrl.cli", "train", "CartPole-v1", "--gamma", "2",
                        "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gamma=2.0" in r.stderr, r.stderr


def test_debug_flag_and_env_show_the_traceback(capsys, monkeypatch, tmp_path):
    argv = ["train", "CartPole-v1", "--run-dir", str(tmp_path / "r"), "--gamma", "2"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "gamma=2")
    code, _, err = run_cli(capsys, *argv, "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: gamma=2")
    monkeypatch.setenv("PROXRL_DEBUG", "1")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" in err


def test_non_finite_float_flag_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "CartPole-v1", "--run-dir", str(tmp_path / "r"), "--value-coef", "inf")
    assert_one_line_error(code, err, "--value-coef", "finite", "'inf'")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["train", "eval", "plot", "sft", "reward-model", "ppo", "generate", "evaluate",
                                     "demo"])
def test_every_command_help_renders(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "--debug" in out and "usage: proxrl" in out


def test_help_does_not_import_torch():
    code = ("import sys; from proxrl.cli import build_parser; build_parser(['--help']).format_help(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("argv,extra_env,policy", [
    (["/venv/bin/proxrl", "train", "HalfCheetah-v5", "--threads", "2"], {}, None),  # OpenMP's default wait
    (["proxrl", "train", "HalfCheetah-v5", "--threads=4"], {}, None),
    (["proxrl", "train", "HalfCheetah-v5", "--threads", "1"], {}, "PASSIVE"),
    (["proxrl", "train", "HalfCheetah-v5"], {}, "PASSIVE"),
    (["proxrl", "train", "HalfCheetah-v5", "--threads"], {}, "PASSIVE"),  # argparse will name the missing value
    (["proxrl", "ppo", "--threads", "2"], {}, "PASSIVE"),  # the LM trainers keep passive threads
    (["script.py", "train", "--threads", "2"], {}, "PASSIVE"),  # not the proxrl command
    (["proxrl", "train", "CartPole-v1"], {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's own wins
    (["proxrl", "train", "CartPole-v1"], {"GOMP_SPINCOUNT": "1000"}, None),  # a tuned spin is left alone
])
def test_openmp_wait_policy_set_at_import(argv, extra_env, policy):
    """Importing proxrl sets OMP_WAIT_POLICY=PASSIVE before torch loads, except for `proxrl train --threads N>1`
    (several torch threads help only if they spin between ops) or where the user chose how OpenMP waits."""
    env = {k: v for k, v in ENV.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    code = (f"import os, sys; sys.argv = {argv!r}; import proxrl; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra_env}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(policy), "False"]
