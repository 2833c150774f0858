"""PPO over tokens (proxrl.lm.ppo / ppo_trainer / rollout): masks, reward placement, ratio == 1, learning, resume,
errors.

A tiny GPT-2 (1 layer, 32 dims) over a handmade character tokenizer keeps every run to a few seconds.
"""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from proxrl.cli import main
from proxrl.config import from_dict
from proxrl.errors import UserError
from proxrl.lm.builders import build_tiny_gpt2, scalar_model_from_causal
from proxrl.lm.heads import sequence_scores
from proxrl.lm.loading import load_causal_lm, load_scalar_model, save_model_and_tokenizer
from proxrl.lm.logprobs import response_forward
from proxrl.lm.positions import last_token_index, left_pad
from proxrl.lm.ppo import compute_advantages, token_gae, token_rewards
from proxrl.lm.ppo_config import PPOConfig, PPOSizes, ResolvedOptions
from proxrl.lm.ppo_trainer import train_ppo
from proxrl.lm.prompts import tokenize_prompts
from proxrl.lm.reference import reference_from_policy
from proxrl.lm.rollout import ModelSet, Rollout, collect_rollout
from proxrl.lm.scoring import reward_model_scorer
from proxrl.lm.tokenization import load_tokenizer
from proxrl.runs import RunDir, latest_checkpoint, load_checkpoint, read_metrics

CHARS = list("abcdefghijklmnopqrstuvwxyz .")
PROMPTS = ["the cat", "a dog", "hello", "we go", "sun", "my hat"]


def _char_tokenizer(out: Path, with_pad: bool) -> Path:
    """A character-level fast tokenizer; without ``with_pad`` load_tokenizer makes pad == eos."""
    vocab = {"<pad>": 0, "<eos>": 1} if with_pad else {"<eos>": 0}
    for c in CHARS:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    kw = {"pad_token": "<pad>"} if with_pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>", **kw)
    fast.save_pretrained(str(out))
    return out


def _make_policy(root: Path, with_pad: bool = True, seed: int = 0) -> Path:
    tok = load_tokenizer(_char_tokenizer(root / "tok", with_pad))
    model = build_tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=seed)
    return save_model_and_tokenizer(model, tok, root / "policy")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return _make_policy(tmp_path_factory.mktemp("ppo_policy"))


@pytest.fixture(scope="module")
def eos_pad_policy_dir(tmp_path_factory) -> Path:
    return _make_policy(tmp_path_factory.mktemp("ppo_policy_padeos"), with_pad=False, seed=3)


def count_a(prompts, completions):
    return [float(c.count("a")) for c in completions]


def _cfg(policy_dir: Path, run_dir: Path, **kw) -> PPOConfig:
    base = dict(policy=str(policy_dir), run_dir=str(run_dir), total_updates=3, rollout_size=8, group_size=1,
                minibatch_size=4, epochs=2, learning_rate=3e-3, max_new_tokens=8, temperature=0.7,
                sample_every=0, checkpoint_every=0, kl_coef=0.01, value_coef=0.5, seed=0, plot=False)
    base.update(kw)
    return PPOConfig(**base)


def _metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def _train(cfg: PPOConfig, reward_fn=count_a, **kw):
    return train_ppo(cfg, prompts=PROMPTS, reward_fn=reward_fn, progress=False, **kw)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kw, needle", [
    (dict(learning_rate=0.0), "learning_rate=0.0"),
    (dict(clip_coef=-0.1), "clip_coef=-0.1"),
    (dict(gamma=0.0), "gamma=0.0"),
    (dict(gamma=1.5), "gamma=1.5"),
    (dict(gae_lambda=1.2), "gae_lambda=1.2"),
    (dict(minibatch_size=64), "minibatch_size=64"),
    (dict(minibatch_size=5), "minibatch_size=5"),
    (dict(minibatch_size=4, grad_accum_steps=3), "grad_accum_steps=3"),
    (dict(advantage_estimator="grpo", group_size=1), "group_size"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(reward_weights="1,x"), "'x' is not a finite number"),
    (dict(eval_every=2), "give --eval-prompts"),
    (dict(ptx_coef=0.5), "give --ptx-data"),
    (dict(ptx_data="t.txt"), "ptx_coef is 0"),
    (dict(ptx_coef=-1.0, ptx_data="t.txt"), "ptx_coef=-1.0"),
    (dict(forward_batch_size=-1), "forward_batch_size=-1"),
])
def test_config_rejects_bad_values_with_one_line(kw, needle):
    base = dict(rollout_size=8, minibatch_size=4)
    base.update(kw)
    with pytest.raises(UserError) as e:
        PPOConfig(**base)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_sizes_and_kl_defaults():
    cfg = PPOConfig(rollout_size=4, group_size=4, minibatch_size=8, grad_accum_steps=2, advantage_estimator="grpo",
                    stop_strings="\\n,END", learning_rate=3e-4)
    s = PPOSizes.from_config(cfg)
    assert (s.batch_size, s.num_minibatches, s.micro_batch_size) == (16, 2, 4)
    o = ResolvedOptions.from_config(cfg)
    assert (o.kl_mode, o.kl_estimator, o.uses_critic) == ("loss", "k3", False)
    assert o.stop_strings == ("\n", "END") and o.critic_learning_rate == 3e-4
    o = ResolvedOptions.from_config(PPOConfig(kl_estimator="k2", critic_learning_rate=1e-3))
    assert (o.kl_mode, o.kl_estimator, o.uses_critic, o.stop_strings) == ("reward", "k2", True, ())
    assert o.critic_learning_rate == 1e-3


# ------------------------------------------------------------------------------------------------ masks / rewards


def test_token_rewards_and_gae_respect_response_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    scores = torch.tensor([2.0, -1.0, 0.5])
    kl = torch.full((3, 5), 0.1)
    r = token_rewards(scores, kl, mask, kl_coef=0.5)
    expect = -0.05 * mask
    expect[0, 2] += 2.0
    expect[1, 0] += -1.0
    expect[2, 4] += 0.5
    torch.testing.assert_close(r, expect)
    values = torch.randn(3, 5)
    adv, ret = token_gae(r, values, mask, gamma=1.0, lam=0.95)
    # garbage after the last response token must not leak into the advantages
    values2 = values.clone()
    values2[mask == 0] = 1e6
    adv2, _ = token_gae(r, values2, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, adv2)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # last token: A = r - V (terminal); one-token row: A = score - V
    torch.testing.assert_close(adv[1, 0], r[1, 0] - values[1, 0])
    torch.testing.assert_close(adv[0, 2], r[0, 2] - values[0, 2])


def _rollout(policy_dir: Path, prompts, temperature=0.7, max_new_tokens=24, seed=0):
    tok = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir)
    ref = reference_from_policy(policy)
    critic = scalar_model_from_causal(policy, head_std=0.02)
    ids, mask = left_pad(tokenize_prompts(tok, list(prompts), 64), tok.pad_token_id)
    seen = {}

    def score_fn(i, a, p, rmask, pr, comps):
        seen["args"] = (i, a, p, rmask)
        return torch.arange(len(comps), dtype=torch.float32) + 1.0

    ro = collect_rollout(ModelSet(policy, ref, critic), tok, ids, mask, list(prompts), score_fn,
                         max_new_tokens=max_new_tokens, temperature=temperature,
                         generator=torch.Generator().manual_seed(seed))
    return tok, policy, ro


def test_pad_equals_eos_score_lands_on_last_response_token(eos_pad_policy_dir):
    prompts = PROMPTS * 3
    tok, _, ro = _rollout(eos_pad_policy_dir, prompts, temperature=1.5, max_new_tokens=24, seed=1)
    assert tok.pad_token_id == tok.eos_token_id
    lengths = ro.response_mask.sum(1)
    assert ro.finished.any() and (~ro.finished).any(), "need rows that stop at EOS and rows that run out"
    assert len(set(lengths.tolist())) > 2, "need rows of different lengths"
    resp = ro.input_ids[:, ro.prompt_len:]
    last = last_token_index(ro.response_mask)
    rows = torch.arange(len(prompts))
    # (3) EOS itself is inside the response mask, and the mask is one contiguous run from 0
    for b in range(len(prompts)):
        n = int(lengths[b])
        assert ro.response_mask[b, :n].all() and not ro.response_mask[b, n:].any()
        if ro.finished[b]:
            assert resp[b, n - 1] == tok.eos_token_id
            assert (resp[b, :n - 1] != tok.eos_token_id).all()
    assert (resp[ro.finished, last[ro.finished]] == tok.eos_token_id).all()
    # (2) the score sits at the last response token, whatever the pad id
    r = token_rewards(ro.scores, None, ro.response_mask, 0.0)
    assert torch.equal(r[rows, last], ro.scores)
    r[rows, last] = 0
    assert (r == 0).all()
    # a pad-id based rule ("first pad") would put finished rows' score one token early or on prompt pads
    assert ro.values is not None and (ro.values[ro.response_mask == 0] == 0).all()


def test_rollout_logprobs_match_full_forward_at_sampling_temperature(policy_dir):
    _, policy, ro = _rollout(policy_dir, PROMPTS, temperature=0.7, max_new_tokens=10)
    with torch.no_grad():
        lp07, _, _ = response_forward(policy, ro.input_ids, ro.attention_mask, ro.prompt_len, 0.7)
        lp10, _, _ = response_forward(policy, ro.input_ids, ro.attention_mask, ro.prompt_len, 1.0)
    m = ro.response_mask.bool()
    assert (lp07[m] - ro.logprobs[m]).abs().max() < 1e-5
    assert (lp10[m] - ro.logprobs[m]).abs().max() > 1e-2  # the check can fail: temperature matters
    # reference == policy before training: ref log-probs equal the sampling log-probs
    assert (ro.ref_logprobs[m] - ro.logprobs[m]).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------------ training


def test_ratio_is_one_on_first_minibatch_of_every_update(policy_dir, tmp_path):
    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=3, temperature=0.7, epochs=2, plot=True)
    _train(cfg)
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3
    for r in rows:
        assert abs(r["approx_kl_first"]) < 1e-6
        assert abs(r["ratio_first"] - 1.0) < 1e-5
    assert rows[-1]["approx_kl"] > 1e-6  # later minibatches do move the policy
    for k in ("score", "reward", "ref_kl", "ref_kl_k3", "approx_kl", "clipfrac", "policy_loss", "value_loss",
              "entropy", "explained_variance", "kl_coef", "response_length", "eos_rate", "tokens_per_second",
              "time_generation", "time_scoring", "time_training"):
        assert k in rows[-1], k
    # KL to the reference: ~0 while the policy is the reference (first rollout), clearly > 0 once it has moved
    assert rows[0]["ref_kl"] < 1e-4 and rows[0]["ref_kl_k3"] < 1e-6
    assert rows[-1]["ref_kl_k3"] > 1e-4 and rows[-1]["ref_kl"] > 1e-4
    pngs = sorted(p.name for p in (tmp_path / "run" / "plots").glob("*.png"))
    assert "reward.png" in pngs and "kl.png" in pngs


def _rises(rows, key="score", k=3):
    first = sum(r[key] for r in rows[:k]) / k
    last = sum(r[key] for r in rows[-k:]) / k
    return first, last


def test_ppo_gae_learns_to_say_a(policy_dir, tmp_path):
    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=20, sample_every=10)
    _train(cfg)
    rows = _metrics(tmp_path / "run")
    first, last = _rises(rows)
    assert last > first + 2.0, (first, last)
    assert "| prompt | completion |" in (tmp_path / "run" / "samples.md").read_text()


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_learn(policy_dir, tmp_path, estimator):
    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=18, rollout_size=4, group_size=4, minibatch_size=8,
               advantage_estimator=estimator)
    _train(cfg)
    rows = _metrics(tmp_path / "run")
    first, last = _rises(rows)
    assert last > first + 2.0, (estimator, first, last)
    assert not (tmp_path / "run" / "critic").exists()
    if estimator == "grpo":
        assert rows[-1]["kl_loss"] > 0  # KL enters as a k3 loss term
        assert rows[-1]["non_score_reward"] == 0


def test_k3_loss_mode_with_gae(policy_dir, tmp_path):
    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=3, kl_mode="loss", kl_coef=0.1, entropy_coef=0.01,
               grad_accum_steps=2, lr_schedule="linear", target_kl=10.0)
    _train(cfg)
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["kl_loss"] > 0 and all(r["non_score_reward"] == 0 for r in rows)


def test_adaptive_kl_moves_towards_target(policy_dir, tmp_path):
    target = 0.5
    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=8, adaptive_kl=True, kl_target=target, kl_horizon=40,
               kl_coef=0.05)
    _train(cfg)
    rows = _metrics(tmp_path / "run")
    moved = 0
    for a, b in zip(rows, rows[1:]):
        err = max(min(a["ref_kl"] / target - 1, 0.2), -0.2)
        expect = a["kl_coef"] * (1 + err * cfg.rollout_size / cfg.kl_horizon)
        assert math.isclose(b["kl_coef"], expect, rel_tol=1e-9)
        if abs(err) > 1e-3:
            assert (b["kl_coef"] > a["kl_coef"]) == (a["ref_kl"] > target)
            moved += 1
    assert any(r["ref_kl"] > target for r in rows) and any(r["ref_kl"] < target for r in rows)
    assert moved >= 5


def test_resume_is_bit_exact(policy_dir, tmp_path):
    full = _cfg(policy_dir, tmp_path / "full", total_updates=3, checkpoint_every=1)
    _train(full)
    part = _cfg(policy_dir, tmp_path / "part", total_updates=2, checkpoint_every=1)
    _train(part)
    more = _cfg(policy_dir, tmp_path / "part", total_updates=3, checkpoint_every=1)
    _train(more, resume=True)
    for sub in ("policy", "critic"):
        a = load_file(str(tmp_path / "full" / sub / "model.safetensors"))
        b = load_file(str(tmp_path / "part" / sub / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    # and training did change the weights (the comparison is not vacuous)
    p0 = load_file(str(policy_dir / "model.safetensors"))
    a = load_file(str(tmp_path / "full" / "policy" / "model.safetensors"))
    assert any(not torch.equal(p0[k], a[k]) for k in a if k in p0)
    ma, mb = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [r["step"] for r in mb] == [1, 2, 3]
    assert ma[-1]["score"] == mb[-1]["score"] and ma[-1]["policy_loss"] == mb[-1]["policy_loss"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "policy"))
    assert model.config.n_layer == 1


def test_lora_and_shared_value_head_run(policy_dir, tmp_path):
    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=2, lora_r=4, value_head_on_policy=True)
    _train(cfg)
    rows = _metrics(tmp_path / "run")
    assert abs(rows[0]["approx_kl_first"]) < 1e-6 and math.isfinite(rows[-1]["value_loss"])
    assert (tmp_path / "run" / "policy" / "value_head.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "policy"))


# ------------------------------------------------------------------------------------------------ errors


def test_reward_fn_nan_or_raise_is_user_error_naming_sample(policy_dir, tmp_path):
    def nan_fn(prompts, completions):
        out = [1.0] * len(completions)
        out[3] = float("nan")
        return out

    with pytest.raises(UserError, match="3"):
        _train(_cfg(policy_dir, tmp_path / "a", total_updates=1), reward_fn=nan_fn)

    def bad_fn(prompts, completions):
        raise ValueError("boom")

    with pytest.raises(UserError) as e:
        _train(_cfg(policy_dir, tmp_path / "b", total_updates=1), reward_fn=bad_fn)
    assert "\n" not in str(e.value)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(policy_dir, tmp_path):
    calls = {"n": 0}

    def explode_at_update_3(prompts, completions):
        calls["n"] += 1
        return [1e38 if calls["n"] >= 3 else float(c.count("a")) for c in completions]

    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=5, checkpoint_every=1)
    with pytest.raises(UserError) as e:
        _train(cfg, reward_fn=explode_at_update_3)
    msg = str(e.value)
    assert "non-finite" in msg and "update 3" in msg and "step_000000002" in msg and "\n" not in msg
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step_000000002"
    tensors, state = load_checkpoint(ckpt)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())


def test_reward_model_scores_at_last_response_token(policy_dir, tmp_path):
    tok = load_tokenizer(policy_dir)
    rm = scalar_model_from_causal(policy_dir, head_std=0.5)
    rm_dir = save_model_and_tokenizer(rm, tok, tmp_path / "rm")
    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=2, reward_model=str(rm_dir))
    tok, _, ro = _rollout(policy_dir, PROMPTS, max_new_tokens=8)
    score = reward_model_scorer(str(rm_dir), tok)
    got = score(ro.input_ids, ro.attention_mask, ro.prompt_len, ro.response_mask, ro.prompts, ro.completions)
    # reference: score each row alone, trimmed to exactly prompt + response (no padding at all)
    rm = load_scalar_model(rm_dir)
    for b in range(len(PROMPTS)):
        keep = ro.attention_mask[b].bool()
        ids = ro.input_ids[b][keep][None]
        with torch.no_grad():
            want = sequence_scores(rm, ids, torch.ones_like(ids), torch.tensor([ids.shape[1] - 1]))
        assert abs(float(got[b]) - float(want[0])) < 1e-4

    train_ppo(cfg, prompts=PROMPTS, progress=False)
    assert len(_metrics(tmp_path / "run")) == 2


def test_cli_style_resume_reads_prompts_and_reward_spec_from_run(policy_dir, tmp_path, monkeypatch):
    # bf16 on the CPU runs (slowly, emulated) where the CPU lacks native bf16, which --bf16 true refuses: the probe
    # says yes so that this run, and its resume, take the bf16 path on every machine
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    fn_file = tmp_path / "rew.py"
    fn_file.write_text("def reward(prompts, completions):\n    return [float(c.count('e')) for c in completions]\n")
    cfg = _cfg(policy_dir, tmp_path / "run", total_updates=1, reward_fn=f"{fn_file}:reward", bf16=True,
               checkpoint_every=1)
    train_ppo(cfg, prompts=PROMPTS, progress=True)
    saved = RunDir(tmp_path / "run").read_config()
    assert saved.pop("run_info") == {"device": "cpu", "processes": 1}  # where it ran: not an option
    saved["total_updates"] = 2
    train_ppo(from_dict(PPOConfig, saved), resume=True, progress=False)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["policy_loss"]) for r in rows)
    with pytest.raises(UserError, match="already"):
        train_ppo(cfg, prompts=PROMPTS, progress=False)


def test_score_shaping_and_kl_in_reward():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0], [-0.5, 0.0, 0.0]])
    ref = lp - 0.1 * mask  # k1 = +0.1 on every response token
    ro = Rollout(input_ids=torch.zeros(3, 5, dtype=torch.long), attention_mask=torch.ones(3, 5, dtype=torch.long),
                 prompt_len=2, response_mask=mask, logprobs=lp, ref_logprobs=ref, values=torch.zeros(3, 3),
                 scores=torch.tensor([1.0, 5.0, -5.0]), finished=torch.tensor([True, False, True]),
                 prompts=["a"] * 3, completions=["b"] * 3)
    cfg = PPOConfig(rollout_size=3, minibatch_size=3, reward_clip=2.0, missing_eos_penalty=1.0, length_penalty=0.1,
                    kl_coef=0.5, gamma=1.0, gae_lambda=1.0, normalize_advantages=False)
    stats = compute_advantages(ro, cfg, ResolvedOptions.from_config(cfg), kl_coef=0.5)
    torch.testing.assert_close(ro.shaped_scores, torch.tensor([1.0 - 0.2, 2.0 - 1.0 - 0.3, -2.0 - 0.1]))
    expect = -0.05 * mask
    expect[0, 1] += 0.8
    expect[1, 2] += 0.7
    expect[2, 0] += -2.1
    torch.testing.assert_close(ro.rewards, expect)
    # gamma = lambda = 1 and V = 0: the advantage is the reward-to-go
    torch.testing.assert_close(ro.advantages, expect.flip(1).cumsum(1).flip(1) * mask)
    assert math.isclose(stats["ref_kl"], (0.2 + 0.3 + 0.1) / 3, rel_tol=1e-5)
    # k3 = (r - 1) - log r with r = ref / pi = exp(-0.1) on each of the 6 response tokens, averaged over 3 rows
    assert math.isclose(stats["ref_kl_k3"], 6 * (math.exp(-0.1) - 1 + 0.1) / 3, rel_tol=1e-4)
    assert math.isclose(stats["eos_rate"], 2 / 3, rel_tol=1e-6)


def _slow_token_rewards_and_gae(scores, kl, values, mask, kl_coef, gamma, lam):
    """Reference: per-token rewards and GAE with plain Python loops over each row (float64 throughout)."""
    B, R = mask.shape
    rewards = [[0.0] * R for _ in range(B)]
    adv = [[0.0] * R for _ in range(B)]
    ret = [[0.0] * R for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())  # contiguous response of n tokens
        for t in range(n):
            rewards[b][t] = -kl_coef * float(kl[b, t])
        if n:
            rewards[b][n - 1] += float(scores[b])
        last = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0  # terminal after the last token
            delta = rewards[b][t] + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + float(values[b, t])
    return (torch.tensor(rewards, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
            torch.tensor(ret, dtype=torch.float64))


def test_token_rewards_and_gae_keep_float64_and_match_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    B, R = 7, 11
    lengths = torch.tensor([11, 1, 5, 0, 8, 3, 11])
    mask = (torch.arange(R)[None] < lengths[:, None]).double()
    scores = torch.randn(B, generator=g, dtype=torch.float64) * 3
    kl = torch.randn(B, R, generator=g, dtype=torch.float64).abs() * mask
    values = torch.randn(B, R, generator=g, dtype=torch.float64) * mask
    gamma, lam, kl_coef = 0.97, 0.9, 0.3
    rewards = token_rewards(scores, kl, mask, kl_coef)
    adv, ret = token_gae(rewards, values, mask, gamma, lam)
    assert rewards.dtype == adv.dtype == ret.dtype == torch.float64
    want_r, want_a, want_ret = _slow_token_rewards_and_gae(scores, kl, values, mask, kl_coef, gamma, lam)
    assert (rewards - want_r).abs().max() < 1e-12
    assert (adv - want_a).abs().max() < 1e-12 and (ret - want_ret).abs().max() < 1e-12
    # the float32 path gives the same numbers to float32 precision only (the check above is not vacuous)
    a32, _ = token_gae(rewards.float(), values.float(), mask.float(), gamma, lam)
    assert a32.dtype == torch.float32 and 1e-12 < (a32.double() - want_a).abs().max() < 1e-4


def test_target_kl_early_stop_stops_the_update(policy_dir, tmp_path):
    # a tiny target: the first minibatch's step (ratio 1, approx_kl ~ 0) runs, the second minibatch's KL is above it
    _train(_cfg(policy_dir, tmp_path / "stop", total_updates=2, epochs=3, target_kl=1e-9))
    _train(_cfg(policy_dir, tmp_path / "free", total_updates=2, epochs=3))
    stop, free = _metrics(tmp_path / "stop"), _metrics(tmp_path / "free")
    steps_per_update = 3 * (8 // 4)  # epochs x minibatches
    assert all(r["optimizer_steps"] == steps_per_update and r["early_stopped"] == 0 for r in free)
    assert all(r["early_stopped"] == 1 and r["epochs_done"] == 0 for r in stop)
    assert all(1 <= r["optimizer_steps"] < steps_per_update for r in stop)
    assert stop[0]["optimizer_steps"] == 1 and stop[0]["approx_kl"] <= 1e-9


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_of_a_copied_run_works_on_the_copy_only(policy_dir, tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS))
    (tmp_path / "r.py").write_text("def score(prompts, completions):\n"
                                   "    return [float(c.count('a')) for c in completions]\n")
    common = ["--policy", str(policy_dir), "--prompts", str(tmp_path / "p.jsonl"), "--reward-fn",
              f"{tmp_path / 'r.py'}:score", "--rollout-size", "4", "--minibatch-size", "4", "--epochs", "1",
              "--max-new-tokens", "4", "--checkpoint-every", "1", "--keep-checkpoints", "5", "--plot", "false"]
    run_a, run_b = tmp_path / "runA", tmp_path / "runB"
    assert main(["ppo", *common, "--run-dir", str(run_a), "--total-updates", "2"]) == 0
    shutil.copytree(run_a, run_b)
    before = _files(run_a)
    assert main(["ppo", "--resume", str(run_b), "--total-updates", "4"]) == 0
    assert _files(run_a) == before  # the original is untouched, byte for byte
    assert [r["step"] for r in _metrics(run_b)] == [1, 2, 3, 4]
    assert (run_b / "checkpoints" / "step_000000004").is_dir()

    assert RunDir(run_b).read_config()["run_dir"] == str(run_b)


def test_resume_rewrites_no_sample_table_and_refuses_fewer_updates(policy_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _cfg(policy_dir, run, total_updates=4, checkpoint_every=2, keep_checkpoints=5, sample_every=1,
               sample_rows=1)
    _train(cfg)
    tables = (run / "samples.md").read_text().count("### update")
    assert tables == 4
    # as if the run had been killed after update 4 but before its last checkpoint: the newest one is update 2
    shutil.rmtree(run / "checkpoints" / "step_000000004")
    _train(cfg, resume=True)
    text = (run / "samples.md").read_text()
    assert [int(x) for x in re.findall(r"### update (\d+)", text)] == [1, 2, 3, 4], text
    # a total below the updates already done is refused, and config.yaml is not rewritten by a refused resume
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(UserError, match="below the 4 updates") as e:
        _train(_cfg(policy_dir, run, total_updates=3, checkpoint_every=2, keep_checkpoints=5), resume=True)
    assert "\n" not in str(e.value)
    assert (run / "config.yaml").read_bytes() == config
    with pytest.raises(UserError, match="no config.yaml|holds no run"):
        _train(_cfg(policy_dir, tmp_path / "nothing", total_updates=2), resume=True)
    assert not (tmp_path / "nothing" / "config.yaml").exists()
    assert RunDir(run).read_config()["total_updates"] == 4


def test_linear_lr_follows_the_raised_total_after_resume(policy_dir, tmp_path):
    lr = 3e-3
    _train(_cfg(policy_dir, tmp_path / "run", total_updates=2, lr_schedule="linear", learning_rate=lr))
    _train(_cfg(policy_dir, tmp_path / "run", total_updates=4, lr_schedule="linear", learning_rate=lr), resume=True)
    got = [r["lr"] for r in _metrics(tmp_path / "run")]
    assert got == [lr * (1 - 0 / 2), lr * (1 - 1 / 2), lr * (1 - 2 / 4), lr * (1 - 3 / 4)], got
