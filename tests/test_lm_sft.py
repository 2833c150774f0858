"""SFT stage: prompt masking, loss goes down, output directory loads with plain transformers."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from proxrl.errors import UserError  # noqa: E402
from proxrl.lm import sft as S  # noqa: E402
from proxrl.lm.supervised import load_run_config  # noqa: E402
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
    from proxrl.lm.tokenization import load_tokenizer

    tok = load_tokenizer(char_tok)
    ex = S.tokenize_records([{"prompt": "12+3=", "completion": "15"}, {"text": "7+7=14"}], tok, max_length=32)
    assert ex[0].n_prompt == 5 and len(ex[0].ids) == 5 + 2 + 1 and ex[0].ids[-1] == tok.eos_token_id
    assert tok.decode(list(ex[0].ids[5:7])) == "15"
    assert ex[1].n_prompt == 0 and len(ex[1].ids) == 7
    chunks = S.tokenize_records([{"text": "1+1=2"}] * 10, tok, max_length=8, text_mode="chunk")
    assert all(len(c.ids) <= 8 for c in chunks) and sum(len(c.ids) for c in chunks) == 60


def test_lm_loss_ignores_prompt_tokens(char_tok):
    from proxrl.lm.builders import build_tiny_gpt2
    from proxrl.lm.tokenization import load_tokenizer

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
    res = S.train_sft(load_run_config(S.SFTConfig, tmp_path / "b"), resume=True)  # from checkpoints/step_000000005

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


# ------------------------------------------------------------------------------------------------ resume from the CLI


def _cli(capsys, *argv):
    from proxrl.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _tiny_run_flags(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("\n".join(f"the {w} sat on the {v}" for w in ("cat", "dog", "cow") for v in ("mat", "log")) * 20)
    return ["--data", data, "--vocab-size", 300, "--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--n-positions", 32,
            "--max-length", 16, "--batch-size", 8, "--eval-every", 4, "--log-every", 3, "--checkpoint-every", 3,
            "--progress", "false"]


def test_cli_resume_applies_resumable_flags_and_refuses_the_rest(tmp_path, capsys):
    from proxrl.runs import read_metrics

    run = tmp_path / "run"
    code, err = _cli(capsys, "sft", *_tiny_run_flags(tmp_path), "--max-steps", 4, "--run-dir", run)
    assert code == 0, err
    config = (run / "config.yaml").read_bytes()
    # a field a resume may not change: one line naming it and the ones it may; nothing rewritten
    code, err = _cli(capsys, "sft", "--resume", run, "--learning-rate", 0.5)
    assert code == 2 and err.count("\n") == 1, err
    assert "--learning-rate cannot change on --resume" in err and "--max-steps" in err and "--log-every" in err
    assert (run / "config.yaml").read_bytes() == config
    # a step budget below the step the run reached (its checkpoint is at step 3)
    code, err = _cli(capsys, "sft", "--resume", run, "--max-steps", 2)
    assert code == 2 and "already at step 3" in err and "give at least 3" in err, err
    assert (run / "config.yaml").read_bytes() == config
    # the saved value again is fine; --max-steps and --log-every are applied and saved
    code, err = _cli(capsys, "sft", "--resume", run, "--learning-rate", 1e-3, "--max-steps", 7, "--log-every", 7)
    assert code == 0, err
    cfg = load_run_config(S.SFTConfig, run)
    assert (cfg.max_steps, cfg.log_every, cfg.run_dir) == (7, 7, str(run))
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "train_loss" in r] == [3, 7]  # step 4's row is gone, then every 7 steps
    assert json.loads((run / "sft_result.json").read_text())["steps"] == 7


def test_resume_works_on_the_directory_given_and_checks_the_stage(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    assert _cli(capsys, "sft", *_tiny_run_flags(tmp_path), "--max-steps", 4, "--run-dir", run)[0] == 0
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    code, err = _cli(capsys, "sft", "--resume", moved, "--max-steps", 5)
    assert code == 0, err
    assert not run.exists() and load_run_config(S.SFTConfig, moved).run_dir == str(moved)
    code, err = _cli(capsys, "reward-model", "--resume", moved)
    assert code == 2 and "is a sft run, not a reward_model run" in err and "proxrl sft --resume" in err, err


def test_max_grad_norm_none_means_no_clipping_and_zero_is_refused(tmp_path):
    with pytest.raises(UserError, match="max_grad_norm=0.0 must be > 0; use none to turn gradient clipping off"):
        S.SFTConfig(data="x.txt", max_grad_norm=0.0)
    from proxrl.config import from_dict

    assert from_dict(S.SFTConfig, {"data": "x.txt", "max_grad_norm": None}).max_grad_norm is None
    with pytest.raises(UserError, match="'prompt_key' was renamed to 'prompt_column'"):
        from_dict(S.SFTConfig, {"data": "x.txt", "prompt_key": "q"})


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    data = tmp_path / "t.txt"
    data.write_text("the cat sat on the mat\nthe dog sat on the log\n" * 20)
    cfg = S.SFTConfig(data=str(data), run_dir=str(tmp_path / "o"), vocab_size=300, n_layer=1, n_embd=32, n_head=2,
                      n_positions=32, max_length=16, batch_size=8, max_steps=6, checkpoint_every=2, progress=False)
    real, calls = S.lm_loss, {"n": 0}

    def nan_at_step_5(model, batch, reduction="mean"):
        out = real(model, batch, reduction)
        if reduction == "mean":
            calls["n"] += 1
            if calls["n"] == 5:
                return out * float("nan")
        return out

    monkeypatch.setattr(S, "lm_loss", nan_at_step_5)
    with pytest.raises(UserError) as e:
        S.train_sft(cfg)
    assert str(e.value).startswith("non-finite sft loss (nan) at step 5; start again with a lower --learning-rate")
    from proxrl.runs import list_checkpoints

    assert [p.name for p in list_checkpoints(tmp_path / "o")] == ["step_000000002", "step_000000004"]


# ------------------------------------------------------------------------------------------------ data layouts


def test_sft_reads_csv_and_parquet_with_column_options(tmp_path, char_tok):
    import datasets

    rows = [{"q": f"{i}+1=", "a": str(i + 1)} for i in range(40)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("q,a\n" + "".join(f"{r['q']},{r['a']}\n" for r in rows))
    want = [{"row": i + 1, "prompt": r["q"], "completion": r["a"]} for i, r in enumerate(rows)]
    for name in ("d.parquet", "d.csv"):
        assert S.load_records(tmp_path / name, prompt_column="q", completion_column="a") == want
    with pytest.raises(UserError) as e:
        S.load_records(tmp_path / "d.csv")
    assert str(e.value).startswith("d.csv has none of the columns 'messages', 'prompt' + 'completion' or 'text' "
                                   "(columns: 'q', 'a')")
    cfg = S.SFTConfig(data=str(tmp_path / "d.csv"), prompt_column="q", completion_column="a", tokenizer=str(char_tok),
                      run_dir=str(tmp_path / "o"), n_layer=1, n_embd=16, n_head=2, n_positions=16, max_length=16,
                      batch_size=8, max_steps=2, eval_fraction=0.1, progress=False)
    res = S.train_sft(cfg)
    # 4 held out of 40; every completion is its digits + EOS: loss tokens counted over 2 steps of 8 examples
    assert (res["train_examples"], res["eval_examples"]) == (36, 4)
    assert 2 * 8 * 2 <= res["tokens"] <= 2 * 8 * 3


# ------------------------------------------------------------------------------------------------ conversations

TEMPLATE = ("{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}|{% endfor %}"
            "{% if add_generation_prompt %}<a>{% endif %}")
CHAT = [{"role": "user", "content": "12"}, {"role": "assistant", "content": "34"},
        {"role": "user", "content": "5"}, {"role": "assistant", "content": "67"}]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    """A char-level tokenizer (one token per character, no chat template of its own) and a template file."""
    from proxrl.lm.tokenization import load_tokenizer

    d = tmp_path_factory.mktemp("chat")
    A.build_char_tokenizer(d / "tok", chars="0123456789<>|uas")
    (d / "t.jinja").write_text(TEMPLATE)
    return load_tokenizer(d / "tok"), d / "t.jinja"


def _label_text(tok, example):
    b = S.build_batch([example], pad_id=0)
    return [tok.convert_ids_to_tokens(int(i)) for i in b["labels"][0] if i != -100]


def test_messages_loss_on_assistant_turns_only(chat_tok):
    tok, _ = chat_tok
    (with_t,) = S.tokenize_records([{"messages": CHAT}], tok, 64, template=TEMPLATE)
    assert tok.decode(list(with_t.ids)) == "<u>12|<a>34|<u>5|<a>67|"
    assert _label_text(tok, with_t) == list("34|67|")  # content + end-of-turn marker of each assistant turn
    (plain,) = S.tokenize_records([{"messages": CHAT}], tok, 64, template=None)
    assert _label_text(tok, plain) == ["3", "4", "<eos>", "6", "7", "<eos>"]
    # a prompt/completion pair with a template: the prompt is a user turn with the generation prompt, no extra EOS
    (pair,) = S.tokenize_records([{"prompt": "12", "completion": "34"}], tok, 64, template=TEMPLATE)
    assert tok.decode(list(pair.ids)) == "<u>12|<a>34|" and pair.n_prompt == len("<u>12|<a>")
    # truncated before the first assistant token: no loss token left, the example is dropped
    assert S.tokenize_records([{"messages": CHAT}], tok, 9, template=TEMPLATE) == []


def test_sft_on_conversations_counts_only_assistant_tokens(tmp_path, chat_tok):
    tok, template = chat_tok
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(8)))
    kw = dict(data=str(data), tokenizer=str(template.parent / "tok"), n_layer=1, n_embd=16, n_head=2,
              n_positions=32, max_length=32, batch_size=8, max_steps=2, eval_fraction=0.0, progress=False)
    res = S.train_sft(S.SFTConfig(run_dir=str(tmp_path / "a"), chat_template=str(template), **kw))
    assert res["tokens"] == 2 * 8 * 6  # 2 steps x 8 conversations x "34|67|"
    res = S.train_sft(S.SFTConfig(run_dir=str(tmp_path / "b"), chat_template="none", **kw))
    assert res["tokens"] == 2 * 8 * 6  # "34<eos>67<eos>"
    with pytest.raises(UserError) as e:
        S.train_sft(S.SFTConfig(run_dir=str(tmp_path / "c"), **kw))  # --chat-template auto, no template
    assert "has no chat template" in str(e.value) and "--chat-template none" in str(e.value)
    assert not (tmp_path / "c").exists()


def test_corrupt_newest_checkpoint_names_the_previous_good_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert _cli(capsys, "sft", *_tiny_run_flags(tmp_path), "--max-steps", 8, "--keep-checkpoints", 0,
                "--run-dir", run)[0] == 0
    weights = run / "checkpoints" / "step_000000006" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit pattern in the last tensor's bytes
    weights.write_bytes(bytes(raw))
    config = (run / "config.yaml").read_bytes()
    code, err = _cli(capsys, "sft", "--resume", run)
    assert code == 2 and err.count("\n") == 1, err
    assert "step_000000006 is corrupt or incomplete" in err and "the previous good one is step_000000003" in err
    assert (run / "config.yaml").read_bytes() == config


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _cli(capsys, "sft", *_tiny_run_flags(tmp_path), "--model", tmp_path / "no_such_model",
                     "--run-dir", run)
    assert code == 2 and "no_such_model" in err, err
    assert not run.exists()
