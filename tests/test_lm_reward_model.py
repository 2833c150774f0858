"""Reward model: Bradley-Terry training reaches high accuracy on an easy set; score at the last real token."""
from __future__ import annotations

import json
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from proxrl.errors import UserError  # noqa: E402
from proxrl.lm import reward_model as RM  # noqa: E402
from proxrl.lm.supervised import load_run_config  # noqa: E402
from proxrl.lm.tasks import arithmetic as A  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random tiny GPT-2 with a char tokenizer whose pad token IS the eos token."""
    from proxrl.lm.builders import build_tiny_gpt2
    from proxrl.lm.loading import save_model_and_tokenizer

    d = tmp_path_factory.mktemp("lm")
    tok = A.build_char_tokenizer()
    tok.pad_token = tok.eos_token  # pad == eos: scores must come from the attention mask
    model = build_tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=0)
    save_model_and_tokenizer(model, tok, d)
    return d


def _easy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen completions contain a '7', rejected ones never do (same length, random digits otherwise)."""
    rng = random.Random(seed)
    digits = "01234568 9"
    out = []
    for _ in range(n):
        k = rng.randint(3, 8)
        rej = "".join(rng.choice(digits) for _ in range(k))
        pos = rng.randrange(k)
        cho = rej[:pos] + "7" + rej[pos + 1:]
        out.append({"prompt": f"{rng.randint(0, 99)}=", "chosen": cho, "rejected": rej})
    return out


def test_bradley_terry_learns_easy_preference(tmp_path, tiny_lm):
    from transformers import AutoModelForSequenceClassification

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _easy_pairs(600)))
    cfg = RM.RewardModelConfig(data=str(data), model=str(tiny_lm), run_dir=str(tmp_path / "rm"), batch_size=32,
                               max_steps=120, learning_rate=3e-3, eval_fraction=0.2, eval_every=60, progress=False)
    res = RM.train_reward_model(cfg)
    assert res["eval_accuracy"] > 0.9, res
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert m.config.num_labels == 1
    assert (tmp_path / "rm" / "metrics.jsonl").is_file()


def test_score_read_at_last_real_token_with_pad_equal_eos(tiny_lm):
    from proxrl.lm.tokenization import load_tokenizer
    from proxrl.lm.builders import scalar_model_from_causal

    tok = load_tokenizer(tiny_lm)
    assert tok.pad_token_id == tok.eos_token_id
    model = scalar_model_from_causal(str(tiny_lm), head_std=0.5)
    short = RM.encode_pair_side(tok, "1+2=", "3", 64, append_eos=False)  # padded with eos (== pad) below
    long = RM.encode_pair_side(tok, "11+22=", "33", 64, append_eos=True)
    batch = RM.score_sequences(model, [short, long], tok.pad_token_id)
    alone = RM.score_sequences(model, [short], tok.pad_token_id)
    assert torch.allclose(batch[0], alone[0], atol=1e-5)
    ids, mask, last = RM.pad_right([short, long], tok.pad_token_id)
    assert last.tolist() == [len(short) - 1, len(long) - 1]
    # the score is the head at exactly that position, not at the first pad / last column
    from proxrl.lm.heads import token_values

    per_pos = token_values(model, ids, mask)
    assert torch.allclose(batch, per_pos[torch.arange(2), last], atol=1e-5)
    assert not torch.allclose(per_pos[0, len(short) - 1], per_pos[0, -1])


def test_bad_jsonl_line_is_named(tmp_path, tiny_lm):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a", "rejected": "b"}\n{"chosen": "a", oops}\n')
    cfg = RM.RewardModelConfig(data=str(data), model=str(tiny_lm), run_dir=str(tmp_path / "rm"), progress=False)
    with pytest.raises(UserError) as e:
        RM.train_reward_model(cfg)
    assert "line 3" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "rm").exists()  # nothing created for bad data


def test_missing_key_is_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": "a"}\n')
    with pytest.raises(UserError, match="row 2: 'rejected' is empty"):
        RM.load_pairs(data)


def test_config_validation():
    with pytest.raises(UserError, match="model"):
        RM.RewardModelConfig(data="x.jsonl")
    with pytest.raises(UserError, match="lr_schedule"):
        RM.RewardModelConfig(data="x.jsonl", model="m", lr_schedule="warm")


def test_resume_equals_uninterrupted_run(tmp_path, tiny_lm, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from proxrl.runs import read_metrics

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _easy_pairs(120)))
    kw = dict(data=str(data), model=str(tiny_lm), batch_size=16, max_steps=10, eval_every=4, log_every=3,
              checkpoint_every=4, learning_rate=3e-3, eval_fraction=0.2, progress=False)
    full = RM.train_reward_model(RM.RewardModelConfig(run_dir=str(tmp_path / "a"), **kw))

    real, calls = RM.pair_loss, {"n": 0}

    def crash_at_step_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(RM, "pair_loss", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        RM.train_reward_model(RM.RewardModelConfig(run_dir=str(tmp_path / "b"), **kw))
    monkeypatch.setattr(RM, "pair_loss", real)
    res = RM.train_reward_model(load_run_config(RM.RewardModelConfig, tmp_path / "b"), resume=True)  # from step 4

    assert res["eval_accuracy"] == full["eval_accuracy"] and res["eval_loss"] == full["eval_loss"]
    assert read_metrics(tmp_path / "b") == read_metrics(tmp_path / "a")
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conversational_pairs_rendered_with_the_template(tmp_path, tiny_lm):
    template = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}|{% endfor %}"
                "{% if add_generation_prompt %}<a>{% endif %}")
    tok = A.build_char_tokenizer(chars="0123456789<>|uas")
    user = [{"role": "user", "content": "12"}]
    pairs = [{"prompt": user, "chosen": [{"role": "assistant", "content": "37"}],
              "rejected": [{"role": "assistant", "content": "38"}]},
             {"prompt": None, "chosen": user + [{"role": "assistant", "content": "4"}],  # implicit prompt
              "rejected": user + [{"role": "assistant", "content": "5"}]},
             {"prompt": "1", "chosen": "2", "rejected": "3"}]
    c, r = RM.encode_pairs(tok, pairs, [0, 1, 2], template, 64, append_eos=True)
    assert [tok.decode(x) for x in c] == ["<u>12|<a>37|", "<u>12|<a>4|", "<u>1|<a>2|"]  # no EOS after the marker
    assert tok.decode(r[0]) == "<u>12|<a>38|"
    c, r = RM.encode_pairs(tok, pairs, [0, 2], None, 64, append_eos=True)  # no template: contents joined + EOS
    assert [tok.decode(x) for x in c] == ["1237<eos>", "12<eos>"]
    # through a JSONL file (lists of messages survive `datasets`) and a template file, end to end
    data = tmp_path / "chat_pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs[:2] * 10))
    (tmp_path / "t.jinja").write_text(template)
    res = RM.train_reward_model(RM.RewardModelConfig(
        data=str(data), model=str(tiny_lm), run_dir=str(tmp_path / "rm"), chat_template=str(tmp_path / "t.jinja"),
        batch_size=4, max_steps=2, eval_fraction=0.2, progress=False))
    assert (res["pairs_train"], res["pairs_eval"]) == (16, 4)
    with pytest.raises(UserError, match="has no chat template"):
        RM.train_reward_model(RM.RewardModelConfig(data=str(data), model=str(tiny_lm),
                                                   run_dir=str(tmp_path / "rm2"), progress=False))


def test_other_column_names_and_missing_column(tmp_path, tiny_lm):
    data = tmp_path / "pairs.csv"
    data.write_text("question,good,bad\n1+1=,2,3\n2+2=,4,5\n")
    assert RM.load_pairs(data, "question", "good", "bad") == [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    assert RM.load_pairs(data, "nope", "good", "bad")[0]["prompt"] is None  # prompt is optional
    with pytest.raises(UserError) as e:
        RM.load_pairs(data)
    assert str(e.value) == ("pairs.csv has no column 'chosen' (columns: 'question', 'good', 'bad'); pass "
                            "--chosen-column with the column to use")
