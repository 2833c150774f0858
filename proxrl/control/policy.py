"""Actor-critic MLPs for Discrete (categorical) and Box (diagonal Gaussian) actions.

Separate actor and critic networks (no shared trunk), orthogonal init with gain sqrt(2) on hidden layers,
0.01 on the policy head and 1 on the value head, zero biases (Andrychowicz et al. 2021, "What Matters in
On-Policy RL", and CleanRL); ``ortho_init=False`` keeps PyTorch's default ``nn.Linear`` init instead (SB3's
``ortho_init=False``, which rl-baselines3-zoo's HalfCheetah and Hopper entries use). The Gaussian has a
state-independent learned ``log_std`` vector.

Log-probabilities and entropies are computed directly (no ``torch.distributions`` objects on the hot path):

* categorical: ``log pi(a|s) = log_softmax(logits)[a]``, ``H = -sum_a p_a log p_a``;
* Gaussian: ``log pi(a|s) = sum_d [-(a_d - mu_d)^2 / (2 sigma_d^2) - log sigma_d - log(2 pi) / 2]``,
  ``H = sum_d [log sigma_d + (1 + log(2 pi)) / 2]``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from proxrl.control.mlp_grad import mlp_activation, storage_key

__all__ = ["ActorCritic", "NumpyPolicy", "build_mlp"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def build_mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str, head_gain: float,
              ortho_init: bool = True) -> nn.Sequential:
    """``Linear, act, ..., Linear`` from ``in_dim`` through ``hidden`` to ``out_dim``; orthogonal init (gain
    sqrt(2), ``head_gain`` on the last layer, zero biases) or, with ``ortho_init=False``, PyTorch's default."""
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
    if activation not in acts:
        raise ValueError(f"activation={activation!r}: use 'tanh' or 'relu'")
    act = acts[activation]
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), act()]
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    if ortho_init:  # otherwise nn.Linear's own init stays
        for layer in layers:
            if isinstance(layer, nn.Linear):
                gain = head_gain if layer is layers[-1] else math.sqrt(2.0)
                nn.init.orthogonal_(layer.weight, gain)
                nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """``actor``: obs ``(N, obs_dim)`` -> logits ``(N, n)`` or mean ``(N, d)``; ``critic``: obs -> ``(N, 1)``."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        discrete: bool,
        hidden: tuple[int, ...] = (64, 64),
        activation: str = "tanh",
        init_log_std: float = 0.0,
        ortho_init: bool = True,
    ) -> None:
        super().__init__()
        self.discrete = discrete
        self.actor = build_mlp(obs_dim, hidden, action_dim, activation, 0.01, ortho_init)
        self.critic = build_mlp(obs_dim, hidden, 1, activation, 1.0, ortho_init)
        if not discrete:
            self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def value(self, obs: Tensor) -> Tensor:
        """``V(s)``: ``(N, obs_dim)`` -> ``(N,)``."""
        return self.critic(obs).squeeze(-1)

    @torch.inference_mode()
    def act(self, obs: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Sample actions for a batch of observations.

        Returns ``(action, logprob, value)``: action ``(N,)`` int64 or ``(N, d)`` float32 (raw, unclipped),
        logprob ``(N,)``, value ``(N,)``.
        """
        out = self.actor(obs)
        value = self.critic(obs).squeeze(-1)
        if self.discrete:
            logp_all = out.log_softmax(-1)
            action = torch.multinomial(logp_all.exp(), 1, generator=generator)
            return action.squeeze(-1), logp_all.gather(-1, action).squeeze(-1), value
        std = self.log_std.exp()
        noise = torch.randn(out.shape, generator=generator)
        action = out + std * noise
        logp = (-0.5 * noise.square() - self.log_std - _HALF_LOG_2PI).sum(-1)
        return action, logp, value

    def evaluate(self, obs: Tensor, actions: Tensor, with_grad_entropy: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``(logprob, entropy, value)`` of stored ``actions`` under the current parameters, each ``(N,)``.

        ``with_grad_entropy=False`` computes the (categorical) entropy outside autograd, for logging only.
        """
        log_std = None if self.discrete else self.log_std
        logp, entropy = self.log_prob_entropy(self.actor(obs), log_std, actions, with_grad_entropy)
        return logp, entropy, self.value(obs)

    def log_prob_entropy(
        self, out: Tensor, log_std: Tensor | None, actions: Tensor, with_grad_entropy: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``(log pi(a|s), H[pi(.|s)])``, each ``(N,)``, from the actor's output ``out`` ``(N, n)`` / ``(N, d)``.

        ``log_std`` ``(d,)`` for Gaussian policies (None for categorical ones). Used by :meth:`evaluate`.
        """
        if self.discrete:
            logp_all = out.log_softmax(-1)
            logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            with torch.set_grad_enabled(with_grad_entropy and torch.is_grad_enabled()):
                entropy = -(logp_all.exp() * logp_all).sum(-1)
            return logp, entropy
        z = (actions - out) * torch.exp(-log_std)
        logp = (-0.5 * z.square() - log_std - _HALF_LOG_2PI).sum(-1)
        entropy = (log_std + 0.5 + _HALF_LOG_2PI).sum().expand(logp.shape)
        return logp, entropy

    @torch.inference_mode()
    def deterministic_action(self, obs: Tensor) -> Tensor:
        """Greedy action: argmax of the logits ``(N,)`` or the Gaussian mean ``(N, d)``."""
        out = self.actor(obs)
        return out.argmax(-1) if self.discrete else out

    @torch.inference_mode()
    def action_probs(self, obs: Tensor) -> Tensor:
        """Categorical action probabilities ``(N, n)`` (discrete policies only)."""
        return self.actor(obs).softmax(-1)


FUSE_MAX_WIDTH = 128  # NumpyPolicy fuses actor and critic layers up to this width (see its docstring)


class NumpyPolicy:
    """The same actor-critic evaluated with numpy, for rollouts: both MLPs fused into one.

    Stepping 8 envs means batches of 8 observations, where per-call overhead dominates: a numpy forward
    costs several times less than the torch module call, and running actor and critic as one MLP of twice
    the width (first layers stacked, later layers block-diagonal: the zero blocks add exact zeros) halves
    the number of numpy calls again. Layers wider than ``FUSE_MAX_WIDTH`` (HalfCheetah's 256) are not fused
    after the first: a block-diagonal matrix would double the weights read per step, which costs more than
    the calls it saves. The fused weights are a *copy* of the parameters: call :meth:`refresh` after each
    update (:meth:`Collector.collect <proxrl.control.rollout.Collector.collect>` does). Log-probabilities and values agree with :meth:`ActorCritic.act` up to float32 rounding.
    Sampling uses a numpy ``Generator``: categorical by inverse CDF (``a = #{k : u > cdf_k}``), Gaussian as
    ``mu + sigma * eps``. ValueError for a policy whose MLPs have a layer other than Linear/Tanh/ReLU.
    """

    def __init__(self, policy: ActorCritic) -> None:
        activation = mlp_activation(policy.actor)  # ValueError on an unsupported layer
        critic_activation = mlp_activation(policy.critic)
        actor = [m for m in policy.actor if isinstance(m, nn.Linear)]
        critic = [m for m in policy.critic if isinstance(m, nn.Linear)]
        if len(actor) != len(critic) or (len(actor) > 1 and activation != critic_activation):
            raise ValueError("NumpyPolicy fuses actor and critic into one MLP: both need the same depth and activation")
        relu = activation == "relu"
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []  # (W^T, b) of the fused MLP
        # wide MLPs: only the first layer is fused; then actor and critic layers separately, (W^T, b) each
        self.split_at = actor[0].out_features if len(actor) > 1 and max(
            m.out_features for m in actor[:-1] + critic[:-1]) > FUSE_MAX_WIDTH else None
        self.actor_layers: list[tuple[np.ndarray, np.ndarray]] = []
        self.critic_layers: list[tuple[np.ndarray, np.ndarray]] = []
        self._copies: list[tuple[np.ndarray, np.ndarray]] = []  # (block of a fused array, parameter view) for refresh
        place = lambda dest, src: self._copies.append((dest, src))  # noqa: E731
        for i, (a, c) in enumerate(zip(actor, critic)):
            wa, wc = a.weight.detach().numpy(), c.weight.detach().numpy()
            ba, bc = a.bias.detach().numpy(), c.bias.detach().numpy()
            if i > 0 and self.split_at is not None:
                for layers, w, b in ((self.actor_layers, wa, ba), (self.critic_layers, wc, bc)):
                    wt, bt = np.empty(w.shape[::-1], w.dtype), np.empty_like(b)
                    place(wt, w.T)
                    place(bt, b)
                    layers.append((wt, bt))
                continue
            (oa, ia), (oc, ic) = wa.shape, wc.shape
            if i == 0:  # both read the observation
                wt = np.empty((ia, oa + oc), wa.dtype)
                place(wt[:, :oa], wa.T)
                place(wt[:, oa:], wc.T)
            else:  # block-diagonal: actor units feed actor units, critic units critic units
                wt = np.zeros((ia + ic, oa + oc), wa.dtype)
                place(wt[:ia, :oa], wa.T)
                place(wt[ia:, oa:], wc.T)
            b = np.empty(oa + oc, ba.dtype)
            place(b[:oa], ba)
            place(b[oa:], bc)
            self.layers.append((wt, b))
        self.n_out = actor[-1].out_features  # fused output: [actor output (n_out), value (1)]
        self._act = (lambda h: np.maximum(h, 0.0)) if relu else np.tanh
        self.discrete = policy.discrete
        if not self.discrete:
            log_std = policy.log_std.detach().numpy()
            self.log_std = np.empty_like(log_std)
            place(self.log_std, log_std)
        self._storage = storage_key(policy)
        self.refresh()

    def reads(self, policy: nn.Module) -> bool:
        """Whether :meth:`refresh` reads ``policy``'s current parameters (same layers and parameter memory as when
        this was built from it: :func:`~proxrl.control.mlp_grad.storage_key`)."""
        return self._storage == storage_key(policy)

    def refresh(self) -> None:
        """Copy the policy's current parameters into the fused arrays (after an update; cheaper than a new
        ``NumpyPolicy``, and the same numbers)."""
        for dest, src in self._copies:
            np.copyto(dest, src)
        if not self.discrete:
            self._std = np.exp(self.log_std)  # per-step constants of act(), computed once per refresh
            self._logp_offset = (self.log_std + _HALF_LOG_2PI).sum()

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(out, value)``: actor output ``(N, n_out)`` and value ``(N,)``."""
        if self.split_at is not None:
            w, b = self.layers[0]
            h = self._act(x @ w + b)
            outs = []
            for h_part, layers in ((h[:, : self.split_at], self.actor_layers), (h[:, self.split_at:], self.critic_layers)):
                for w, b in layers[:-1]:
                    h_part = self._act(h_part @ w + b)
                w, b = layers[-1]
                outs.append(h_part @ w + b)
            return outs[0], outs[1][:, 0]
        for w, b in self.layers[:-1]:
            x = self._act(x @ w + b)
        w, b = self.layers[-1]
        fused = x @ w + b
        return fused[:, : self.n_out], fused[:, self.n_out]

    def value(self, obs: np.ndarray) -> np.ndarray:
        """``V(s)``: ``(N, obs_dim)`` float32 -> ``(N,)``."""
        return self._forward(obs)[1]

    def act(self, obs: np.ndarray, rng: np.random.Generator | None = None, noise: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(action, logprob, value)`` for ``obs`` ``(N, obs_dim)``: action ``(N,)`` int64 or ``(N, d)`` float32.

        The randomness is ``noise`` (uniforms ``(N,)`` or standard normals ``(N, d)``, float32, as
        :meth:`proxrl.control.distributions.ActionDist.noise` draws them) or, when None, drawn from ``rng``.
        """
        out, value = self._forward(obs)
        n = obs.shape[0]
        if self.discrete:
            logits = out.T  # (n_actions, N): reductions over a few actions are cheaper across rows
            z = logits - logits.max(axis=0)
            logp_all = z - np.log(np.exp(z).sum(axis=0))
            cdf = np.exp(logp_all).cumsum(axis=0)
            u = rng.random(n, dtype=np.float32) if noise is None else noise
            action = np.minimum((u > cdf).sum(axis=0), logits.shape[0] - 1)
            return action, logp_all[action, np.arange(n)], value
        if noise is None:
            noise = rng.standard_normal(out.shape, dtype=np.float32)
        action = out + self._std * noise
        logp = (-0.5 * noise * noise).sum(axis=1) - self._logp_offset
        return action, logp, value
