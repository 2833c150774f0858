"""Built-in tasks: the addition checker on hand cases, offline Austen data, VADER scorer, prompts."""
from __future__ import annotations

import pytest

from proxrl.errors import UserError
from proxrl.lm import tasks
from proxrl.lm.tasks import arithmetic as A


@pytest.mark.parametrize("prompt, completion, ok", [
    ("12+345=", "357", True),
    ("12+345=", "357<eos>", True),
    ("12+345=", " 357 ", True),
    ("12+345=", "358", False),
    ("12+345=", "3570", False),
    ("12+345=", "35", False),
    ("12+345=", "", False),
    ("12+345=", "357+1", False),
    ("0+0=", "0", True),
    ("99+1=", "100", True),
    ("99+1=", "00", False),
    ("hello", "5", False),
])
def test_checker_hand_cases(prompt, completion, ok):
    assert A.check_answer(prompt, completion) is ok


def test_reward_fn_and_accuracy():
    assert A.reward_fn(["1+2=", "10+10="], ["3", "21"]) == [1.0, 0.0]
    assert A.accuracy(["1+2=", "10+10="], ["3", "20"]) == 1.0
    with pytest.raises(ValueError):
        A.reward_fn(["1+2="], [])


def test_carryless_sum_and_sloppy_labels():
    assert A.carryless_sum(57, 68) == 15 and A.carryless_sum(12, 34) == 46 and A.carryless_sum(5, 5) == 0
    assert A.has_carry(57, 68) and not A.has_carry(12, 34)
    recs = A.sft_records([(57, 68)] * 200 + [(12, 34)] * 10, carry_error=0.5, seed=0)
    wrong = sum(r["completion"] == "15" for r in recs[:200])
    assert 60 < wrong < 140 and all(r["completion"] == "46" for r in recs[200:])


def test_problems_distinct_and_held_out_disjoint():
    held = A.held_out_problems(0)
    train = A.train_problems(10 ** 6, seed=0)
    assert len(set(held)) == len(held) == A.EVAL_POOL
    assert not set(held) & set(train) and len(train) + len(held) == 10_000
    assert A.make_problems(50, seed=3) == A.make_problems(50, seed=3)


def test_char_tokenizer_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tok = A.build_char_tokenizer(tmp_path)
    ids = tok("12+345=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and tok.decode(ids) == "12+345="
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("12+345=", add_special_tokens=False)["input_ids"] == ids
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 1


def test_sentiment_data_loads_offline():
    from proxrl.lm.tasks import sentiment as S

    s = S.load_sentences()
    assert len(s) > 15_000 and all(isinstance(x, str) and x for x in s[:100])
    assert any("Elizabeth" in x for x in s) and any("Emma" in x for x in s)
    train, held = S.split_sentences(seed=0)
    assert not set(train) & set(held) or len(set(train) & set(held)) < 50  # duplicates like "Oh!" may repeat
    prompts = S.make_prompts(held[:50], seed=0)
    assert prompts and all(2 <= len(p.split()) <= 4 for p in prompts)


def test_vader_scores_sign():
    pytest.importorskip("vaderSentiment")
    from proxrl.lm.tasks import sentiment as S

    pos, neg, neutral = S.reward_fn(["a", "b", "c"], ["she was happy and delighted", "a miserable, wretched day", ""])
    assert pos > 0.5 and neg < -0.3 and neutral == 0.0


def test_task_prompts():
    assert tasks.task_prompts("arithmetic", "eval", 5) == [A.format_prompt(a, b) for a, b in A.held_out_problems(0)[:5]]
    assert len(tasks.task_prompts("sentiment", "train", 10)) == 10
    with pytest.raises(UserError, match="unknown task"):
        tasks.task_prompts("chess")
    assert set(tasks.REWARD_FNS) == set(tasks.TASKS)
