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


def _channels_last(p: torch.Tensor) -> bool:
    """A 4-D (convolution) weight stored channels-last (NHWC strides), which CPU and GPU convolutions run faster."""
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)


def _view(flat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The slice ``flat`` as a tensor of ``p``'s shape and memory format (channels-last weights stay so)."""
    if _channels_last(p):
        o, i, h, w = p.shape
        return flat.view(o, h, w, i).permute(0, 3, 1, 2)
    return flat.view_as(p)


def flatten_parameters(module: nn.Module) -> nn.Parameter:
    """Re-home ``module``'s parameters into one flat parameter (returned) with a zeroed flat ``.grad``.

    Values are unchanged, and so is each parameter's memory format (a channels-last convolution weight, see
    :class:`proxrl.control.cnn.NatureCNN`, is a channels-last view of its slice). Pass the returned parameter to
    the optimizer; zero gradients with ``flat.grad.zero_()``.
    """
    params = list(module.parameters())
    with torch.no_grad():
        flat = nn.Parameter(torch.cat([(p.detach().permute(0, 2, 3, 1) if _channels_last(p) else p.detach()).reshape(-1)
                                       for p in params]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        n = p.numel()
        view, grad = _view(flat.data[offset : offset + n], p), _view(flat.grad[offset : offset + n], p)
        p.data = view
        p.grad = grad
        offset += n
    return flat
