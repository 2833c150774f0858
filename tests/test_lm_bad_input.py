"""LM bad input at the command line: one line `error: ...`, exit 2, nothing already written lost."""
import json
from pathlib import Path

import pytest
import torch

from proxrl.cli import main

from tests.test_lm_ppo import _make_policy  # a tiny char-level GPT-2 saved with its tokenizer (n_positions=64)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return _make_policy(tmp_path_factory.mktemp("bad_input_policy"))


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_prompt_longer_than_context(capsys, tmp_path, policy_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the cat " * 10}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n")
    reward = tmp_path / "r.py"
    reward.write_text("def score(prompts, completions):\n    return [0.0] * len(completions)\n")
    code, err = run_cli(capsys, "ppo", "--policy", policy_dir, "--prompts", prompts, "--reward-fn", f"{reward}:score",
                        "--max-new-tokens", 32, "--run-dir", tmp_path / "run", "--rollout-size", 2,
                        "--minibatch-size", 2)
    assert_one_line(code, err, "context of 64 tokens")


def test_missing_policy_dir_and_bad_jsonl_line(capsys, tmp_path, policy_dir):
    code, err = run_cli(capsys, "ppo", "--policy", tmp_path / "nope", "--reward-fn", "x.py:f",
                        "--prompts", "sentiment", "--run-dir", tmp_path / "run")
    assert code == 2 and "Traceback" not in err and err.startswith("error: "), err
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    code, err = run_cli(capsys, "sft", "--model", policy_dir, "--data", data, "--run-dir", tmp_path / "sft")
    assert_one_line(code, err, "line 2")


def test_reward_fn_raising_names_the_sample_and_keeps_the_run_dir(capsys, tmp_path, policy_dir):
    reward = tmp_path / "bad_reward.py"
    reward.write_text(
        "def score(prompts, completions):\n"
        "    return [float('nan') if i == 1 else 1.0 for i, _ in enumerate(completions)]\n")
    run = tmp_path / "run"
    code, err = run_cli(capsys, "ppo", "--policy", policy_dir, "--prompts", "sentiment", "--reward-fn",
                        f"{reward}:score", "--run-dir", run, "--rollout-size", 2, "--minibatch-size", 2,
                        "--max-new-tokens", 4, "--max-prompt-length", 16, "--total-updates", 1)
    assert_one_line(code, err, "sample 1")
    assert (run / "config.yaml").is_file()  # what was written before the failure is kept
