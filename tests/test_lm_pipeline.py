"""The whole offline pipeline (tokenizer -> SFT -> pairs -> reward model -> PPO -> evaluation) at tiny size."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from proxrl.errors import UserError
from proxrl.lm.demo_config import DemoConfig
from proxrl.lm.evaluation import diversity
from proxrl.lm.pipeline import run_demo
from proxrl.lm.tasks.arithmetic import check_answer


def test_quick_sentiment_demo_end_to_end(tmp_path, capfd):
    out = tmp_path / "demo"
    summary = run_demo("sentiment", out, seed=0, quick=True, threads=1, progress=False)
    text, err = capfd.readouterr()
    assert "before (SFT)" in text and "after (PPO)" in text and "stage timings" in text
    assert "metric improved: mean VADER sentiment" in text and "distinct-2" in text
    assert "LOAD REPORT" not in text + err  # critic / reward model initialised from the SFT trunk, quietly
    for key in ("vader", "rm_score", "kl_to_sft", "distinct_2", "unique", "top_trigram_fraction"):
        assert key in summary["before"] and key in summary["after"]
    assert summary["run_dir"] == str(out)
    assert json.loads((out / "summary.json").read_text())["task"] == "sentiment"
    for d in ("sft", "ppo/policy"):
        AutoModelForCausalLM.from_pretrained(out / d)
        AutoTokenizer.from_pretrained(out / d)
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    assert rm.config.num_labels == 1
    assert (out / "data" / "pairs.jsonl").is_file()


def test_quick_arithmetic_demo_end_to_end(tmp_path):
    out = tmp_path / "a"
    summary = run_demo("arithmetic", out, quick=True, threads=1, progress=False)
    prompts = [json.loads(line)["prompt"] for line in (out / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 32
    # the reported greedy accuracy is the exact-match rate of each saved model, recomputed here one prompt at a
    # time (no padding) with transformers' own greedy decoding
    for name, model_dir in (("before", out / "sft"), ("after", out / "ppo" / "policy")):
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        right = 0
        for p in prompts:
            ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            right += check_answer(p, tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
        assert summary[name]["accuracy_greedy"] == right / len(prompts), name
    assert abs(summary["before"]["kl_to_sft"]) < 1e-4  # the SFT model against itself


def test_demo_refuses_non_empty_run_dir_and_bad_task(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        run_demo("sentiment", tmp_path / "x", quick=True, threads=1, progress=False)
    assert (tmp_path / "x" / "f").read_text() == "keep me"
    with pytest.raises(UserError, match="task"):
        DemoConfig(task="chess")  # type: ignore[arg-type]


def test_diversity_figures():
    d = diversity(["I am sure it is", "I am sure it is", "she said I am sure", "a b"])
    assert d["unique"] == 0.75
    assert d["top_trigram"] == "i am sure" and d["top_trigram_fraction"] == 0.75
    # bigrams: 4 + 4 + 4 + 1 = 13, distinct: (i am, am sure, sure it, it is, she said, said i, a b) = 7
    assert abs(d["distinct_2"] - 7 / 13) < 1e-12
    assert diversity([])["unique"] == 0.0 and diversity([""])["distinct_2"] == 0.0
