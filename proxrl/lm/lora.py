"""LoRA adapters (PEFT) on a causal LM or a scalar model.

``peft`` is imported by :func:`apply_lora` itself, on first use: its import adds ~100 MB of resident memory
(measured with torch and transformers already loaded), which every run without LoRA would otherwise carry.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from proxrl.errors import UserError
from proxrl.lm.heads import HEAD_NAMES, unwrap_model
from proxrl.lm.messages import describe

__all__ = ["apply_lora"]


def apply_lora(model: Any, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: Iterable[str] | None = None) -> Any:
    """Wrap ``model`` with PEFT LoRA adapters (only adapter weights, and a seq-cls head, stay trainable).

    ``target_modules=None`` lets peft choose its default for the architecture (``c_attn`` for GPT-2).
    Sequence-classification models get ``task_type=SEQ_CLS`` (their head is trained in full).
    """
    if r <= 0:
        raise UserError(f"LoRA rank r={r} must be a positive integer")
    from peft import LoraConfig, TaskType, get_peft_model  # on first use only: see the module docstring

    base = unwrap_model(model)
    seqcls = any(isinstance(getattr(base, n, None), nn.Module) for n in HEAD_NAMES)
    kw: dict[str, Any] = {}
    if getattr(base.config, "model_type", None) == "gpt2":
        kw["fan_in_fan_out"] = True  # GPT-2 uses Conv1D (transposed Linear)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=list(target_modules) if target_modules is not None else None,
                     task_type=TaskType.SEQ_CLS if seqcls else TaskType.CAUSAL_LM, **kw)
    try:
        return get_peft_model(model, cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot apply LoRA to {type(base).__name__} ({describe(e)}); pass target_modules "
                        f"naming its linear layers") from e
