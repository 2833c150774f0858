"""SFT stage: prompt masking, loss goes down, output directory loads with plain transformers."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from proxrl.errors import UserError  # noqa: E402
from proxrl.lm import sft as S  # noqa: E402
from proxrl.lm.tasks import arithmetic as A  # noqa: E402


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("chartok")
    A.build_char_tokenizer(d)
    return d


def test_build_batch_masks_prompt_and_padding_exactly():
    ex = [S.Example((5, 6, 7, 8, 1), n_prompt=3), S.Example((9, 1), n_prompt=1), S.Example((4, 4, 4), 0)]
    b = S.build_batch(ex, pad_id=1)  # pad == eos on purpose: masks must not come from the pad id
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 1], [9, 1, 1, 1, 1], [4, 4, 4, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 1], [-100, 1, -100, -100, -100], [4, 4, 4, -100, -100]]
    assert b["loss_mask"].sum().item() == 2 + 1 + 3


def test_tokenize_prompt_completion_separately_with_eos(char_tok):
    from proxrl.lm.models import load_tokenizer

    tok = load_tokenizer(char_tok)
    ex = S.tokenize_records([{"prompt": "12+3=", "completion": "15"}, {"text": "7+7=14"}], tok, max_length=32)
    assert ex[0].n_prompt == 5 and len(ex[0].ids) == 5 + 2 + 1 and ex[0].ids[-1] == tok.eos_token_id
    assert tok.decode(list(ex[0].ids[5:7])) == "15"
    assert ex[1].n_prompt == 0 and len(ex[1].ids) == 7
    chunks = S.tokenize_records([{"text": "1+1=2"}] * 10, tok, max_length=8, text_mode="chunk")
    assert all(len(c.ids) <= 8 for c in chunks) and sum(len(c.ids) for c in chunks) == 60


def test_lm_loss_ignores_prompt_tokens(char_tok):
    from proxrl.lm.models import build_tiny_gpt2, load_tokenizer

    tok = load_tokenizer(char_tok)
    model = build_tiny_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=0)
    a = S.build_batch([S.Example((4, 5, 6, 7, 1), 3)], 0)
    b = S.build_batch([S.Example((4, 5, 6, 7, 1), 0)], 0)
    la, lb = S.lm_loss(model, a), S.lm_loss(model, b)
    logits = model(input_ids=a["input_ids"]).logits[0]
    lp = torch.log_softmax(logits, -1)
    manual = -(lp[2, 7] + lp[3, 1]) / 2  # targets at positions 3, 4 predicted from 2, 3
    assert torch.allclose(la, manual, atol=1e-5)
    assert not torch.allclose(la, lb)


def test_train_sft_lowers_loss_and_saves_loadable_model(tmp_path, char_tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "add.jsonl"
    recs = A.sft_records(A.make_problems(400, seed=1, max_digits=2))
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = S.SFTConfig(data=str(data), model="tiny-gpt2", tokenizer=str(char_tok), run_dir=str(tmp_path / "sft"),
                      n_layer=1, n_embd=32, n_head=2, n_positions=32, max_length=16, batch_size=32, max_steps=60,
                      learning_rate=3e-3, warmup_steps=5, eval_every=30, eval_fraction=0.1, progress=False)
    res = S.train_sft(cfg)
    assert res["eval_loss"] < res["eval_loss_initial"] - 0.5
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert (tmp_path / "sft" / "metrics.jsonl").is_file() and (tmp_path / "sft" / "config.yaml").is_file()
    # running it again into the same directory is refused (one-line error)
    with pytest.raises(UserError, match="already exists"):
        S.train_sft(cfg)


def test_train_sft_on_plain_text_with_trained_bpe(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("\n".join(["the cat sat on the mat", "the dog sat on the log"] * 40) + "\n")
    cfg = S.SFTConfig(data=str(data), run_dir=str(tmp_path / "o"), vocab_size=300, n_layer=1, n_embd=32,
                      n_head=2, n_positions=32, max_length=16, batch_size=16, max_steps=30, learning_rate=3e-3,
                      progress=False)
    res = S.train_sft(cfg)
    assert res["eval_loss"] < res["eval_loss_initial"]
    assert (tmp_path / "o" / "tokenizer.json").is_file()


def test_config_errors_are_one_line():
    with pytest.raises(UserError) as e:
        S.SFTConfig(data="x.txt", n_embd=30, n_head=4)
    assert "\n" not in str(e.value) and "n_head" in str(e.value)
    with pytest.raises(UserError, match="data"):
        S.SFTConfig()


def test_missing_data_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        S.train_sft(S.SFTConfig(data=str(tmp_path / "nope.txt"), run_dir=str(tmp_path / "o"), progress=False))


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from proxrl.runs import read_metrics

    data = tmp_path / "t.txt"
    data.write_text("\n".join(f"the {w} sat on the {v}" for w in ("cat", "dog", "cow") for v in ("mat", "log")) * 20)
    kw = dict(data=str(data), vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=32, max_length=16,
              batch_size=8, max_steps=12, eval_every=4, log_every=3, checkpoint_every=5, progress=False)
    full = S.train_sft(S.SFTConfig(run_dir=str(tmp_path / "a"), **kw))

    real, calls = S.lm_loss, {"n": 0}

    def crash_at_step_8(model, batch, reduction="mean"):
        if reduction == "mean":
            calls["n"] += 1
            if calls["n"] == 8:
                raise KeyboardInterrupt
        return real(model, batch, reduction)

    monkeypatch.setattr(S, "lm_loss", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        S.train_sft(S.SFTConfig(run_dir=str(tmp_path / "b"), **kw))
    monkeypatch.setattr(S, "lm_loss", real)
    res = S.train_sft(S.load_run_config(tmp_path / "b"), resume=True)  # from checkpoints/step_000000005

    assert res["eval_loss"] == full["eval_loss"] and res["tokens"] == full["tokens"]
    assert read_metrics(tmp_path / "b") == read_metrics(tmp_path / "a")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_needs_a_run_with_a_checkpoint(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("the cat sat on the mat\n" * 40)
    cfg = S.SFTConfig(data=str(data), run_dir=str(tmp_path / "o"), vocab_size=300, n_layer=1, n_embd=32, n_head=2,
                      n_positions=32, max_length=16, batch_size=8, max_steps=3, progress=False)
    with pytest.raises(UserError, match="no run"):
        S.train_sft(cfg, resume=True)
    S.train_sft(cfg)
    with pytest.raises(UserError, match="checkpoint-every"):
        S.train_sft(cfg, resume=True)
