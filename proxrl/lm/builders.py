"""Building models in memory: a tiny GPT-2 sized for a tokenizer, and a scalar (critic / reward) model whose trunk
is a copy of a causal LM's trunk."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from proxrl.errors import UserError
from proxrl.lm.heads import init_linear_head, merged_copy, model_trunk, scalar_head, unwrap_model
from proxrl.lm.layers import fast_activations
from proxrl.lm.loading import ensure_pad_id, load_scalar_model, resolve_dtype
from proxrl.lm.messages import describe

__all__ = ["build_tiny_gpt2", "scalar_model_from_causal"]


def build_tiny_gpt2(tokenizer: Any, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 256,
                    seed: int | None = None, dropout: float = 0.0, **config_kwargs: Any) -> Any:
    """A randomly initialised ``GPT2LMHeadModel`` sized for ``tokenizer`` (vocab = ``len(tokenizer)``).

    Dropout defaults to 0 (PPO's probability ratio must be exactly 1 before the first update). ``seed`` makes
    the init reproducible without touching the global RNG. Extra keyword arguments go to ``GPT2Config``.
    """
    if n_embd % n_head:
        raise UserError(f"n_embd {n_embd} is not divisible by n_head {n_head}; pick n_head dividing n_embd")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, summary_first_dropout=dropout,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
        else eos, **config_kwargs)
    if seed is None:
        model = GPT2LMHeadModel(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    return fast_activations(model)


def _init_head(model: Any, head_std: float | None) -> None:
    if head_std is not None:
        init_linear_head(scalar_head(model), head_std)


def scalar_model_from_causal(path_or_model: str | Path | Any, dtype: str | torch.dtype | None = None,
                             trust_remote_code: bool = False, head_std: float | None = None) -> Any:
    """A ``num_labels=1`` sequence-classification model whose trunk is a copy of a causal LM's trunk.

    Args:
        path_or_model: a local causal-LM directory, or an in-memory causal LM (a PEFT LoRA model is merged into
            a copy first). The source model is never modified and shares no parameters with the result.
        head_std: None keeps HF's head init (normal, std ``initializer_range``); 0 zero-initialises the head
            (critic starts at V=0); any other value draws the weights from N(0, head_std^2).

    Returns:
        the new model (train mode if built from a module, eval mode if loaded from a path).
    """
    if isinstance(path_or_model, (str, Path)):
        model = load_scalar_model(path_or_model, dtype=dtype, trust_remote_code=trust_remote_code,
                                  allow_new_head=True)
        _init_head(model, head_std)
        return model
    src = unwrap_model(merged_copy(path_or_model))
    cfg = copy.deepcopy(src.config)
    cfg.num_labels = 1
    try:
        model = AutoModelForSequenceClassification.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"model type {getattr(cfg, 'model_type', '?')!r} has no sequence-classification class "
                        f"({describe(e)}); use a GPT-2/Llama-style causal LM") from e
    missing, unexpected = model_trunk(model).load_state_dict(model_trunk(src).state_dict(), strict=False)
    if missing or unexpected:
        raise UserError(f"could not copy the causal LM trunk into the scalar model (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]})")
    param = next(src.parameters())
    model.to(dtype=resolve_dtype(dtype) if dtype not in (None, "auto") else param.dtype, device=param.device)
    ensure_pad_id(model)
    _init_head(model, head_std)
    fast_activations(model)
    model.train(src.training)
    return model
