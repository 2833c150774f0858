"""Gradients of the actor-critic MLPs by hand: numpy forward/backward on views of the flat parameters.

Why: a PPO gradient step on a 64x64 MLP with a minibatch of 256 is ~30 tiny kernels, and with ``nn`` +
autograd the per-op overhead (and torch's slow float32 ``tanh`` at this size) costs several times the
arithmetic (figures: benchmarks/README.md). Here the MLPs run in numpy (float32) on zero-copy views of the
parameters and the chain rule through the layers is written out below (a handful of matmuls).
:class:`NumpyMLP` is used by :class:`~proxrl.control.ppo_grad.NumpyPPOGradient` (grad backend ``"numpy"``):
the gradient of the loss w.r.t. the network outputs in closed form, then :meth:`NumpyMLP.backward`.
``tests/test_control_mlp_grad.py`` checks it against autograd (grad backend ``"autograd"``, the reference).

Supported: an ``nn.Sequential`` of ``Linear`` layers with one activation kind (``Tanh`` or ``ReLU``) between
them, ending with a ``Linear``; :class:`NumpyMLP` raises a ValueError naming any other layer.

Chain rule for one MLP with layers ``l = 1..L``, activation ``f`` (tanh or relu), batch ``N``::

    h_0 = x                                     (N, d_0)
    z_l = h_{l-1} W_l^T + b_l                   (N, d_l)      W_l: (d_l, d_{l-1}) as torch stores it
    h_l = f(z_l)  (l < L),   y = z_L            network output (logits / Gaussian mean / value)

Given ``G = dL/dy`` (closed form), for ``l = L, ..., 1``::

    dL/dz_L     = G
    dL/dW_l     = (dL/dz_l)^T h_{l-1}           (d_l, d_{l-1})
    dL/db_l     = sum_n dL/dz_l[n, :]           (d_l,)
    dL/dh_{l-1} = dL/dz_l W_l                   (N, d_{l-1})   (not needed for l = 1)
    dL/dz_{l-1} = dL/dh_{l-1} * f'(z_{l-1}),    tanh: f' = 1 - h_{l-1}^2,  relu: f' = [h_{l-1} > 0]

``log_std`` of a Gaussian policy is not part of either MLP: :mod:`.ppo_grad` writes its gradient itself.

Large matrix products (at least ``2**21`` multiply-adds, e.g. HalfCheetah's 256x256 layers on a minibatch of
64) go through ``torch.mm`` on zero-copy views of the same arrays: torch's sgemm runs them ~1.3x faster than
numpy's OpenBLAS on this machine class, while numpy stays faster on the small products of CartPole-sized MLPs
(``python benchmarks/control_bench.py --env halfcheetah --profile ...``; figures in benchmarks/README.md).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

__all__ = ["NumpyMLP", "PairedMLP", "mlp_activation", "storage_key"]

_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu"}
TORCH_MM_MACS = 1 << 21  # products of at least this many multiply-adds run in torch.mm (see the module docstring)


def _matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` (2-d float arrays, any strides), written into ``out`` if given: torch.mm on views for large
    products, numpy for small ones."""
    if a.shape[0] * a.shape[1] * b.shape[1] < TORCH_MM_MACS:
        return np.matmul(a, b, out=out)
    if out is None:
        return torch.mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    torch.mm(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))
    return out


def storage_key(policy: nn.Module) -> tuple:
    """What numpy views of an actor-critic's MLPs depend on: the layer objects of ``policy.actor`` and
    ``policy.critic`` and where every parameter and gradient lives. Views built from ``policy`` stay valid
    exactly while this compares equal (a replaced layer, ``flatten_parameters`` again or a new ``.grad`` change it)."""
    return (tuple(policy.actor), tuple(policy.critic),
            tuple(t.data_ptr() if t is not None else 0 for p in policy.parameters() for t in (p, p.grad)))


@functools.lru_cache(maxsize=16)
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only ``(n,)`` array of ones (the batch-sum vector; one per size and dtype, not one per step)."""
    ones = np.ones(n, dtype)
    ones.flags.writeable = False
    return ones


def mlp_activation(seq: nn.Module) -> str:
    """``"tanh"`` or ``"relu"``: the one activation of a supported MLP; ValueError naming any unsupported layer.

    Supported: ``nn.Sequential(Linear, act, Linear, act, ..., Linear)`` with ``act`` all ``Tanh`` or all ``ReLU``
    (a single ``Linear`` is a linear model; its activation is reported as ``"tanh"`` and never used).
    """
    if not isinstance(seq, nn.Sequential):
        raise ValueError(f"{type(seq).__name__} is not an nn.Sequential of Linear/Tanh/ReLU layers")
    layers = list(seq)
    kinds = set()
    for i, m in enumerate(layers):
        expect_linear = i % 2 == 0
        if expect_linear and type(m) is not nn.Linear:
            raise ValueError(f"layer {i} is {type(m).__name__}; the numpy MLP expects Linear layers alternating "
                             "with Tanh or ReLU")
        if not expect_linear:
            if type(m) not in _ACTIVATIONS:
                raise ValueError(f"layer {i} is {type(m).__name__}; the numpy MLP supports only Tanh and ReLU activations")
            kinds.add(_ACTIVATIONS[type(m)])
    if not layers or type(layers[-1]) is not nn.Linear:
        raise ValueError("the numpy MLP must end with a Linear layer")
    if len(kinds) > 1:
        raise ValueError("the numpy MLP supports one activation kind per network, got both Tanh and ReLU")
    return kinds.pop() if kinds else "tanh"


class NumpyMLP:
    """Forward and backward of an ``nn.Sequential`` of Linear/Tanh/ReLU layers, in numpy.

    Weights and biases are views of the module's parameters and gradient slots are views of their
    ``.grad`` (which :func:`~proxrl.control.flat_params.flatten_parameters` keeps inside one flat tensor), so
    optimizer steps are seen without copying and :meth:`backward` writes the gradient in place.
    """

    def __init__(self, seq: nn.Sequential) -> None:
        self.relu = mlp_activation(seq) == "relu"  # ValueError on any layer it does not support
        linears = [m for m in seq if isinstance(m, nn.Linear)]
        if any(m.weight.grad is None or m.bias.grad is None for m in linears):
            raise ValueError("NumpyMLP needs allocated .grad tensors (call flatten_parameters first)")
        self.weights = [m.weight.detach().numpy() for m in linears]  # (d_l, d_{l-1})
        self.biases = [m.bias.detach().numpy() for m in linears]  # (d_l,)
        self.weight_grads = [m.weight.grad.numpy() for m in linears]
        self.bias_grads = [m.bias.grad.numpy() for m in linears]
        self._hidden: list[np.ndarray] = []

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``y`` ``(N, d_L)`` for ``x`` ``(N, d_0)``; keeps ``h_0..h_{L-1}`` for :meth:`backward`.

        The output layer is computed feature-major (``y^T = W_L h_{L-1}^T + b_L``), so ``y`` is the
        transposed view of a ``(d_L, N)`` array: the loss then reduces over the few outputs of each sample
        along contiguous rows, which numpy does several times faster than along a length-2 axis.
        """
        hidden = [x]
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            z = _matmul(hidden[-1], w.T)
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
        if g_t.shape[0] == 1:  # one output (a critic): dL/dh_{L-1} is an outer product, a broadcast multiply
            g = g_t.T * self.weights[last]  # (~4x faster than a matmul with an inner dimension of 1; same numbers)
        else:
            g = g_t.T @ self.weights[last]  # dL/dh_{L-1} (N, d_{L-1})
        ones = _ones(g.shape[0], g.dtype)  # batch sums as matrix-vector products (faster than sum(axis=0))
        for l in range(last - 1, -1, -1):
            h = self._hidden[l + 1]  # h_l = f(z_l)
            if self.relu:
                g *= h > 0
            else:
                g *= 1.0 - h * h
            # g = dL/dz_l
            _matmul(g.T, self._hidden[l], out=self.weight_grads[l])
            np.matmul(ones, g, out=self.bias_grads[l])
            if l > 0:
                g = _matmul(g, self.weights[l])  # dL/dh_{l-1}


def _stacked(first: np.ndarray, second: np.ndarray) -> np.ndarray | None:
    """A ``(2, *shape)`` view holding ``first`` and ``second`` (arrays of one shape, strides and dtype inside one
    buffer, ``second`` after ``first``), or None when they cannot be one strided view."""
    if first.shape != second.shape or first.strides != second.strides or first.dtype != second.dtype:
        return None
    gap = second.__array_interface__["data"][0] - first.__array_interface__["data"][0]
    if gap <= 0 or gap % first.itemsize:
        return None
    return np.lib.stride_tricks.as_strided(first, (2, *first.shape), (gap, *first.strides))


class PairedMLP:
    """The actor and critic :class:`NumpyMLP` run side by side, for networks whose hidden layers match.

    Each hidden-to-hidden layer of both networks is one batched product (``torch.bmm`` on a ``(2, ...)``
    strided view of the two weight matrices in the flat parameter, likewise for the gradient slots) and each
    bias add, activation and activation derivative is one numpy op over both networks' ``(2, N, d)`` hidden
    states. Same formulas as :class:`NumpyMLP` (the module docstring); the input and output layers, whose
    sizes differ between the two, run per network. On HalfCheetah's 256x256 layers (minibatch 64) a batched
    product takes ~0.8x the time of the two products it replaces with 1 thread and ~0.7x with 2, and the
    update makes half as many elementwise calls (benchmarks/README.md).

    :meth:`build` returns None where the pair does not fit: no hidden-to-hidden layer, different depths, hidden
    sizes or activations, or weights not laid out critic-after-actor with equal strides (``flatten_parameters``
    does that). Callers use it for minibatches of at least :attr:`min_batch` samples, where every batched
    product has :data:`TORCH_MM_MACS` multiply-adds per network (CartPole-sized products stay in numpy).
    """

    def __init__(self, actor: NumpyMLP, critic: NumpyMLP, stacks: dict[str, list[np.ndarray]]) -> None:
        self.actor, self.critic = actor, critic
        self.relu = actor.relu
        self.weights = stacks["weights"]  # (2, d_l, d_{l-1}) for l = 1..L-1 (index 0 unused), numpy views
        self.biases = stacks["biases"]  # (2, d_l) for l = 0..L-1
        self.weight_grads = stacks["weight_grads"]
        self.bias_grads = stacks["bias_grads"]
        self._tw = [None if w is None else torch.from_numpy(w) for w in self.weights]
        self._twg = [None if w is None else torch.from_numpy(w) for w in self.weight_grads]
        self._hidden: list[np.ndarray] = []
        self.min_batch = 1  # the smallest minibatch whose every hidden-to-hidden product is worth a torch.bmm

    @classmethod
    def build(cls, actor: NumpyMLP, critic: NumpyMLP) -> PairedMLP | None:
        n_layers = len(actor.weights)
        if n_layers < 3 or len(critic.weights) != n_layers or actor.relu != critic.relu:
            return None  # at least one hidden-to-hidden layer, else nothing to batch
        if actor.weights[0].shape[1] != critic.weights[0].shape[1]:
            return None
        stacks: dict[str, list] = {"weights": [None], "weight_grads": [None], "biases": [], "bias_grads": []}
        min_batch = 1
        for l in range(n_layers - 1):  # hidden layers 0..L-2 (their outputs are hidden states)
            if l > 0:
                out, inp = actor.weights[l].shape
                min_batch = max(min_batch, -(-TORCH_MM_MACS // (out * inp)))
                for key, a, c in (("weights", actor.weights[l], critic.weights[l]),
                                  ("weight_grads", actor.weight_grads[l], critic.weight_grads[l])):
                    stacks[key].append(_stacked(a, c))
            for key, a, c in (("biases", actor.biases[l], critic.biases[l]),
                              ("bias_grads", actor.bias_grads[l], critic.bias_grads[l])):
                stacks[key].append(_stacked(a, c))
        if any(v is None for key, vs in stacks.items() for v in (vs[1:] if key.startswith("weight") else vs)):
            return None
        pair = cls(actor, critic, stacks)
        pair.min_batch = min_batch
        return pair

    def _activate(self, z: np.ndarray) -> None:
        if self.relu:
            np.maximum(z, 0.0, out=z)
        else:
            np.tanh(z, out=z)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(actor_out, value_out)``, ``(N, d_L)`` each (transposed views, as :meth:`NumpyMLP.forward`)."""
        n = x.shape[0]
        h = np.empty((2, n, self.biases[0].shape[1]), x.dtype)
        for k, net in enumerate((self.actor, self.critic)):
            _matmul(x, net.weights[0].T, out=h[k])
        h += self.biases[0][:, None, :]
        self._activate(h)
        hidden = [x, h]
        for l in range(1, len(self.biases)):
            z = np.empty((2, n, self.biases[l].shape[1]), x.dtype)
            torch.bmm(torch.from_numpy(hidden[-1]), self._tw[l].transpose(1, 2), out=torch.from_numpy(z))
            z += self.biases[l][:, None, :]
            self._activate(z)
            hidden.append(z)
        self._hidden = hidden
        outs = []
        for k, net in enumerate((self.actor, self.critic)):
            y_t = net.weights[-1] @ hidden[-1][k].T
            y_t += net.biases[-1][:, None]
            outs.append(y_t.T)
        return outs[0], outs[1]

    def backward(self, grad_actor: np.ndarray, grad_critic: np.ndarray) -> None:
        """Both networks' :meth:`NumpyMLP.backward` (same arguments, gradients written in place)."""
        last = len(self.biases)  # index of the output layer
        top = self._hidden[last]  # (2, N, d_{L-1})
        g = np.empty_like(top)  # dL/dh_{L-1} of both networks
        for k, (net, grad_y) in enumerate(((self.actor, grad_actor), (self.critic, grad_critic))):
            g_t = grad_y.T
            np.matmul(g_t, top[k], out=net.weight_grads[last])
            np.sum(g_t, axis=1, out=net.bias_grads[last])
            if g_t.shape[0] == 1:
                np.multiply(g_t.T, net.weights[last], out=g[k])
            else:
                np.matmul(g_t.T, net.weights[last], out=g[k])
        ones = _ones(g.shape[1], g.dtype)
        x = self._hidden[0]
        for l in range(last - 1, -1, -1):
            h = self._hidden[l + 1]
            if self.relu:
                g *= h > 0
            else:
                g *= 1.0 - h * h
            # g = dL/dz_l of both networks
            if l > 0:
                torch.bmm(torch.from_numpy(g).transpose(1, 2), torch.from_numpy(self._hidden[l]),
                          out=self._twg[l])
            else:
                for k, net in enumerate((self.actor, self.critic)):
                    _matmul(g[k].T, x, out=net.weight_grads[0])
            np.matmul(ones, g, out=self.bias_grads[l])
            if l > 0:
                g_prev = np.empty((2, g.shape[1], self.weights[l].shape[2]), g.dtype)
                torch.bmm(torch.from_numpy(g), self._tw[l], out=torch.from_numpy(g_prev))
                g = g_prev
