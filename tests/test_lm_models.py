"""The model modules of proxrl.lm: tokenizers, loading errors, scalar heads at explicit positions, log-probs,
reference, LoRA."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.activations import NewGELUActivation
from transformers.utils import logging as hf_logging

from proxrl.errors import UserError
from proxrl.lm.builders import build_tiny_gpt2, scalar_model_from_causal
from proxrl.lm.heads import hidden_states, policy_with_value_head, sequence_scores, token_values
from proxrl.lm.layers import disable_dropout, fast_activations
from proxrl.lm.loading import (
    is_scalar_model_dir,
    load_causal_lm,
    load_policy_with_value_head,
    load_scalar_model,
    save_model_and_tokenizer,
)
from proxrl.lm.logprobs import logprobs_from_logits, response_forward
from proxrl.lm.lora import apply_lora
from proxrl.lm.positions import last_token_index, position_ids_from_mask
from proxrl.lm.reference import reference_context, reference_from_policy
from proxrl.lm.tokenization import (
    TOKENIZER_FINGERPRINT_FILE,
    check_tokenizer_fits,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

torch.set_num_threads(1)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Proximal policy optimization clips the probability ratio.",
    "A reward model scores a prompt and its completion.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_gpt2(tok, n_layer=2, n_embd=32, n_head=2, seed=0).eval()


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(["The quick brown fox jumps", "A", "Proximal policy"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def single_error_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# ------------------------------------------------------------------ tokenizers


def test_bpe_tokenizer_roundtrip_and_reload(tok, tmp_path):
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>"]) == [0, 1]
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.padding_side == "left"
    text = "Unseen wörds ✓ and\ttabs"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte level: nothing unknown
    tok.save_pretrained(tmp_path)

    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    loaded = load_tokenizer(tmp_path)
    assert loaded.padding_side == "left" and loaded.pad_token_id == 0
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)


def test_load_tokenizer_sets_pad_to_eos(tmp_path):
    base = train_bpe_tokenizer(TEXTS, 300)
    nopad = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<eos>")
    assert nopad.pad_token is None
    nopad.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == loaded.eos_token_id == 1
    assert loaded.padding_side == "left"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path / "nope")
    single_error_line(e, "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        load_tokenizer(tmp_path / "empty")
    single_error_line(e, "empty")


# ------------------------------------------------------------------ loading


def test_load_causal_lm_roundtrip(model, batch, tmp_path):
    ids, mask = batch
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path)
    assert not loaded.training
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask, position_ids=pos).logits,
                           model(ids, attention_mask=mask, position_ids=pos).logits)
    assert load_causal_lm(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_load_causal_lm_errors(model, tmp_path):
    with pytest.raises(UserError) as e:
        load_causal_lm(tmp_path / "missing")
    single_error_line(e, "missing", "does not exist")
    (tmp_path / "noconf").mkdir()
    with pytest.raises(UserError) as e:
        load_causal_lm(tmp_path / "noconf")
    single_error_line(e, "noconf", "config.json")
    d = tmp_path / "noweights"
    model.config.save_pretrained(d)
    with pytest.raises(UserError) as e:
        load_causal_lm(d)
    single_error_line(e, "noweights")
    d = tmp_path / "corrupt"
    model.save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError) as e:
        load_causal_lm(d)
    single_error_line(e, "corrupt")
    with pytest.raises(UserError):
        load_causal_lm(tmp_path / "noweights", dtype="float7")


def test_load_scalar_model(model, tok, batch, tmp_path):
    ids, mask = batch
    model.save_pretrained(tmp_path / "lm")
    with pytest.raises(UserError) as e:  # a causal LM is not a trained reward model
        load_scalar_model(tmp_path / "lm")
    single_error_line(e, "scalar head")
    rm = scalar_model_from_causal(tmp_path / "lm")
    with torch.no_grad():
        assert torch.equal(hidden_states(rm, ids, mask), hidden_states(model, ids, mask))
    save_model_and_tokenizer(rm, tok, tmp_path / "rm")
    again = load_scalar_model(tmp_path / "rm")
    with torch.no_grad():
        assert torch.equal(token_values(again, ids, mask), token_values(rm, ids, mask))
    check_tokenizer_fits(again, tok, tmp_path / "rm")


def test_loading_prints_nothing_and_problems_are_one_line(model, tok, tmp_path, capfd):
    """No transformers log output on any load (transformers' multi-line load report included); what is wrong with
    a directory is one UserError line from the loading info instead."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    hf = logging.getLogger("transformers")
    handler = Keep(level=logging.DEBUG)
    hf.addHandler(handler)
    verbosity = hf_logging.get_verbosity()
    try:
        model.save_pretrained(tmp_path / "lm")
        assert not is_scalar_model_dir(tmp_path / "lm")
        scalar_model_from_causal(tmp_path / "lm", head_std=0.0)  # score.weight missing: expected
        # a causal LM given where a trained reward model is needed, and a reward model given as a causal LM
        single_error_line(pytest.raises(UserError, load_scalar_model, tmp_path / "lm"), "GPT2LMHeadModel",
                          "not a reward model")
        rm = scalar_model_from_causal(model, head_std=0.5)
        save_model_and_tokenizer(rm, tok, tmp_path / "rm")
        assert is_scalar_model_dir(tmp_path / "rm")
        single_error_line(pytest.raises(UserError, load_causal_lm, tmp_path / "rm"), "not a causal LM")
        # a checkpoint that lacks a trunk weight
        sd = load_file(str(tmp_path / "lm" / "model.safetensors"))
        del sd[next(k for k in sd if k.endswith("attn.c_attn.bias"))]
        save_file(sd, str(tmp_path / "lm" / "model.safetensors"), metadata={"format": "pt"})
        single_error_line(pytest.raises(UserError, scalar_model_from_causal, tmp_path / "lm"), "trunk weights",
                          "c_attn.bias")
        single_error_line(pytest.raises(UserError, load_causal_lm, tmp_path / "lm"), "c_attn.bias")
    finally:
        hf.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err and err == "", err
    assert hf_logging.get_verbosity() == verbosity  # restored after each load


# ------------------------------------------------------------------ scalar heads


def test_scalar_model_from_causal_copies_trunk(model, batch):
    ids, mask = batch
    v = scalar_model_from_causal(model)
    assert v.config.num_labels == 1
    with torch.no_grad():
        assert torch.equal(hidden_states(v, ids, mask), hidden_states(model, ids, mask))
    # an independent copy: training the critic never moves the policy
    p_src = next(model.transformer.parameters())
    p_dst = next(v.transformer.parameters())
    assert p_src.data_ptr() != p_dst.data_ptr()
    with torch.no_grad():
        p_dst.add_(1.0)
    assert not torch.equal(p_src, p_dst)
    z = scalar_model_from_causal(model, head_std=0.0)
    with torch.no_grad():
        assert (token_values(z, ids, mask) == 0).all()


def test_token_values_and_sequence_scores(model, batch):
    ids, mask = batch
    v = scalar_model_from_causal(model).eval()
    with torch.no_grad():
        vals = token_values(v, ids, mask)
        h = v.transformer(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
        assert vals.shape == ids.shape and vals.dtype == torch.float32
        assert torch.allclose(vals, v.score(h).squeeze(-1))
        last = last_token_index(mask)
        assert last.tolist() == [ids.shape[1] - 1] * 3  # left padding: last column
        scores = sequence_scores(v, ids, mask, last)
        assert torch.allclose(scores, vals[torch.arange(3), last])
        mid = torch.tensor([1, 2, 3])
        assert torch.allclose(sequence_scores(v, ids, mask, mid), vals[torch.arange(3), mid])
        # HF's own pooling agrees on an unpadded batch (where it takes the last token)
        full = ids[:1]
        hf = v(full, attention_mask=torch.ones_like(full)).logits.squeeze(-1)
        assert torch.allclose(sequence_scores(v, full, torch.ones_like(full), torch.tensor([full.shape[1] - 1])),
                              hf, atol=1e-6)
    with pytest.raises(ValueError):
        sequence_scores(v, ids, mask, torch.tensor([1]))


def test_values_ignore_padding_content_and_amount(model, tok):
    v = scalar_model_from_causal(model).eval()
    one = torch.tensor([tok("The quick brown")["input_ids"]])
    n = one.shape[1]
    padded = torch.cat([torch.full((1, 3), 1), one], 1)  # pad with EOS (pad == eos case)
    pmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, n, dtype=torch.long)], 1)
    other = padded.clone()
    other[0, :3] = 7  # different junk in the padded slots
    with torch.no_grad():
        ref = token_values(v, one, torch.ones_like(one))
        a = token_values(v, padded, pmask)[:, 3:]
        b = token_values(v, other, pmask)[:, 3:]
    assert torch.allclose(a, ref, atol=1e-5) and torch.allclose(b, ref, atol=1e-5)


def test_last_token_index():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 0, 0]


# ------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_from_logits(temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 4).requires_grad_(True)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    out = logprobs_from_logits(logits, tokens, temperature)
    ref = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert out.shape == (3, 5) and torch.allclose(out, ref, atol=1e-6)
    (gout,) = torch.autograd.grad(out.sum(), logits)
    (gref,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(gout, gref, atol=1e-6)
    assert torch.allclose(logprobs_from_logits(logits[:, 0], tokens[:, 0], temperature), ref[:, 0], atol=1e-6)
    low = logprobs_from_logits(logits.detach().bfloat16(), tokens, temperature)
    assert low.dtype == torch.float32 and torch.allclose(low, ref.detach(), atol=0.1)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, tokens[:, :2])


# ------------------------------------------------------------------ shared-trunk critic


def test_policy_with_value_head_one_pass(model, batch, tmp_path):
    ids, mask = batch
    pv = policy_with_value_head(model, head_std=None)
    calls = []
    hook = model.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        logits, values = pv(ids, mask)
    finally:
        hook.remove()
    assert len(calls) == 1
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        h = model.transformer(ids, attention_mask=mask, position_ids=pos).last_hidden_state
    assert torch.allclose(logits, ref.logits, atol=1e-6)
    assert values.shape == ids.shape and torch.allclose(values, pv.value_head(h).squeeze(-1), atol=1e-6)
    (values.sum() + logits.mean()).backward()
    assert pv.value_head.weight.grad is not None and model.transformer.wte.weight.grad is not None
    model.zero_grad(set_to_none=True)
    pv.save_pretrained(tmp_path)
    again = load_policy_with_value_head(tmp_path)
    with torch.no_grad():
        l2, v2 = again(ids, mask)
    assert torch.allclose(l2, logits, atol=1e-6) and torch.allclose(v2, values, atol=1e-6)


# ------------------------------------------------------------------ reference / LoRA


def test_freeze_and_reference_copy(tok, batch):
    ids, mask = batch
    policy = build_tiny_gpt2(tok, 2, 32, 2, seed=1).train()
    ref = reference_from_policy(policy_with_value_head(policy))
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters()) and policy.training
    with torch.no_grad():
        before = response_forward(ref, ids, mask, 2).logprobs
        for p in policy.parameters():
            p.add_(0.1)
        assert torch.equal(response_forward(ref, ids, mask, 2).logprobs, before)
        with reference_context(ref) as r:
            assert r is ref


def test_lora_reference_context(tok, batch):
    ids, mask = batch
    base = build_tiny_gpt2(tok, 2, 32, 2, seed=2)
    with torch.no_grad():
        base_lp = response_forward(base, ids, mask, 2).logprobs
    policy = apply_lora(base, r=4, alpha=8)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # adapters now change the model
        tuned = response_forward(policy, ids, mask, 2).logprobs
        assert not torch.allclose(tuned, base_lp, atol=1e-4)
        ref = reference_from_policy(policy, use_lora_adapters=True)
        assert ref is policy
        policy.train()
        with reference_context(ref) as r:
            assert not r.training
            assert torch.allclose(response_forward(r, ids, mask, 2).logprobs, base_lp, atol=1e-6)
        assert policy.training
        assert torch.allclose(response_forward(policy, ids, mask, 2).logprobs, tuned, atol=1e-6)
    with pytest.raises(UserError):
        reference_from_policy(base.__class__(base.config), use_lora_adapters=True)
    with pytest.raises(UserError):
        apply_lora(build_tiny_gpt2(tok, 1, 16, 2), r=2, target_modules=["no_such_layer"])


def test_lora_on_scalar_model_and_merge(tok, batch):
    ids, mask = batch
    lm = apply_lora(build_tiny_gpt2(tok, 2, 32, 2, seed=3), r=2)
    v = scalar_model_from_causal(lm)  # merged copy, no adapters
    assert not hasattr(v, "peft_config")
    vl = apply_lora(v, r=2)
    with torch.no_grad():
        assert token_values(vl, ids, mask).shape == ids.shape
    assert any(p.requires_grad and "score" in n for n, p in vl.named_parameters())


# ------------------------------------------------------------------ builders & checks


def test_build_tiny_gpt2(tok):
    state = torch.random.get_rng_state()
    a = build_tiny_gpt2(tok, 2, 32, 2, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    b = build_tiny_gpt2(tok, 2, 32, 2, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.config.vocab_size == len(tok) and a.config.resid_pdrop == 0.0
    with pytest.raises(UserError):
        build_tiny_gpt2(tok, 2, 30, 4)
    c = disable_dropout(build_tiny_gpt2(tok, 1, 16, 2, dropout=0.3))
    assert all(m.p == 0 for m in c.modules() if isinstance(m, torch.nn.Dropout))


def test_check_tokenizer_fits(tok, tmp_path):
    small = build_tiny_gpt2(tok, 1, 16, 2)
    check_tokenizer_fits(small, tok)
    big_tok = train_bpe_tokenizer(TEXTS * 3 + ["zebra xylophone quartz"] * 5, 400)
    assert len(big_tok) > len(tok)
    with pytest.raises(UserError) as e:
        check_tokenizer_fits(small, big_tok)
    single_error_line(e, str(len(big_tok)), str(len(tok)))
    save_model_and_tokenizer(small, tok, tmp_path)
    assert json.loads((tmp_path / TOKENIZER_FINGERPRINT_FILE).read_text())["len"] == len(tok)
    other = train_bpe_tokenizer(["completely different corpus text"] * 30, 300)
    with pytest.raises(UserError) as e:
        check_tokenizer_fits(small, other, tmp_path)
    single_error_line(e, "different tokenizer")


def test_fast_activations_same_function_and_swapped(tok):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 32, requires_grad=True)
    ref, fast = NewGELUActivation(), torch.nn.GELU(approximate="tanh")
    assert torch.allclose(ref(x), fast(x), atol=1e-6)
    gr, = torch.autograd.grad(ref(x).sum(), x)
    gf, = torch.autograd.grad(fast(x).sum(), x)
    assert torch.allclose(gr, gf, atol=1e-5)
    model = build_tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=32, seed=0)
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert model.config.activation_function == "gelu_new"  # the saved config is unchanged
    assert fast_activations(model) is model
