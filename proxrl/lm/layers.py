"""Layer swaps on a built or loaded model: transformers' Python GELU for the fused one, dropout off."""
from __future__ import annotations

from typing import Any

from torch import nn
from transformers.activations import NewGELUActivation

__all__ = ["fast_activations", "disable_dropout"]


def fast_activations(model: Any) -> Any:
    """Swap transformers' Python ``gelu_new`` (``NewGELUActivation``, ~8 kernels and several saved tensors) for
    ``nn.GELU(approximate="tanh")``: the same function (max difference ~2e-7), one fused kernel forward and backward.

    It was ~23% of CPU time in PPO on GPT-2 (benchmarks/README.md). The saved config is unchanged, so the model
    still loads as before elsewhere. Works through PEFT and value-head wrappers (it walks every submodule).
    Returns ``model`` (modified in place).
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set p=0 on every ``nn.Dropout`` in ``model`` (PPO ratios must be 1 on unchanged weights). Returns model."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model
