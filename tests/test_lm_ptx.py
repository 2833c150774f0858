"""proxrl.lm.ptx: the PPO-ptx pretraining loss (hand-computed NLL) and its seeded, resumable batch iterator."""
import json
import math

import pytest

pytest.importorskip("tokenizers")

import torch  # noqa: E402

from proxrl.errors import UserError  # noqa: E402
from proxrl.lm.ptx import PtxBatches, ptx_loss  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "two plus three is five", "the sun is hot today",
         "birds fly over the sea", "we read a long book"] * 6


@pytest.fixture(scope="module")
def tok():
    from proxrl.lm.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def model(tok):
    from proxrl.lm.builders import build_tiny_gpt2

    return build_tiny_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=0).eval()


def _hand_nll(model, rows):
    """Sum and count of -log p(x_t | x_<t) over t >= 1, each row run alone with positions 0..n-1, log_softmax
    written out as x - log(sum(exp(x)))."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row])
        logits = model(input_ids=ids, position_ids=torch.arange(len(row))[None]).logits[0].double()
        for t in range(1, len(row)):
            z = logits[t - 1]
            total += -(z[row[t]] - torch.log(torch.exp(z).sum())).item()
            count += 1
    return total, count


def test_ptx_loss_matches_hand_computed_nll_with_padding(model):
    rows = [[5, 17, 99, 42, 7, 120], [33, 8, 250], [61, 62, 63, 64]]
    pad = 0
    width = max(map(len, rows))
    # left padding for the first two rows, right padding for the last: positions come from the mask either way
    ids = torch.full((3, width), pad)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, r in enumerate(rows):
        if i < 2:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        else:
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
    total, count = _hand_nll(model, rows)
    assert count == 5 + 2 + 3
    with torch.no_grad():
        got = ptx_loss(model, ids, mask)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_ptx_loss_uniform_model_is_log_vocab(tok):
    from proxrl.lm.builders import build_tiny_gpt2

    m = build_tiny_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=1)
    m.lm_head = torch.nn.Linear(16, len(tok), bias=False)
    torch.nn.init.zeros_(m.lm_head.weight)  # every logit 0: p = 1/V for every token
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    assert ptx_loss(m, ids, torch.ones_like(ids)).item() == pytest.approx(math.log(len(tok)), rel=1e-6)


def test_ptx_loss_gradient_and_value_head_wrapper(tok):
    from proxrl.lm.builders import build_tiny_gpt2
    from proxrl.lm.heads import policy_with_value_head

    m = build_tiny_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=2)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    loss = ptx_loss(m, ids, mask)
    loss.backward()
    assert m.transformer.wte.weight.grad.abs().sum() > 0
    wrapped = policy_with_value_head(m)
    with torch.no_grad():
        assert ptx_loss(wrapped, ids, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    # no target at all (one real token per row): 0, still differentiable
    one = torch.tensor([[0, 3]])
    z = ptx_loss(m, one, torch.tensor([[0, 1]]))
    assert z.item() == 0.0 and z.requires_grad


def test_ptx_loss_shape_check(model):
    with pytest.raises(ValueError, match="must both be"):
        ptx_loss(model, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- batches


def test_blocks_are_the_eos_joined_stream(tok):
    it = PtxBatches(TEXTS, tok, seq_len=8, batch_size=4, seed=0)
    stream = []
    for t in TEXTS:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 8
    assert it.num_blocks == n and it.block_len == 8
    assert it.blocks.flatten().tolist() == stream[:n * 8]
    b = next(it)
    assert b["input_ids"].shape == (4, 8) and b["input_ids"].dtype == torch.long
    assert torch.equal(b["attention_mask"], torch.ones(4, 8, dtype=torch.long))


def test_each_epoch_visits_every_block_once_and_is_seeded(tok):
    texts = [f"doc {i} {t}" for i, t in enumerate(TEXTS)]
    a = PtxBatches(texts, tok, seq_len=8, batch_size=5, seed=3)
    n = a.num_blocks
    rows = [tuple(r.tolist()) for _ in range(2 * n) for r in next(a)["input_ids"]]  # 10 epochs' worth
    blocks = sorted(tuple(r.tolist()) for r in a.blocks)
    for e in range(10):
        assert sorted(rows[e * n:(e + 1) * n]) == blocks  # each epoch is a permutation of the blocks
    assert rows[:n] != rows[n:2 * n]  # a new order each epoch
    rows = torch.tensor(rows)
    b = PtxBatches(texts, tok, seq_len=8, batch_size=5, seed=3)
    assert all(torch.equal(next(b)["input_ids"], rows[i * 5:(i + 1) * 5]) for i in range(6))
    c = PtxBatches(texts, tok, seq_len=8, batch_size=5, seed=4)
    assert not torch.equal(next(c)["input_ids"], rows[:5])


def test_resume_from_state_dict_is_exact(tok):
    a = PtxBatches(TEXTS, tok, seq_len=8, batch_size=7, seed=1)
    k = a.num_blocks // 7 + 1  # past the first epoch boundary
    for _ in range(k):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["epoch"] == 1
    b = PtxBatches(TEXTS, tok, seq_len=8, batch_size=7, seed=1)
    b.load_state_dict(state)
    for _ in range(2 * a.num_blocks // 7 + 2):
        assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])
    other = PtxBatches(TEXTS[:-1], tok, seq_len=8, batch_size=7, seed=1)
    with pytest.raises(UserError, match="same --ptx-data"):
        other.load_state_dict(state)
    with pytest.raises(UserError, match="seed"):
        PtxBatches(TEXTS, tok, seq_len=8, batch_size=7, seed=2).load_state_dict(state)


def test_short_stream_is_one_block(tok):
    it = PtxBatches(["the cat"], tok, seq_len=64, batch_size=3)
    assert it.num_blocks == 1 and it.block_len == len(tok("the cat", add_special_tokens=False)["input_ids"]) + 1
    assert next(it)["input_ids"].shape == (3, it.block_len)


@pytest.mark.parametrize("texts", [[], ["", "   "], ["x"]])
def test_empty_ptx_data_one_line(tok, texts):
    with pytest.raises(UserError) as e:
        PtxBatches(texts, tok, seq_len=8, batch_size=2, add_eos=False, source="ptx.txt")
    msg = str(e.value)
    assert msg.startswith("ptx.txt holds no text") and "--ptx-data" in msg and "\n" not in msg


def test_bad_sizes(tok):
    with pytest.raises(UserError, match=">= 2"):
        PtxBatches(TEXTS, tok, seq_len=1, batch_size=2)
    with pytest.raises(UserError, match=">= 1"):
        PtxBatches(TEXTS, tok, seq_len=8, batch_size=0)
    with pytest.raises(UserError, match="one string"):
        PtxBatches("the cat", tok, seq_len=8, batch_size=2)


def test_ptx_training_lowers_ptx_loss(tok):
    """gamma * ptx_loss as the only loss: a few AdamW steps on PtxBatches lower the NLL of that text."""
    from proxrl.lm.builders import build_tiny_gpt2

    m = build_tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=32, seed=0)
    it = PtxBatches(TEXTS, tok, seq_len=16, batch_size=8, seed=0)
    held = {"input_ids": it.blocks, "attention_mask": torch.ones_like(it.blocks)}
    with torch.no_grad():
        before = ptx_loss(m, **held).item()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(30):
        b = next(it)
        loss = 0.5 * ptx_loss(m, b["input_ids"], b["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = ptx_loss(m, **held).item()
    assert after < before - 1.0, (before, after)
