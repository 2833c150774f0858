"""LM bad input at the command line: one line `error: ...`, exit 2, nothing already written lost."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from proxrl.cli import main
from proxrl.lm.builders import scalar_model_from_causal
from proxrl.lm.loading import save_model_and_tokenizer
from proxrl.lm.tokenization import load_tokenizer
from proxrl.runs import RunDir, read_metrics
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


def test_bad_reward_names_the_sample_and_a_rerun_reuses_the_run_dir(capsys, tmp_path, policy_dir):
    reward = tmp_path / "bad_reward.py"
    reward.write_text(
        "def score(prompts, completions):\n"
        "    return [float('nan') if i == 1 else 1.0 for i, _ in enumerate(completions)]\n")
    run = tmp_path / "run"
    code, err = run_cli(capsys, "ppo", "--policy", policy_dir, "--prompts", "sentiment", "--reward-fn",
                        f"{reward}:score", "--run-dir", run, "--rollout-size", 2, "--minibatch-size", 2,
                        "--max-new-tokens", 4, "--max-prompt-length", 16, "--total-updates", 1)
    assert_one_line(code, err, "sample 1")
    # the failure came before any checkpoint: the same command, with the reward fixed, reuses the directory
    reward.write_text("def score(prompts, completions):\n    return [1.0] * len(completions)\n")
    code, err = run_cli(capsys, "ppo", "--policy", policy_dir, "--prompts", "sentiment", "--reward-fn",
                        f"{reward}:score", "--run-dir", run, "--rollout-size", 2, "--minibatch-size", 2,
                        "--max-new-tokens", 4, "--max-prompt-length", 16, "--total-updates", 1, "--plot", "false")
    assert code == 0, err
    assert (run / "policy" / "config.json").is_file() and (run / "checkpoints" / "step_000000001").is_dir()



@pytest.mark.parametrize("stage", ["ppo", "sft", "reward-model"])
def test_bf16_on_a_cpu_without_native_bfloat16_is_one_line(capsys, tmp_path, policy_dir, monkeypatch, stage):
    # torch's probe says this CPU has no AVX512-BF16/AMX (as on AVX2-only machines, where autocast emulates bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    run = tmp_path / "run"
    data = tmp_path / "data.jsonl"
    if stage == "ppo":
        argv = ["ppo", "--policy", policy_dir, "--prompts", "sentiment", "--reward-fn",
                _reward_file(tmp_path, "    return [1.0] * len(completions)\n")]
    elif stage == "sft":
        data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
        argv = ["sft", "--model", policy_dir, "--data", data]
    else:
        data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
        argv = ["reward-model", "--model", policy_dir, "--data", data]
    code, err = run_cli(capsys, *argv, "--run-dir", run, "--device", "cpu", "--bf16", "true")
    assert_one_line(code, err, "--bf16 true", "no native bfloat16", "use --bf16 false")
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------ ppo resume

def _reward_file(tmp_path: Path, body: str, name: str = "r.py") -> str:
    f = tmp_path / name
    f.write_text("import sys, time\n\ndef score(prompts, completions):\n" + body)
    return f"{f}:score"


def _ppo_args(policy_dir, tmp_path, run, reward_spec, *extra):
    return ("ppo", "--policy", policy_dir, "--prompts", "sentiment", "--reward-fn", reward_spec, "--run-dir", run,
            "--rollout-size", 2, "--minibatch-size", 2, "--epochs", 1, "--max-new-tokens", 4,
            "--max-prompt-length", 16, "--plot", "false", "--sample-every", 0, *extra)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, policy_dir) -> Path:
    root = tmp_path_factory.mktemp("finished_ppo")
    spec = _reward_file(root, "    return [float(len(c)) for c in completions]\n")
    assert main([str(a) for a in _ppo_args(policy_dir, root, root / "run", spec, "--total-updates", 1)]) == 0
    return root / "run"


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def _edit_state(run: Path, edit) -> None:
    state_path = next(run.glob("checkpoints/step_*/state.json"))
    state = json.loads(state_path.read_text())
    state.pop("_checksums", None)  # as an older checkpoint without checksums: only the content checks remain
    state_path.write_text(json.dumps(edit(state)))


@pytest.mark.parametrize("edit, needle", [
    (lambda s: {}, "lacks 'step'"),
    (lambda s: {k: v for k, v in s.items() if k != "optimizer"}, "lacks 'optimizer'"),
    (lambda s: {**s, "loop": {k: v for k, v in s["loop"].items() if k != "kl_controller"}},
     "lacks 'loop.kl_controller'"),
])
def test_resume_with_an_incomplete_state_json_is_one_line(capsys, tmp_path, finished_run, edit, needle):
    run = _copy_run(finished_run, tmp_path)
    _edit_state(run, edit)
    config = (run / "config.yaml").read_bytes()
    code, err = run_cli(capsys, "ppo", "--resume", run, "--total-updates", 2)
    assert_one_line(code, err, needle, "state.json")
    assert (run / "config.yaml").read_bytes() == config  # a refused resume rewrites nothing


def test_resume_with_a_checkpoint_missing_a_tensor_is_one_line(capsys, tmp_path, finished_run):
    run = _copy_run(finished_run, tmp_path)
    weights = next(run.glob("checkpoints/step_*/model.safetensors"))
    tensors = load_file(str(weights))
    gone = next(k for k in tensors if k.startswith("model.critic."))
    del tensors[gone]
    save_file(tensors, str(weights))
    code, err = run_cli(capsys, "ppo", "--resume", run, "--total-updates", 2)
    assert_one_line(code, err, "model.safetensors")  # its checksum no longer matches
    _edit_state(run, lambda s: s)  # now without checksums: the content checks must catch it
    code, err = run_cli(capsys, "ppo", "--resume", run, "--total-updates", 2)
    assert_one_line(code, err, "does not match", gone.removeprefix("model."))


def test_resume_options_are_checked_and_config_is_kept(capsys, tmp_path, finished_run):
    run = _copy_run(finished_run, tmp_path)
    config = (run / "config.yaml").read_bytes()
    code, err = run_cli(capsys, "ppo", "--resume", run, "--learning-rate", 5)
    assert_one_line(code, err, "--learning-rate cannot change on --resume", "--total-updates")
    code, err = run_cli(capsys, "ppo", "--resume", run, "--total-updates", 0)
    assert_one_line(code, err, "total_updates=0")
    assert (run / "config.yaml").read_bytes() == config
    code, err = run_cli(capsys, "ppo", "--resume", run, "--total-updates", 2, "--sample-every", 1, "--threads", 1)
    assert code == 0, err

    saved = RunDir(run).read_config()
    assert (saved["total_updates"], saved["sample_every"], saved["threads"]) == (2, 1, 1)
    assert [r["step"] for r in read_metrics(run)] == [1, 2] and (run / "samples.md").read_text().count("###") == 1


# ------------------------------------------------------------------------------------------------ user reward code

def test_reward_fn_that_hangs_exits_or_returns_strings(capsys, tmp_path, policy_dir):
    hang = _reward_file(tmp_path, "    time.sleep(600)\n", "hang.py")
    code, err = run_cli(capsys, *_ppo_args(policy_dir, tmp_path, tmp_path / "a", hang, "--total-updates", 1,
                                           "--reward-timeout", 0.5))
    assert code == 1 and err.count("\n") == 1 and "did not return within 0.5 s" in err, err
    exits = _reward_file(tmp_path, "    sys.exit(3)\n", "exits.py")
    code, err = run_cli(capsys, *_ppo_args(policy_dir, tmp_path, tmp_path / "b", exits, "--total-updates", 1))
    assert code == 1 and err.count("\n") == 1 and "raised SystemExit: 3" in err, err
    strings = _reward_file(tmp_path, "    return ['1.5'] * len(completions)\n", "strings.py")
    code, err = run_cli(capsys, *_ppo_args(policy_dir, tmp_path, tmp_path / "c", strings, "--total-updates", 1))
    assert_one_line(code, err, "returned '1.5' (str, not a real number) for sample 0")
    code, err = run_cli(capsys, *_ppo_args(policy_dir, tmp_path, tmp_path / "d", strings, "--reward-timeout", 0))
    assert_one_line(code, err, "reward_timeout=0.0")


# ------------------------------------------------------------------------------------------------ model directories

def test_reward_model_and_causal_lm_directories_mixed_up(capfd, tmp_path, policy_dir):
    rm_dir = save_model_and_tokenizer(scalar_model_from_causal(policy_dir, head_std=0.1), load_tokenizer(policy_dir),
                                      tmp_path / "rm")
    capfd.readouterr()
    code, err = run_cli(capfd, "generate", rm_dir, "--prompt", "the cat", "--max-new-tokens", 3)
    assert_one_line(code, err, "not a causal LM")
    code, err = run_cli(capfd, "generate", policy_dir, "--prompt", "the cat", "--threads", 0)
    assert_one_line(code, err, "--threads 0")
    # a plain language model given as the reward model: one line, and nothing else printed by transformers
    code, err = run_cli(capfd, "ppo", "--policy", policy_dir, "--prompts", "sentiment", "--reward-model", policy_dir,
                        "--run-dir", tmp_path / "run", "--rollout-size", 2, "--minibatch-size", 2,
                        "--max-new-tokens", 4, "--max-prompt-length", 16)
    assert_one_line(code, err, "GPT2LMHeadModel", "not a reward model")  # err: everything written to fd 2
    assert not (tmp_path / "run" / "config.yaml").exists()
