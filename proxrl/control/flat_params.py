"""Keep all parameters of a module in one contiguous buffer (and their gradients in another).

A small MLP has ~10 parameter tensors; Adam and gradient clipping then run ~10x more tiny kernels than
they need to. After :func:`flatten_parameters` every parameter is a view into one flat ``nn.Parameter``
and every ``.grad`` a view into its flat gradient, so the optimizer, the gradient clipping
(:func:`proxrl.control.adam.clip_grad_norm`) and zeroing touch a single tensor. Autograd accumulates into an existing ``.grad`` in place, which keeps the views live;
never set a parameter's ``.grad`` to None afterwards (zero the flat gradient instead).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["flatten_parameters"]


def flatten_parameters(module: nn.Module) -> nn.Parameter:
    """Re-home ``module``'s parameters into one flat parameter (returned) with a zeroed flat ``.grad``.

    Values are unchanged. Pass the returned parameter to the optimizer; zero gradients with
    ``flat.grad.zero_()``.
    """
    params = list(module.parameters())
    with torch.no_grad():
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat.data[offset : offset + n].view_as(p)
        p.grad = flat.grad[offset : offset + n].view_as(p)
        offset += n
    return flat
