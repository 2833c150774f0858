"""Actor-critic MLPs for Discrete (categorical) and Box (diagonal Gaussian) actions.

Separate actor and critic networks (no shared trunk), orthogonal init with gain sqrt(2) on hidden layers,
0.01 on the policy head and 1 on the value head, zero biases (Andrychowicz et al. 2021, "What Matters in
On-Policy RL", and CleanRL). The Gaussian has a state-independent learned ``log_std`` vector.

Log-probabilities and entropies are computed directly (no ``torch.distributions`` objects on the hot path):

* categorical: ``log pi(a|s) = log_softmax(logits)[a]``, ``H = -sum_a p_a log p_a``;
* Gaussian: ``log pi(a|s) = sum_d [-(a_d - mu_d)^2 / (2 sigma_d^2) - log sigma_d - log(2 pi) / 2]``,
  ``H = sum_d [log sigma_d + (1 + log(2 pi)) / 2]``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ActorCritic"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str, head_gain: float) -> nn.Sequential:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), act()]
        prev = width
    layers.append(nn.Linear(prev, out_dim))
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
    ) -> None:
        super().__init__()
        self.discrete = discrete
        self.actor = _mlp(obs_dim, hidden, action_dim, activation, head_gain=0.01)
        self.critic = _mlp(obs_dim, hidden, 1, activation, head_gain=1.0)
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
        out = self.actor(obs)
        value = self.critic(obs).squeeze(-1)
        if self.discrete:
            logp_all = out.log_softmax(-1)
            logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            with torch.set_grad_enabled(with_grad_entropy and torch.is_grad_enabled()):
                entropy = -(logp_all.exp() * logp_all).sum(-1)
            return logp, entropy, value
        z = (actions - out) * torch.exp(-self.log_std)
        logp = (-0.5 * z.square() - self.log_std - _HALF_LOG_2PI).sum(-1)
        entropy = (self.log_std + 0.5 + _HALF_LOG_2PI).sum().expand(logp.shape)
        return logp, entropy, value

    @torch.inference_mode()
    def deterministic_action(self, obs: Tensor) -> Tensor:
        """Greedy action: argmax of the logits ``(N,)`` or the Gaussian mean ``(N, d)``."""
        out = self.actor(obs)
        return out.argmax(-1) if self.discrete else out

    @torch.inference_mode()
    def action_probs(self, obs: Tensor) -> Tensor:
        """Categorical action probabilities ``(N, n)`` (discrete policies only)."""
        return self.actor(obs).softmax(-1)
