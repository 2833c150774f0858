"""PPO with what users bring (issue 8): chat templates, prompts in any data format, reward models with their own
tokenizer, combined rewards, PPO-ptx, evaluation during training, and the memory/compute options.

Tiny GPT-2s (1 layer, 32 dims) over handmade character tokenizers keep each run to about a second.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from proxrl.cli import main
from proxrl.errors import UserError
from proxrl.lm.builders import build_tiny_gpt2, scalar_model_from_causal
from proxrl.lm.chat import encode, render_prompt
from proxrl.lm.heads import sequence_scores, unwrap_model
from proxrl.lm.loading import load_causal_lm, load_scalar_model, save_model_and_tokenizer
from proxrl.lm.positions import left_pad
from proxrl.lm.ppo_config import PPOConfig
from proxrl.lm.ppo_trainer import PPOTrainer, train_ppo
from proxrl.lm.prompts import load_prompts, tokenize_prompts
from proxrl.lm.ptx import PtxBatches, ptx_loss
from proxrl.lm.reference import reference_from_policy
from proxrl.lm.rollout import ModelSet, collect_rollout
from proxrl.lm.scoring import reward_model_scorer
from proxrl.lm.tokenization import load_tokenizer, train_bpe_tokenizer
from proxrl.runs import read_metrics

torch.set_num_threads(1)

CHARS = list("abcdefghijklmnopqrstuvwxyz .\n")
SPECIALS = ["<|im_start|>", "<|im_end|>"]
PROMPTS = ["the cat", "a dog", "hello", "we go", "sun", "my hat"]
CONV = [[{"role": "user", "content": p}] for p in PROMPTS]
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PTX_TEXT = ["the cat sat on the mat and the dog sat on the log.", "we go to the sea and we see the sun.",
            "my hat is on the bed and the bed is red.", "a dog ran in the park with a ball."] * 6


def _char_tokenizer(out: Path, bos_post_processor: bool = False) -> Path:
    """Characters, <pad>, <eos>, <bos> and ChatML's special tokens; optionally a post-processor that adds BOS."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    if bos_post_processor:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    fast.add_tokens(SPECIALS, special_tokens=True)
    fast.save_pretrained(str(out))
    return out


def _policy(root: Path, *, template: str | None = None, im_end_logit: float | None = None, seed: int = 0,
            bos_post_processor: bool = False) -> Path:
    """A tiny GPT-2 policy. ``im_end_logit``: make it a fixed unigram model (final LayerNorm weight 0, so every
    position's hidden state is the LayerNorm bias v) in which <|im_end|> has logit ``im_end_logit`` and every
    other token a logit near 0."""
    tok = load_tokenizer(_char_tokenizer(root / "tok", bos_post_processor))
    if template is not None:
        tok.chat_template = template
    model = build_tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=128, seed=seed)
    if im_end_logit is not None:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            v = torch.randn(32, generator=g)
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(v)
            wte = model.transformer.wte.weight
            wte.mul_(0.1)
            wte[tok.convert_tokens_to_ids("<|im_end|>")] = v * (im_end_logit / float(v @ v))
    return save_model_and_tokenizer(model, tok, root / "policy")


def _cfg(policy_dir: Path, run_dir: Path, **kw) -> PPOConfig:
    base = dict(policy=str(policy_dir), run_dir=str(run_dir), total_updates=2, rollout_size=8, group_size=1,
                minibatch_size=4, epochs=2, learning_rate=3e-3, max_new_tokens=8, temperature=0.7,
                sample_every=0, checkpoint_every=0, kl_coef=0.01, value_coef=0.5, seed=0, plot=False)
    base.update(kw)
    return PPOConfig(**base)


def count_a(prompts, completions):
    return [float(c.count("a")) for c in completions]


def count_e(prompts, completions):
    return [float(c.count("e")) for c in completions]


def zero(prompts, completions):
    return [0.0] * len(completions)


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    return _policy(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    return _policy(tmp_path_factory.mktemp("chat"), template=CHATML, im_end_logit=2.0)


# ------------------------------------------------------------------------------------------------ chat models


def test_chat_prompts_are_rendered_without_a_second_bos(tmp_path):
    d = _policy(tmp_path, template=CHATML, bos_post_processor=True)
    tok = load_tokenizer(d)
    bos = tok.bos_token_id
    assert tok("hi")["input_ids"][0] == bos  # this tokenizer adds BOS itself: a naive encode would double it
    ids = tokenize_prompts(tok, ["hi", CONV[1]], 64, CHATML)
    assert ids[0] == encode(tok, render_prompt(tok, CHATML, "hi"))
    assert ids[0][0] == bos and ids[0].count(bos) == 1
    text = tok.decode(ids[1])
    assert text == "<bos><|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n", text
    # without a template: plain text as before, BOS from the tokenizer, messages joined
    assert tokenize_prompts(tok, ["hi", CONV[1]], 64) == [tok("hi")["input_ids"], tok("a dog")["input_ids"]]
    # a string prompt rendered in advance is refused with a template (it would be wrapped twice)
    rendered = "already holds the chat template's '<\\|im_(start|end)\\|>'.*--chat-template none"
    with pytest.raises(UserError, match=rendered):
        tokenize_prompts(tok, [render_prompt(tok, CHATML, "hi")], 64, CHATML)


def test_end_of_turn_ends_completions_and_counts_as_eos(chat_dir, tmp_path):
    """The policy emits <|im_end|> (never <eos>) with p ~ 0.2 per token: with its chat template <|im_end|> stops a
    completion and spares it the missing-EOS penalty; with --chat-template none it is an ordinary token."""
    kw = dict(total_updates=1, max_new_tokens=6, missing_eos_penalty=1.0, sample_every=1, sample_rows=8)
    train_ppo(_cfg(chat_dir, tmp_path / "chat", **kw), prompts=CONV, reward_fn=zero, progress=False)
    train_ppo(_cfg(chat_dir, tmp_path / "none", chat_template="none", **kw), prompts=CONV, reward_fn=zero,
              progress=False)
    chat, none = read_metrics(tmp_path / "chat")[0], read_metrics(tmp_path / "none")[0]
    assert 0.4 < chat["eos_rate"] < 1.0, chat["eos_rate"]
    assert none["eos_rate"] < 0.2, none["eos_rate"]
    # reward = score (0) - penalty on the unfinished rows
    assert math.isclose(chat["reward"], -(1 - chat["eos_rate"]), abs_tol=1e-6)
    assert math.isclose(none["reward"], -(1 - none["eos_rate"]), abs_tol=1e-6)
    assert chat["response_length"] < none["response_length"]
    # the sample table shows the conversation as the policy saw it
    assert "<\\|im_start\\|>assistant" in (tmp_path / "chat" / "samples.md").read_text().replace("\u21b5", "")
    # the template is saved with the final policy
    assert load_tokenizer(tmp_path / "chat" / "policy").chat_template == CHATML


def test_template_file_is_saved_with_the_policy_and_used_on_resume(plain_dir, tmp_path):
    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML)
    cfg = _cfg(plain_dir, tmp_path / "run", chat_template=str(f), checkpoint_every=1)
    assert load_tokenizer(plain_dir).chat_template is None
    trainer = PPOTrainer(cfg, CONV, reward_fn=count_a, progress=False)
    tok = trainer.tokenizer
    assert trainer.template == CHATML
    assert trainer.prompt_ids[0] == encode(tok, render_prompt(tok, CHATML, CONV[0]))
    assert trainer.eos_ids == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    trainer.run()
    assert load_tokenizer(tmp_path / "run" / "policy").chat_template == CHATML
    saved = [json.loads(line)["prompt"] for line in (tmp_path / "run" / "prompts.jsonl").read_text().splitlines()]
    assert saved == CONV  # the conversations are kept for a CLI resume
    more = _cfg(plain_dir, tmp_path / "run", chat_template=str(f), checkpoint_every=1, total_updates=3)
    train_ppo(more, reward_fn=count_a, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_chat_bad_input_is_one_line_and_writes_nothing(plain_dir, tmp_path, capsys):
    (tmp_path / "conv.jsonl").write_text("".join(json.dumps({"prompt": c}) + "\n" for c in CONV))
    common = ["ppo", "--policy", str(plain_dir), "--prompts", str(tmp_path / "conv.jsonl"), "--reward-fn",
              "proxrl.lm.tasks.arithmetic:reward_fn", "--rollout-size", "4", "--minibatch-size", "4"]
    err = _cli_error(capsys, [*common, "--run-dir", str(tmp_path / "a")])
    assert "--chat-template auto" in err and "has no chat template" in err and "none" in err
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    err = _cli_error(capsys, [*common, "--run-dir", str(tmp_path / "b"), "--chat-template", str(bad)])
    assert "fails to render" in err
    err = _cli_error(capsys, [*common, "--run-dir", str(tmp_path / "c"), "--chat-template", "nope.jinja"])
    assert "neither 'auto', 'none' nor an existing file" in err
    assert not any((tmp_path / n).exists() for n in "abc")
    # --chat-template none joins the message contents: accepted
    assert load_prompts(str(tmp_path / "conv.jsonl")) == CONV


def test_generate_cli_renders_with_the_template(chat_dir, capsys):
    assert main(["generate", str(chat_dir), "--prompt", "hello", "--max-new-tokens", "30", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hello\u2502") and len(out.split("\u2502", 1)[1].strip()) < 30  # stopped at <|im_end|>


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json", "disk"])
def test_prompts_in_any_format_with_a_column(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_dict({"question": PROMPTS, "id": list(range(len(PROMPTS)))})
    path = tmp_path / f"p.{fmt}"
    if fmt == "csv":
        ds.to_csv(str(path))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "json":
        path.write_text(json.dumps([{"question": p} for p in PROMPTS]))
    else:
        ds.save_to_disk(str(path))
    assert load_prompts(str(path), column="question") == PROMPTS
    with pytest.raises(UserError, match="no column 'prompt' \\(columns: 'question'.*--prompt-column") as e:
        load_prompts(str(path))
    assert "\n" not in str(e.value)


def test_cli_ppo_reads_csv_prompts_with_a_column_and_tasks_still_work(plain_dir, tmp_path, capsys):
    (tmp_path / "p.csv").write_text("question,x\n" + "".join(f"{p},1\n" for p in PROMPTS))
    common = ["--policy", str(plain_dir), "--reward-fn", "proxrl.lm.tasks.arithmetic:reward_fn", "--total-updates",
              "1", "--rollout-size", "4", "--minibatch-size", "4", "--epochs", "1", "--max-new-tokens", "3",
              "--plot", "false"]
    err = _cli_error(capsys, ["ppo", *common, "--prompts", str(tmp_path / "p.csv"), "--run-dir", str(tmp_path / "a")])
    assert "p.csv has no column 'prompt' (columns: 'question', 'x'); pass --prompt-column" in err
    assert not (tmp_path / "a").exists()
    assert main(["ppo", *common, "--prompts", str(tmp_path / "p.csv"), "--prompt-column", "question",
                 "--run-dir", str(tmp_path / "b")]) == 0
    assert main(["ppo", *common, "--prompts", "arithmetic", "--run-dir", str(tmp_path / "c")]) == 0
    assert len(read_metrics(tmp_path / "b")) == 1 and len(read_metrics(tmp_path / "c")) == 1


# ------------------------------------------------------------------------------------------------ reward models


def _bpe_reward_model(root: Path) -> tuple[Path, object]:
    rm_tok = train_bpe_tokenizer(["the cat sat on the mat", "a dog said hello", "we go to the sun"] * 20, 300)
    rm = scalar_model_from_causal(build_tiny_gpt2(rm_tok, 1, 32, 2, n_positions=128, seed=7), head_std=0.5)
    return save_model_and_tokenizer(rm, rm_tok, root / "rm"), rm_tok


def test_reward_model_with_its_own_tokenizer_scores_the_decoded_text(plain_dir, tmp_path):
    rm_dir, rm_tok = _bpe_reward_model(tmp_path)
    tok = load_tokenizer(plain_dir)
    policy = load_causal_lm(plain_dir)
    ids, mask = left_pad(tokenize_prompts(tok, PROMPTS, 64), tok.pad_token_id)
    scorer = reward_model_scorer(str(rm_dir), tok, batch_size=4)
    assert scorer.components[0][2].retokenize
    ro = collect_rollout(ModelSet(policy, reference_from_policy(policy)), tok, ids, mask, list(PROMPTS), scorer,
                         max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    rm = load_scalar_model(rm_dir)
    for b, (p, c) in enumerate(zip(PROMPTS, ro.completions)):
        row = rm_tok(p, add_special_tokens=False)["input_ids"] + rm_tok(c, add_special_tokens=False)["input_ids"]
        row = torch.tensor([row + [rm_tok.eos_token_id]])
        with torch.no_grad():
            want = sequence_scores(rm, row, torch.ones_like(row), torch.tensor([row.shape[1] - 1]))
        assert abs(float(ro.scores[b]) - float(want[0])) < 1e-5, b
    assert ro.score_parts["reward_model"].equal(ro.scores)
    # the policy's token ids scored directly would give other numbers (the check above is not vacuous)
    same = reward_model_scorer(str(rm_dir), rm_tok)
    assert not same.components[0][2].retokenize


def test_reward_model_with_two_labels_is_one_line(plain_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = load_tokenizer(plain_dir)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1,
                                                     n_head=2, num_labels=2))
    save_model_and_tokenizer(model, tok, tmp_path / "rm2")
    err = _cli_error(capsys, ["ppo", "--policy", str(plain_dir), "--prompts", "arithmetic", "--reward-model",
                              str(tmp_path / "rm2"), "--run-dir", str(tmp_path / "run")])
    assert "has 2 labels" in err and not (tmp_path / "run").exists()


def test_combined_rewards_are_weighted_and_logged_by_name(plain_dir, tmp_path, capsys):
    rm_dir, _ = _bpe_reward_model(tmp_path)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = ["ppo", "--policy", str(plain_dir), "--prompts", str(tmp_path / "p.jsonl"), "--reward-fn",
              "tests/test_lm_ppo_data.py:count_a", "--reward-fn", "tests/test_lm_ppo_data.py:count_e",
              "--reward-model", str(rm_dir), "--total-updates", "2", "--rollout-size", "4", "--minibatch-size", "4",
              "--epochs", "1", "--plot", "false"]
    err = _cli_error(capsys, [*common, "--reward-weights", "1,2", "--run-dir", str(tmp_path / "bad")])
    assert "2 weights for 3 reward components (count_a, count_e, reward_model)" in err
    assert not (tmp_path / "bad").exists()
    assert main([*common, "--reward-weights", "0.5,2,-1", "--run-dir", str(tmp_path / "run")]) == 0
    for r in read_metrics(tmp_path / "run"):
        parts = (r["reward/count_a"], r["reward/count_e"], r["reward/reward_model"])
        assert math.isclose(r["score"], 0.5 * parts[0] + 2 * parts[1] - parts[2], rel_tol=1e-5, abs_tol=1e-5)
    assert any(r["reward/count_a"] > 0 for r in read_metrics(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------ PPO-ptx


def _ptx_files(tmp_path: Path) -> tuple[Path, list[str]]:
    f = tmp_path / "ptx.txt"
    f.write_text("\n".join(PTX_TEXT) + "\n")
    return f, ["the dog sat on the red bed.", "we see the cat and the hat on the mat.", "a ball is in the sea."]


def _held_out_nll(policy_dir: Path, texts: list[str]) -> float:
    tok = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir).eval()
    b = next(PtxBatches(texts, tok, seq_len=256, batch_size=1))
    with torch.no_grad():
        return float(ptx_loss(model, b["input_ids"], b["attention_mask"]))


def test_ptx_keeps_held_out_perplexity_lower(plain_dir, tmp_path):
    f, held = _ptx_files(tmp_path)
    kw = dict(total_updates=3, learning_rate=1e-2, ptx_seq_len=32)
    _train = lambda cfg: train_ppo(cfg, prompts=PROMPTS, reward_fn=count_a, progress=False)  # noqa: E731
    _train(_cfg(plain_dir, tmp_path / "ptx", ptx_coef=1.0, ptx_data=str(f), **kw))
    _train(_cfg(plain_dir, tmp_path / "no_ptx", **kw))
    rows = read_metrics(tmp_path / "ptx")
    assert all(math.isfinite(r["ptx_loss"]) for r in rows) and rows[-1]["ptx_loss"] < rows[0]["ptx_loss"]
    assert "ptx_loss" not in read_metrics(tmp_path / "no_ptx")[0]
    with_ptx = _held_out_nll(tmp_path / "ptx" / "policy", held)
    without = _held_out_nll(tmp_path / "no_ptx" / "policy", held)
    before = _held_out_nll(plain_dir, held)
    assert with_ptx < without - 0.1 and with_ptx < before, (with_ptx, without, before)


def test_ptx_resume_is_bit_exact(plain_dir, tmp_path):
    f, _ = _ptx_files(tmp_path)
    kw = dict(ptx_coef=0.5, ptx_data=str(f), ptx_seq_len=16, ptx_batch_size=3, checkpoint_every=1)
    _train = lambda cfg, **k: train_ppo(cfg, prompts=PROMPTS, reward_fn=count_a, progress=False, **k)  # noqa: E731
    _train(_cfg(plain_dir, tmp_path / "full", total_updates=3, **kw))
    _train(_cfg(plain_dir, tmp_path / "part", total_updates=2, **kw))
    state = json.loads((tmp_path / "part" / "checkpoints" / "step_000000002" / "state.json").read_text())
    assert state["loop"]["ptx"]["index"] > 0 or state["loop"]["ptx"]["epoch"] > 0
    _train(_cfg(plain_dir, tmp_path / "part", total_updates=3, **kw), resume=True)
    a = load_file(str(tmp_path / "full" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "full")[-1]["ptx_loss"] == read_metrics(tmp_path / "part")[-1]["ptx_loss"]


def test_empty_ptx_data_is_one_line(plain_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n")
    err = _cli_error(capsys, ["ppo", "--policy", str(plain_dir), "--prompts", str(tmp_path / "p.jsonl"),
                              "--reward-fn", "tests/test_lm_ppo_data.py:count_a", "--ptx-coef", "1",
                              "--ptx-data", str(tmp_path / "empty.txt"), "--run-dir", str(tmp_path / "run")])
    assert "empty.txt" in err and "no records" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ evaluation


def test_eval_every_logs_eval_metrics_and_leaves_training_unchanged(plain_dir, tmp_path):
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"q": p}) + "\n" for p in ["the sun", "a hat", "go"]))
    kw = dict(total_updates=3, prompt_column="q")
    train_ppo(_cfg(plain_dir, tmp_path / "eval", eval_prompts=str(tmp_path / "held.jsonl"), eval_every=2, **kw),
              prompts=PROMPTS, reward_fn=count_a, progress=False)
    train_ppo(_cfg(plain_dir, tmp_path / "plain", **kw), prompts=PROMPTS, reward_fn=count_a, progress=False)
    rows = read_metrics(tmp_path / "eval")
    assert "eval/reward_mean" not in rows[0]
    for r in rows[1:]:  # update 2 (every 2) and update 3 (the end)
        for k in ("eval/reward_mean", "eval/reward_std", "eval/ref_kl", "eval/win_rate", "eval/distinct_1",
                  "eval/response_length", "eval/ref_reward_mean"):
            assert k in r and math.isfinite(r[k]), k
        assert 0.0 <= r["eval/win_rate"] <= 1.0
    assert rows[-1]["eval/ref_kl"] > 0 and rows[-1]["eval/ref_reward_mean"] == rows[1]["eval/ref_reward_mean"]
    # evaluation draws from its own generator: the training is bit-identical to a run without it
    a = load_file(str(tmp_path / "eval" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ systems


def test_forward_batch_size_gives_the_same_rollout(plain_dir, tmp_path):
    rm_dir, _ = _bpe_reward_model(tmp_path)
    tok = load_tokenizer(plain_dir)
    policy = load_causal_lm(plain_dir)
    critic = scalar_model_from_causal(policy, head_std=0.3)
    ms = ModelSet(policy, reference_from_policy(policy), critic)
    ids, mask = left_pad(tokenize_prompts(tok, PROMPTS, 64), tok.pad_token_id)
    out = {}
    for fbs in (0, 4):
        scorer = reward_model_scorer(str(rm_dir), tok, batch_size=fbs)
        out[fbs] = collect_rollout(ms, tok, ids, mask, list(PROMPTS), scorer, max_new_tokens=10, temperature=1.0,
                                   generator=torch.Generator().manual_seed(3), forward_batch_size=fbs)
    a, b = out[0], out[4]
    assert torch.equal(a.input_ids, b.input_ids)
    assert (a.ref_logprobs - b.ref_logprobs).abs().max() < 1e-5
    assert (a.values - b.values).abs().max() < 1e-5 and a.values.abs().max() > 1e-3
    assert (a.scores - b.scores).abs().max() < 1e-5


def test_shared_value_head_takes_values_from_generation(plain_dir, tmp_path, monkeypatch):
    """With the value head on the policy, a rollout runs no policy forward besides generation."""
    import proxrl.lm.rollout as rollout_mod

    calls = []
    real = rollout_mod.response_forward

    def counting(model, *a, **k):
        calls.append(type(model).__name__)
        return real(model, *a, **k)

    monkeypatch.setattr(rollout_mod, "response_forward", counting)
    train_ppo(_cfg(plain_dir, tmp_path / "run", value_head_on_policy=True), prompts=PROMPTS, reward_fn=count_a,
              progress=False)
    assert calls and "PolicyWithValueHead" not in calls  # only the reference's forward
    assert math.isfinite(read_metrics(tmp_path / "run")[-1]["explained_variance"])


def test_gradient_checkpointing_recomputes_and_trains_the_same(plain_dir, tmp_path):
    weights, mlp_calls = {}, {}
    for gc in (False, True):
        cfg = _cfg(plain_dir, tmp_path / f"gc{gc}", gradient_checkpointing=gc, lora_r=4)
        trainer = PPOTrainer(cfg, PROMPTS, reward_fn=count_a, progress=False)
        n = [0]
        unwrap_model(trainer.models.policy).transformer.h[0].mlp.register_forward_pre_hook(
            lambda *a: n.__setitem__(0, n[0] + 1))  # a pre-hook: a recomputation may stop inside the MLP
        trainer.run()
        mlp_calls[gc] = n[0]
        weights[gc] = load_file(str(tmp_path / f"gc{gc}" / "policy" / "model.safetensors"))
    # each training forward's layer runs again in the backward: more MLP calls, same weights up to rounding
    assert mlp_calls[True] > mlp_calls[False], mlp_calls
    assert all((weights[True][k] - weights[False][k]).abs().max() < 1e-5 for k in weights[False])
    assert any(not torch.equal(weights[True][k], load_file(str(plain_dir / "model.safetensors"))[k])
               for k in weights[True])
