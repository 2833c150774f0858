"""proxrl.lm.rewards: reward-function loading/calling errors and the reward-model scorer."""
import os
import sys
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import threading
import time

import numpy as np
import pytest
import torch

from proxrl.errors import UserCodeError, UserError
from proxrl.lm.builders import build_tiny_gpt2, scalar_model_from_causal
from proxrl.lm.heads import token_values
from proxrl.lm.loading import load_scalar_model, save_model_and_tokenizer
from proxrl.lm.rewards import RewardModelScorer, call_reward_fn, load_reward_fn
from proxrl.lm.tokenization import tokenizer_fingerprint, train_bpe_tokenizer

torch.set_num_threads(1)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A reward model scores a completion."] * 20


def err(fn, *a, **kw):
    with pytest.raises(UserError) as e:
        fn(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def reward_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(textwrap.dedent("""
        def length(prompts, completions):
            return [float(len(c)) for c in completions]

        def picky(prompts, completions):
            out = []
            for c in completions:
                if c == "bad":
                    raise ValueError("cannot score\\nthis one")
                out.append(1.0)
            return out

        def short(prompts, completions):
            return [1.0] * (len(completions) - 1)

        def nan_at_2(prompts, completions):
            return [float("nan") if i == 2 else 0.0 for i in range(len(completions))]

        def inf_at_1(prompts, completions):
            return [float("inf") if i == 1 else 0.0 for i in range(len(completions))]

        def strings(prompts, completions):
            return ["x"] * len(completions)

        def batch_only(prompts, completions):
            if len(completions) > 1:
                raise RuntimeError("batch bug")
            return [0.0]

        def with_answer(prompts, completions, answer):
            return [float(c == a) for c, a in zip(completions, answer)]

        NOT_CALLABLE = 3
    """))
    return f


def test_load_from_file_and_module(reward_file, tmp_path, monkeypatch):
    fn = load_reward_fn(f"{reward_file}:length")
    assert call_reward_fn(fn, ["p", "q"], ["ab", "abcd"]).tolist() == [2.0, 4.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    fn2 = load_reward_fn("my_rewards:length")
    assert fn2.spec == "my_rewards:length" and fn2(["p"], ["abc"]) == [3.0]
    assert load_reward_fn("math:sqrt")(4.0) == 2.0
    sys.modules.pop("my_rewards", None)


def test_load_errors(reward_file, tmp_path):
    assert "no ':function'" in err(load_reward_fn, "justamodule")
    assert "no module named 'no_such_mod_xyz'" in err(load_reward_fn, "no_such_mod_xyz:f")
    assert "does not exist" in err(load_reward_fn, str(tmp_path / "missing.py") + ":f")
    msg = err(load_reward_fn, f"{reward_file}:lenght")
    assert "no attribute 'lenght'" in msg and "did you mean 'length'" in msg
    assert "not a function" in err(load_reward_fn, f"{reward_file}:NOT_CALLABLE")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_dependency_abc\n")
    assert "ModuleNotFoundError" in err(load_reward_fn, f"{broken}:f")


def test_call_errors_name_the_sample(reward_file):
    spec = f"{reward_file}:picky"
    fn = load_reward_fn(spec)
    prompts = ["p0", "p1", "p2", "abcdefghij" * 10, "p4"]
    comps = ["ok", "ok", "ok", "bad", "bad"]
    msg = err(call_reward_fn, fn, prompts, comps)
    assert msg.startswith(f"reward function {spec} raised ValueError on sample 3 (prompt 'abcdefghij")
    assert "cannot score this one" in msg and "..." in msg
    msg = err(call_reward_fn, load_reward_fn(f"{reward_file}:short"), prompts, comps)
    assert "returned 4 scores for 5 completions" in msg and "expected 5" in msg
    msg = err(call_reward_fn, load_reward_fn(f"{reward_file}:nan_at_2"), prompts, comps)
    assert "returned nan for sample 2" in msg
    msg = err(call_reward_fn, load_reward_fn(f"{reward_file}:inf_at_1"), prompts, comps)
    assert "returned inf for sample 1" in msg
    msg = err(call_reward_fn, load_reward_fn(f"{reward_file}:strings"), prompts, comps)
    assert "returned 'x' (str, not a real number) for sample 0" in msg
    assert "on no single sample" in err(call_reward_fn, load_reward_fn(f"{reward_file}:batch_only"), prompts, comps)
    assert "a single number" in err(call_reward_fn, lambda p, c: 1.0, prompts, comps)


def test_call_accepts_tensors_arrays_and_extra_columns(reward_file):
    out = call_reward_fn(lambda p, c: torch.ones(len(c), 1, requires_grad=True) * 2, ["a", "b"], ["c", "d"])
    assert out.dtype == torch.float32 and out.shape == (2,) and not out.requires_grad and out.tolist() == [2, 2]
    assert call_reward_fn(lambda p, c: np.arange(len(c)), ["a", "b"], ["c", "d"]).tolist() == [0, 1]
    fn = load_reward_fn(f"{reward_file}:with_answer")
    assert call_reward_fn(fn, ["q", "q"], ["4", "5"], answer=["4", "4"]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("value, shown", [("1.5", "'1.5' (str"), (True, "True (bool"), (None, "None (NoneType"),
                                           ([1.0], "[1.0] (list")])
def test_values_that_are_not_real_numbers_are_refused_with_the_sample(value, shown):
    def fn(prompts, completions):
        return [0.5, 2, value, 1.0]

    msg = err(call_reward_fn, fn, ["p"] * 4, ["c"] * 4)
    assert f"returned {shown}, not a real number) for sample 2" in msg
    for bad in (torch.tensor([True, False]), np.array(["1.5", "2"]), np.array([1 + 2j, 1j])):
        assert "not real numbers" in err(call_reward_fn, lambda p, c, b=bad: b, ["p"] * 2, ["c"] * 2)
    # real numbers of every kind are fine: int, float, numpy scalars, one-element tensors
    got = call_reward_fn(lambda p, c: [1, 2.5, np.float32(0.25), np.int64(3), torch.tensor(4.0)], ["p"] * 5,
                         ["c"] * 5)
    assert got.tolist() == [1.0, 2.5, 0.25, 3.0, 4.0]


def test_user_code_failures_are_user_code_errors(reward_file):
    e = pytest.raises(UserCodeError, call_reward_fn, load_reward_fn(f"{reward_file}:picky"), ["p"], ["bad"])
    assert e.value.exit_code == 1 and "raised ValueError on sample 0" in str(e.value)

    def exits(prompts, completions):
        raise SystemExit(3)

    def interrupts(prompts, completions):
        raise KeyboardInterrupt

    for fn, name in ((exits, "SystemExit: 3"), (interrupts, "KeyboardInterrupt")):
        for timeout in (None, 5.0):
            if fn is interrupts and timeout is None:
                continue  # in the caller's thread it may be the user's Ctrl-C: it is left alone
            e = pytest.raises(UserCodeError, call_reward_fn, fn, ["p", "q"], ["a", "b"], timeout=timeout)
            msg = str(e.value)
            assert e.value.exit_code == 1 and "\n" not in msg and f"raised {name} on the batch of 2" in msg, msg
            assert "not exit or interrupt the run" in msg
    with pytest.raises(KeyboardInterrupt):
        call_reward_fn(interrupts, ["p"], ["a"])


def test_reward_function_that_never_returns_times_out():
    release = threading.Event()

    def hangs(prompts, completions):
        release.wait(60)
        return [0.0] * len(completions)

    t0 = time.perf_counter()
    e = pytest.raises(UserCodeError, call_reward_fn, hangs, ["p"], ["a"], timeout=0.3)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert e.value.exit_code == 1 and "did not return within 0.3 s on the batch of 1" in msg
    assert "--reward-timeout" in msg and "\n" not in msg
    release.set()
    # a function that returns in time runs in the worker thread and is scored as usual
    assert call_reward_fn(lambda p, c: [float(len(x)) for x in c], ["p"], ["abc"], timeout=5.0).tolist() == [3.0]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, 280)


@pytest.fixture(scope="module")
def rm_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    rm = scalar_model_from_causal(build_tiny_gpt2(tok, 2, 32, 2, seed=0), head_std=0.5)
    save_model_and_tokenizer(rm, tok, d)
    return d


def test_scorer_reads_explicit_last_index(tok, rm_dir):
    s = RewardModelScorer(rm_dir)
    ids, mask = s.encode(["The quick", ""], [" brown fox", "A reward"])
    assert mask[1, 0] == 0 and (ids[:, -1] == tok.eos_token_id).all()  # left padded, EOS appended
    scores = s.score_ids(ids, mask)
    vals = token_values(s.model, ids, mask)
    assert torch.allclose(scores, vals[:, -1], atol=1e-6)
    assert torch.allclose(s.score_ids(ids, mask, torch.tensor([2, 3])), vals[torch.arange(2), torch.tensor([2, 3])])
    # same text alone (no padding) scores the same: padding and pad == eos do not matter
    alone_ids, alone_mask = s.encode([""], ["A reward"])
    assert torch.allclose(s.score_ids(alone_ids, alone_mask), scores[1:], atol=1e-5)
    assert torch.allclose(s(["The quick", ""], [" brown fox", "A reward"]), scores, atol=1e-6)
    # right-padded input works too because the index comes from the mask, not from pad ids
    r_ids = torch.cat([alone_ids, torch.full((1, 3), tok.eos_token_id)], 1)
    r_mask = torch.cat([alone_mask, torch.zeros(1, 3, dtype=torch.long)], 1)
    assert torch.allclose(s.score_ids(r_ids, r_mask), scores[1:], atol=1e-5)
    assert "outside the reward model's vocabulary" in err(s.score_ids, ids + 1000, mask)


def test_scorer_vocab_checks(tok, rm_dir, tmp_path):
    assert RewardModelScorer(rm_dir, policy_tokenizer=tok).same_tokenizer
    other = train_bpe_tokenizer(["entirely different words here"] * 30, 280)
    # another tokenizer than the policy's is no error: the scorer then re-encodes texts with its own
    s = RewardModelScorer(rm_dir, policy_tokenizer=other)
    assert not s.same_tokenizer and tokenizer_fingerprint(s.tokenizer) == tokenizer_fingerprint(tok)
    bigger = train_bpe_tokenizer(TEXTS + ["zebra quartz xylophone jukebox"] * 10, 320)
    assert len(bigger) > 280
    model = load_scalar_model(rm_dir)
    msg = err(RewardModelScorer, model, bigger)
    assert str(len(bigger)) in msg and "rows" in msg
    # a directory without fingerprint but with a saved tokenizer is still checked
    d = tmp_path / "nofp"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    RewardModelScorer(d)
    assert not RewardModelScorer(d, policy_tokenizer=other).same_tokenizer
    # the saved fingerprint still refuses a tokenizer that is not the model's own
    save_model_and_tokenizer(model, tok, tmp_path / "fp")
    (tmp_path / "fp" / "tokenizer.json").unlink()
    (tmp_path / "fp" / "tokenizer_config.json").unlink()
    assert "different tokenizer" in err(RewardModelScorer, tmp_path / "fp", other)
    assert "needs a tokenizer" in err(RewardModelScorer, model)
    assert "does not exist" in err(RewardModelScorer, tmp_path / "missing")


def test_reward_model_with_more_than_one_label_is_refused(tok, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=2)
    model = GPT2ForSequenceClassification(cfg)
    save_model_and_tokenizer(model, tok, tmp_path / "two")
    msg = err(RewardModelScorer, tmp_path / "two")
    assert "has 2 labels" in msg and "num_labels=1" in msg


def test_encoder_reward_model_with_its_own_tokenizer_uses_its_own_forward(tok, tmp_path):
    """A hub-style reward model: BERT (pooled classifier head, no per-position score) with its own tokenizer and
    chat template; texts are encoded with its tokenizer and template, and scored by its own forward."""
    from transformers import BertConfig, BertForSequenceClassification

    own = train_bpe_tokenizer(["completely other words for the reward model"] * 30 + TEXTS, 300)
    own.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} <eos>{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(own), hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=1,
                                                    max_position_embeddings=128))
    d = tmp_path / "bert_rm"
    save_model_and_tokenizer(bert, own, d)
    from proxrl.lm.chat import resolve_chat_template

    s = RewardModelScorer(d, policy_tokenizer=tok)
    s.template = resolve_chat_template(s.tokenizer, "auto")
    assert not s.per_position and not s.same_tokenizer and s.template == own.chat_template
    prompts, comps = ["The quick", [{"role": "user", "content": "A reward"}]], [" brown fox", "model scores"]
    got = s.score_texts(prompts, comps, batch_size=1)
    # by hand: the rendered conversation in the reward model's tokenizer, its own forward, logit 0
    texts = ["[user] The quick <eos>[assistant]  brown fox <eos>", "[user] A reward <eos>[assistant] model scores <eos>"]
    bert = load_scalar_model(d)
    for i, text in enumerate(texts):
        ids = torch.tensor([own(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0]
        assert abs(float(got[i]) - float(want)) < 1e-5, (i, float(got[i]), float(want))
