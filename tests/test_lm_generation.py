"""proxrl.lm.generation: the KV-cache sampling loop against HF generate and a full-forward recomputation."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from proxrl.errors import UserError
from proxrl.lm.builders import build_tiny_gpt2
from proxrl.lm.generation import _filter_logits, _sample, generate
from proxrl.lm.heads import policy_with_value_head
from proxrl.lm.logprobs import response_forward
from proxrl.lm.lora import apply_lora
from proxrl.lm.reference import reference_context
from proxrl.lm.tokenization import train_bpe_tokenizer

torch.set_num_threads(1)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Proximal policy optimization clips the probability ratio.",
    "A language model assigns probabilities to sequences of tokens.",
    "def f(x):\n    return x + 1\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_gpt2(tok, n_layer=2, n_embd=32, n_head=2, seed=0).eval()


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(["The quick brown fox", "A", "Proximal policy optimization clips", "def f(x):"],
              return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # really left-padded, with different lengths
    assert enc["attention_mask"][:, -1].all()
    return enc["input_ids"], enc["attention_mask"]


def recompute(model, out, temperature):
    return response_forward(model, out.sequences, out.attention_mask, out.prompt_len, temperature).logprobs


def test_greedy_matches_hf_generate_with_left_padding(model, tok, batch):
    ids, mask = batch
    out = generate(model, ids, mask, max_new_tokens=12, temperature=0.0)
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                        eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert out.sequences.shape == (4, ids.shape[1] + 12)
    assert torch.equal(out.sequences, hf)
    assert out.response_mask.all() and not out.finished.any()
    assert torch.equal(out.attention_mask[:, : ids.shape[1]], mask)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 0.9)])
def test_logprobs_match_full_forward(model, batch, temperature, top_k, top_p):
    ids, mask = batch
    g = torch.Generator().manual_seed(1)
    out = generate(model, ids, mask, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=g)
    with torch.no_grad():
        ref = recompute(model, out, temperature)
    assert out.logprobs.shape == ref.shape == (4, 10)
    assert torch.allclose(out.logprobs, ref, atol=1e-5, rtol=0)
    assert (out.logprobs < 0).all()


def test_eos_handling_with_pad_equal_eos(model, batch):
    ids, mask = batch
    greedy = generate(model, ids, mask, max_new_tokens=8, temperature=0.0)
    resp = greedy.responses
    eos = int(resp[0, 2])  # row 0 emits this token at step 2 (maybe earlier too)
    first = [int((r == eos).nonzero()[0]) if (r == eos).any() else None for r in resp]
    out = generate(model, ids, mask, max_new_tokens=8, temperature=0.0, eos_token_id=eos, pad_token_id=eos)
    R = out.responses.shape[1]
    for i, f in enumerate(first):
        if f is None:
            assert out.response_mask[i].all() and not out.finished[i]
            assert torch.equal(out.responses[i], resp[i, :R])
        else:
            assert out.finished[i]
            assert out.response_mask[i, : f + 1].all() and not out.response_mask[i, f + 1:].any()
            assert torch.equal(out.responses[i, : f + 1], resp[i, : f + 1])
            assert (out.responses[i, f + 1:] == eos).all()
            assert (out.logprobs[i, f + 1:] == 0).all()
    assert torch.equal(out.attention_mask[:, out.prompt_len:], out.response_mask)
    # recomputation with the returned mask still matches on the valid positions (pad == eos is harmless)
    with torch.no_grad():
        ref = recompute(model, out, 1.0)
    m = out.response_mask.bool()
    assert torch.allclose(out.logprobs[m], ref[m], atol=1e-5)
    if all(f is not None for f in first):
        assert R == max(first) + 1  # stopped early once every row finished


def test_early_stop_when_all_rows_finish(model, batch):
    ids, mask = batch
    greedy = generate(model, ids, mask, max_new_tokens=1, temperature=0.0)
    eos = greedy.responses[:, 0].tolist()  # every row's first greedy token is an EOS
    out = generate(model, ids, mask, max_new_tokens=20, temperature=0.0, eos_token_id=eos)
    assert out.responses.shape == (4, 1) and out.finished.all() and out.response_mask.all()


def test_same_seed_same_samples(model, batch):
    ids, mask = batch
    a = generate(model, ids, mask, max_new_tokens=10, generator=torch.Generator().manual_seed(7))
    b = generate(model, ids, mask, max_new_tokens=10, generator=torch.Generator().manual_seed(7))
    c = generate(model, ids, mask, max_new_tokens=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_filters_equal_greedy(model, batch, kw):
    ids, mask = batch
    greedy = generate(model, ids, mask, max_new_tokens=8, temperature=0.0)
    out = generate(model, ids, mask, max_new_tokens=8, temperature=1.0,
                   generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(out.sequences, greedy.sequences)
    assert torch.allclose(out.logprobs, greedy.logprobs, atol=1e-6)  # unfiltered T=1 log-probs


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(_filter_logits(logits.clone(), 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(_filter_logits(logits.clone(), 0, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(_filter_logits(logits.clone(), 0, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(_filter_logits(logits.clone(), 0, 0.96)).tolist() == [[True, True, True, True]]


def test_inverse_cdf_sampler():
    probs = torch.tensor([[0.5, 0.3, 0.0, 0.2]]).repeat(20000, 1) * 3.0  # unnormalised is fine
    draws = _sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[2] == 0
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.0, 0.2]), atol=0.015)
    with pytest.raises(UserError):
        _sample(torch.tensor([[float("nan"), 1.0]]), None)


def test_sampling_distribution(model, tok):
    n = 4000
    ids = torch.tensor([tok("The quick")["input_ids"]] * n)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        probs = torch.softmax(model(ids[:1]).logits[0, -1] / 0.5, -1)
    out = generate(model, ids, mask, max_new_tokens=1, temperature=0.5, top_k=3,
                   generator=torch.Generator().manual_seed(0))
    top = torch.topk(probs, 3).indices
    counts = torch.bincount(out.responses[:, 0], minlength=probs.numel()).float()
    assert counts[top].sum() == n  # nothing outside the top 3
    expected = probs[top] / probs[top].sum()
    assert torch.allclose(counts[top] / n, expected, atol=0.04)


def test_stop_strings(model, tok, batch):
    ids, mask = batch
    greedy = generate(model, ids, mask, max_new_tokens=8, temperature=0.0)
    text = tok.decode(greedy.responses[1, :4].tolist())
    stop = text[-2:] if len(text) >= 2 else text
    out = generate(model, ids, mask, max_new_tokens=8, temperature=0.0, stop_strings=[stop], tokenizer=tok)
    assert out.finished[1]
    n = int(out.response_mask[1].sum())
    assert n <= 4 and stop in tok.decode(out.responses[1, :n].tolist())
    assert stop not in tok.decode(out.responses[1, : n - 1].tolist())
    with pytest.raises(UserError):
        generate(model, ids, mask, max_new_tokens=2, stop_strings=["x"])


def test_outputs_usable_in_autograd_and_value_head_model(model, batch):
    ids, mask = batch
    pv = policy_with_value_head(model)
    out = generate(pv, ids, mask, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert not torch.is_inference(out.sequences) and not torch.is_inference(out.logprobs)
    logits, values = pv(out.sequences, out.attention_mask)
    (logits.mean() + values.mean() + out.logprobs.mean()).backward()
    assert pv.value_head.weight.grad is not None
    pv.zero_grad(set_to_none=True)


def test_bad_arguments(model, batch):
    ids, mask = batch
    for kw in (dict(max_new_tokens=0), dict(max_new_tokens=2, top_p=0.0), dict(max_new_tokens=2, temperature=-1)):
        with pytest.raises(UserError):
            generate(model, ids, mask, **kw)


def test_generate_with_lora_policy(tok, batch):
    ids, mask = batch
    policy = apply_lora(build_tiny_gpt2(tok, 2, 32, 2, seed=4), r=2).train()
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = generate(policy, ids, mask, max_new_tokens=6, temperature=0.9, generator=torch.Generator().manual_seed(0))
    assert policy.training  # mode restored
    with torch.no_grad():
        assert torch.allclose(out.logprobs, recompute(policy, out, 0.9), atol=1e-5)
        with reference_context(policy) as ref:
            ref_greedy = generate(ref, ids, mask, max_new_tokens=6, temperature=0.0)
        tuned_greedy = generate(policy, ids, mask, max_new_tokens=6, temperature=0.0)
        with policy.disable_adapter():
            plain = generate(policy, ids, mask, max_new_tokens=6, temperature=0.0)
    assert torch.equal(ref_greedy.sequences, plain.sequences)
    assert not torch.equal(tuned_greedy.sequences, plain.sequences)  # the adapters do change the policy


@pytest.mark.parametrize("lora", [False, True])
def test_values_from_the_generation_pass_match_a_full_forward(tok, batch, lora):
    """return_values: the value head read on the sampling pass's hidden states equals the values of a full forward
    over the finished sequences (what the rollout used to compute with a second policy pass)."""
    ids, mask = batch
    policy = build_tiny_gpt2(tok, 2, 32, 2, seed=5).eval()
    if lora:
        policy = apply_lora(policy, r=2)
    pv = policy_with_value_head(policy, head_std=0.5)  # a non-zero head: the check can fail
    out = generate(pv, ids, mask, max_new_tokens=6, temperature=0.9, generator=torch.Generator().manual_seed(1),
                   return_values=True)
    with torch.no_grad():
        full = response_forward(pv, out.sequences, out.attention_mask, out.prompt_len, 0.9)
    m = out.response_mask.bool()
    assert out.values is not None and out.values.shape == out.logprobs.shape
    assert out.values.abs().max() > 1e-2
    assert (out.values[m] - full.values[m]).abs().max() < 1e-5
    assert (out.logprobs[m] - full.logprobs[m]).abs().max() < 1e-5
    assert (out.values[~m] == 0).all()
    # same samples as without values (the logits are the model's own), and no values unless asked for
    plain = generate(pv, ids, mask, max_new_tokens=6, temperature=0.9, generator=torch.Generator().manual_seed(1))
    assert plain.values is None and torch.equal(plain.sequences, out.sequences)
