"""Gradients of the actor-critic MLPs by hand: numpy forward/backward on views of the flat parameters.

Why: a PPO gradient step on a 64x64 MLP with a minibatch of 256 is ~30 tiny kernels, and with ``nn`` +
autograd the per-op overhead (and torch's slow float32 ``tanh`` at this size: ~7x numpy's) costs several
times the arithmetic. Here the MLPs run in numpy (float32) on zero-copy views of the parameters and the
chain rule through the layers is written out below (a handful of matmuls). :class:`NumpyMLP` is used by

* :class:`~proxrl.control.ppo_grad.NumpyPPOGradient` (backend ``"numpy"``, the default): the gradient of
  the loss w.r.t. the network outputs in closed form, then :meth:`NumpyMLP.backward`;
* :class:`ManualActorCritic` (backend ``"numpy-mlp"``): the :mod:`proxrl.core` loss built on the outputs
  as autograd leaves, autograd on that small graph only, then :meth:`NumpyMLP.backward`.

:class:`AutogradActorCritic` is the reference (plain ``nn`` forward, ``loss.backward()``);
``tests/test_control_mlp_grad.py`` checks that all give the same gradient. :class:`ManualActorCritic` and
:class:`AutogradActorCritic` share one interface, used by :class:`proxrl.control.ppo.TorchPPOGradient`::

    out, value, log_std = nets.forward(obs)   # (N, n|d), (N,), (d,) or None -- tensors the loss is built on
    nets.backward(loss)                       # writes dloss/dtheta into the flat gradient (all of it)

Chain rule for one MLP with layers ``l = 1..L``, activation ``f`` (tanh or relu), batch ``N``::

    h_0 = x                                     (N, d_0)
    z_l = h_{l-1} W_l^T + b_l                   (N, d_l)      W_l: (d_l, d_{l-1}) as torch stores it
    h_l = f(z_l)  (l < L),   y = z_L            network output (logits / Gaussian mean / value)

Given ``G = dL/dy`` (closed form, or autograd on the loss graph with ``y`` a leaf), for ``l = L, ..., 1``::

    dL/dz_L     = G
    dL/dW_l     = (dL/dz_l)^T h_{l-1}           (d_l, d_{l-1})
    dL/db_l     = sum_n dL/dz_l[n, :]           (d_l,)
    dL/dh_{l-1} = dL/dz_l W_l                   (N, d_{l-1})   (not needed for l = 1)
    dL/dz_{l-1} = dL/dh_{l-1} * f'(z_{l-1}),    tanh: f' = 1 - h_{l-1}^2,  relu: f' = [h_{l-1} > 0]

``log_std`` of a Gaussian policy is a parameter of the loss graph itself: its gradient comes from autograd.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from proxrl.control.policy import ActorCritic

__all__ = ["NumpyMLP", "ManualActorCritic", "AutogradActorCritic"]


class NumpyMLP:
    """Forward and backward of an ``nn.Sequential`` of Linear/Tanh/ReLU layers, in numpy.

    Weights and biases are views of the module's parameters and gradient slots are views of their
    ``.grad`` (which :func:`~proxrl.control.flat_params.flatten_parameters` keeps inside one flat tensor), so
    optimizer steps are seen without copying and :meth:`backward` writes the gradient in place.
    """

    def __init__(self, seq: nn.Sequential) -> None:
        linears = [m for m in seq if isinstance(m, nn.Linear)]
        if any(m.weight.grad is None or m.bias.grad is None for m in linears):
            raise ValueError("NumpyMLP needs allocated .grad tensors (call flatten_parameters first)")
        self.weights = [m.weight.detach().numpy() for m in linears]  # (d_l, d_{l-1})
        self.biases = [m.bias.detach().numpy() for m in linears]  # (d_l,)
        self.weight_grads = [m.weight.grad.numpy() for m in linears]
        self.bias_grads = [m.bias.grad.numpy() for m in linears]
        self.relu = any(isinstance(m, nn.ReLU) for m in seq)
        self._hidden: list[np.ndarray] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``y`` ``(N, d_L)`` for ``x`` ``(N, d_0)``; keeps ``h_0..h_{L-1}`` for :meth:`backward`.

        The output layer is computed feature-major (``y^T = W_L h_{L-1}^T + b_L``), so ``y`` is the
        transposed view of a ``(d_L, N)`` array: the loss then reduces over the few outputs of each sample
        along contiguous rows, which numpy does several times faster than along a length-2 axis.
        """
        hidden = [x]
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            z = hidden[-1] @ w.T
            z += b
            if self.relu:
                np.maximum(z, 0.0, out=z)
            else:
                np.tanh(z, out=z)
            hidden.append(z)
        self._hidden = hidden
        y_t = self.weights[-1] @ hidden[-1].T
        y_t += self.biases[-1][:, None]
        return y_t.T

    def backward(self, grad_y: np.ndarray) -> None:
        """Write ``dL/dW_l``, ``dL/db_l`` into the gradient slots, given ``grad_y = dL/dy`` ``(N, d_L)``
        (fastest as the transposed view of a ``(d_L, N)`` array, like the output of :meth:`forward`)."""
        last = len(self.weights) - 1
        g_t = grad_y.T  # (dL/dz_L)^T (d_L, N)
        np.matmul(g_t, self._hidden[last], out=self.weight_grads[last])
        np.sum(g_t, axis=1, out=self.bias_grads[last])
        if last == 0:
            return
        g = g_t.T @ self.weights[last]  # dL/dh_{L-1} (N, d_{L-1})
        ones = np.ones(g.shape[0], g.dtype)  # batch sums as matrix-vector products: ~6x faster than sum(axis=0)
        for l in range(last - 1, -1, -1):
            h = self._hidden[l + 1]  # h_l = f(z_l)
            if self.relu:
                g *= h > 0
            else:
                g *= 1.0 - h * h
            # g = dL/dz_l
            np.matmul(g.T, self._hidden[l], out=self.weight_grads[l])
            np.matmul(ones, g, out=self.bias_grads[l])
            if l > 0:
                g = g @ self.weights[l]  # dL/dh_{l-1}


class ManualActorCritic:
    """``forward``: numpy MLPs, outputs returned as autograd leaves; ``backward``: autograd on the loss graph
    down to those leaves, then :meth:`NumpyMLP.backward` through both networks."""

    def __init__(self, policy: ActorCritic) -> None:
        self.actor = NumpyMLP(policy.actor)
        self.critic = NumpyMLP(policy.critic)
        self.log_std_grad = None if policy.discrete else policy.log_std.grad
        self.log_std = None if policy.discrete else policy.log_std
        self._leaves: tuple[Tensor, ...] = ()

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(out, value, log_std)`` for ``obs`` ``(N, obs_dim)``: leaf tensors with ``requires_grad``."""
        x = obs.numpy()
        out = torch.from_numpy(self.actor.forward(x)).requires_grad_()
        value = torch.from_numpy(self.critic.forward(x).reshape(-1)).requires_grad_()
        log_std = None if self.log_std is None else self.log_std.detach().requires_grad_()
        self._leaves = (out, value) if log_std is None else (out, value, log_std)
        return out, value, log_std

    def backward(self, loss: Tensor) -> None:
        """Fill the flat gradient with ``dloss/dtheta`` (every slot is overwritten; no zeroing needed)."""
        grads = torch.autograd.grad(loss, self._leaves, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(self._leaves, grads)]
        self.actor.backward(grads[0].numpy())
        self.critic.backward(grads[1].numpy().reshape(-1, 1))
        if self.log_std_grad is not None:
            self.log_std_grad.copy_(grads[2])


class AutogradActorCritic:
    """The reference: ``nn`` forward with the autograd graph through the MLPs, ``loss.backward()``."""

    def __init__(self, policy: ActorCritic, flat_param: nn.Parameter) -> None:
        self.policy = policy
        self.flat_param = flat_param

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        log_std = None if self.policy.discrete else self.policy.log_std
        return self.policy.actor(obs), self.policy.value(obs), log_std

    def backward(self, loss: Tensor) -> None:
        self.flat_param.grad.zero_()
        loss.backward()
