"""Transitional re-exports of the modules ``proxrl/lm/models.py`` was split into; import from those instead.

tokenization (tokenizers), loading (load/save), builders (tiny GPT-2, scalar model from a causal LM), heads (scalar
heads, value head), logprobs (response log-probs), positions (padding / positions), layers (fast GELU, dropout),
reference (frozen reference), lora (LoRA adapters).
"""
from proxrl.lm.builders import build_tiny_gpt2, scalar_model_from_causal  # noqa: F401
from proxrl.lm.heads import (  # noqa: F401
    VALUE_HEAD_FILE,
    PolicyWithValueHead,
    hidden_states,
    policy_with_value_head,
    sequence_scores,
    token_values,
    unwrap_model,
)
from proxrl.lm.layers import disable_dropout, fast_activations  # noqa: F401
from proxrl.lm.loading import (  # noqa: F401
    is_scalar_model_dir,
    load_causal_lm,
    load_policy_with_value_head,
    load_scalar_model,
    save_model_and_tokenizer,
)
from proxrl.lm.logprobs import logprobs_from_logits, response_forward  # noqa: F401
from proxrl.lm.lora import apply_lora  # noqa: F401
from proxrl.lm.positions import last_token_index, left_pad, position_ids_from_mask  # noqa: F401
from proxrl.lm.reference import freeze, reference_context, reference_from_policy  # noqa: F401
from proxrl.lm.tokenization import (  # noqa: F401
    TOKENIZER_FINGERPRINT_FILE,
    check_tokenizer_fits,
    load_tokenizer,
    read_tokenizer_fingerprint,
    saved_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
    write_tokenizer_fingerprint,
)

_unwrap = unwrap_model
