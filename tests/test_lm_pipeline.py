"""The whole offline pipeline (tokenizer -> SFT -> pairs -> reward model -> PPO -> evaluation) at tiny size."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("vaderSentiment")

from proxrl.errors import UserError  # noqa: E402
from proxrl.lm.pipeline import DemoConfig, run_demo  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_sentiment_demo_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "demo"
    summary = run_demo("sentiment", out, seed=0, quick=True, threads=1, progress=False)
    text = capsys.readouterr().out
    assert "before (SFT)" in text and "after  (PPO)" in text and "stage timings" in text
    for key in ("vader", "rm_score", "kl_to_sft"):
        assert key in summary["before"] and key in summary["after"]
    assert json.loads((out / "summary.json").read_text())["task"] == "sentiment"
    for d in ("sft", "ppo/policy"):
        AutoModelForCausalLM.from_pretrained(out / d)
        AutoTokenizer.from_pretrained(out / d)
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    assert rm.config.num_labels == 1
    assert (out / "data" / "pairs.jsonl").is_file()


def test_quick_arithmetic_demo_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    summary = run_demo("arithmetic", tmp_path / "a", quick=True, threads=1, progress=False)
    assert 0.0 <= summary["after"]["accuracy_greedy"] <= 1.0
    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "ppo" / "policy")


def test_demo_refuses_non_empty_out_dir_and_bad_task(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        run_demo("sentiment", tmp_path / "x", quick=True, threads=1, progress=False)
    assert (tmp_path / "x" / "f").read_text() == "keep me"
    with pytest.raises(UserError, match="task"):
        DemoConfig(task="chess")  # type: ignore[arg-type]
