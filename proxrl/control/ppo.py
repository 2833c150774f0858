"""One PPO update on a collected rollout (Schulman et al. 2017, Algorithm 1), written top to bottom.

1. Advantages and value targets with GAE (:func:`proxrl.core.gae`), truncation bootstrapped from
   ``V(final observation)``, termination not.
2. For ``epochs`` passes over the batch in random minibatches:
   ratio-clipped surrogate (:func:`proxrl.core.policy_loss`), optionally clipped value loss
   (:func:`proxrl.core.value_loss`), entropy bonus;
   ``loss = policy_loss - entropy_coef * entropy + value_coef * value_loss``; one Adam step with the global
   gradient norm clipped to ``max_grad_norm``.
3. Target-KL early stop (SB3's rule): before each minibatch's gradient step, if the k3 estimate of
   ``KL(pi_old || pi)`` averaged over that minibatch exceeds ``1.5 * target_kl``, the step is skipped and
   the whole epoch loop stops. ``early_stop_epoch`` reports the (1-based) epoch in which it stopped, or
   ``epochs`` when it ran them all.

NEXT_STEP reset steps (``rollout.valid == False``) are not transitions of the MDP: they are dropped from the
batch before the epochs, so each epoch splits the ``B' <= num_envs * rollout_steps`` real transitions into
``num_minibatches`` near-equal random minibatches and no loss needs a mask. With ``num_minibatches == 1``
the minibatch is the whole batch, unshuffled (every loss term is a mean, so the order is irrelevant).

:func:`ppo_loss` (built from :mod:`proxrl.core`) is the specification of the minibatch loss. For speed the
default backend computes the same loss and its exact gradient in numpy (:mod:`.ppo_grad`: closed-form
derivative of the loss w.r.t. the network outputs, then the MLPs' chain rule by hand in :mod:`.mlp_grad`);
``tests/test_control_mlp_grad.py`` checks it against autograd on :func:`ppo_loss` to float64 precision.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from proxrl.control.adam import FlatAdam, clip_grad_norm
from proxrl.control.config import ControlConfig
from proxrl.control.mlp_grad import AutogradActorCritic, ManualActorCritic
from proxrl.control.ppo_grad import STAT_NAMES, NumpyPPOGradient
from proxrl.control.policy import ActorCritic
from proxrl.control.rollout import Rollout
from proxrl.core import explained_variance, gae, normalize, policy_loss, value_loss

__all__ = ["ppo_update", "ppo_loss", "compute_advantages", "TorchPPOGradient", "BACKENDS"]

BACKENDS = ("numpy", "numpy-mlp", "autograd")


def compute_advantages(rollout: Rollout, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE advantages and lambda-returns ``(T, N)`` of a rollout.

    ``next_values[t] = V(obs[t + 1])`` is the value of the true next observation (NEXT_STEP returns the
    final observation on a done step), so a truncated step bootstraps from ``V(final obs)`` and a
    terminated one from 0 (``core.gae`` multiplies by ``1 - terminated``).
    """
    return gae(rollout.rewards, rollout.values, rollout.next_values, rollout.terminated, rollout.truncated, gamma, lam)


def ppo_loss(
    logprobs: Tensor,
    entropy: Tensor,
    values: Tensor,
    old_logprobs: Tensor,
    old_values: Tensor,
    advantages: Tensor,
    returns: Tensor,
    cfg: ControlConfig,
    clip_coef: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO objective of one minibatch (all inputs ``(M,)``), as a loss to minimise (the specification).

    ``loss = policy_loss - entropy_coef * mean(entropy) + value_coef * value_loss`` with advantages
    normalised per minibatch when ``norm_adv``; returns ``(loss, stats)``, stats the detached 0-d terms
    named in :data:`~proxrl.control.ppo_grad.STAT_NAMES`.
    """
    adv = normalize(advantages) if cfg.norm_adv else advantages
    pg_loss, info = policy_loss(logprobs, old_logprobs, adv, clip_coef)
    v_loss = value_loss(values, old_values, returns, cfg.clip_value_coef)
    ent = entropy.mean()
    loss = pg_loss + cfg.value_coef * v_loss
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": ent.detach(),
             "approx_kl": info["approx_kl"], "clipfrac": info["clipfrac"]}
    return loss, stats


class TorchPPOGradient:
    """:func:`ppo_loss` on the policy's outputs, gradient by autograd, written into the flat gradient.

    ``manual_mlp=False``: the ``nn`` modules and ``loss.backward()`` (the reference). ``manual_mlp=True``:
    numpy MLPs whose outputs are autograd leaves, autograd on the loss graph only, then the hand-written
    backward of :mod:`.mlp_grad`. Same call signature and result as
    :class:`~proxrl.control.ppo_grad.NumpyPPOGradient` (with tensors instead of arrays).
    """

    def __init__(self, policy: ActorCritic, flat_param: torch.nn.Parameter, cfg: ControlConfig, clip_coef: float,
                 manual_mlp: bool = False) -> None:
        self.policy = policy
        self.cfg = cfg
        self.clip_coef = clip_coef
        self.nets = ManualActorCritic(policy) if manual_mlp else AutogradActorCritic(policy, flat_param)

    def __call__(self, obs: Tensor, actions: Tensor, old_logprobs: Tensor, old_values: Tensor, advantages: Tensor,
                 returns: Tensor) -> np.ndarray:
        out, values, log_std = self.nets.forward(obs)
        logprobs, entropy = self.policy.log_prob_entropy(out, log_std, actions, self.cfg.entropy_coef > 0)
        loss, stats = ppo_loss(logprobs, entropy, values, old_logprobs, old_values, advantages, returns, self.cfg,
                               self.clip_coef)
        self.nets.backward(loss)
        return torch.stack([stats[k] for k in STAT_NAMES]).double().numpy()


def ppo_update(
    policy: ActorCritic,
    optimizer: FlatAdam,
    flat_param: torch.nn.Parameter,
    rollout: Rollout,
    cfg: ControlConfig,
    clip_coef: float,
    generator: torch.Generator,
    backend: str = "numpy",
) -> dict[str, float]:
    """Run the PPO epochs on ``rollout``; returns the update's metrics (means over the minibatches run).

    ``flat_param`` is the single flat parameter the optimizer updates (see :mod:`.flat_params`); its
    ``.grad`` holds every parameter's gradient. ``backend`` computes the minibatch loss and its gradient:
    ``"numpy"`` in closed form (:mod:`.ppo_grad`, fastest), ``"numpy-mlp"`` with :func:`ppo_loss` on leaf
    outputs of numpy MLPs, ``"autograd"`` with ``nn`` + autograd throughout (the reference). All three give
    the same gradients up to float rounding (``tests/test_control_mlp_grad.py``).
    """
    # 1. GAE over the (T, N) rollout, then flatten to a batch of T * N transitions.
    advantages, returns = compute_advantages(rollout, cfg.gamma, cfg.gae_lambda)
    batch = (
        rollout.obs.reshape(-1, rollout.obs.shape[-1]),
        rollout.actions.reshape((-1,) + rollout.actions.shape[2:]),
        rollout.logprobs.reshape(-1),
        rollout.values.reshape(-1),
        advantages.reshape(-1),
        returns.reshape(-1),
    )
    # NEXT_STEP reset steps are not transitions: drop them, keep the B' real ones.
    real = rollout.valid.reshape(-1).nonzero().squeeze(1)
    batch = tuple(t[real] for t in batch)
    n_real = real.numel()
    explained_var = explained_variance(batch[3], batch[5])
    if backend == "numpy":
        loss_and_grad = NumpyPPOGradient(policy, cfg, clip_coef)
        batch = tuple(t.numpy() for t in batch)
    elif backend in ("numpy-mlp", "autograd"):
        loss_and_grad = TorchPPOGradient(policy, flat_param, cfg, clip_coef, manual_mlp=backend == "numpy-mlp")
    else:
        raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")

    # 2. Epochs of minibatch SGD on the clipped surrogate.
    sums = np.zeros(len(STAT_NAMES))
    n_minibatches = 0
    early_stop_epoch = cfg.epochs
    for epoch in range(cfg.epochs):
        if cfg.num_minibatches == 1:  # the whole batch; the loss is a mean, so the order of samples is irrelevant
            minibatches = [slice(None)]
        else:
            minibatches = torch.randperm(n_real, generator=generator).tensor_split(cfg.num_minibatches)
        stop = False
        for idx in minibatches:
            if backend == "numpy" and isinstance(idx, Tensor):
                idx = idx.numpy()
            # loss = policy_loss - entropy_coef * entropy + value_coef * value_loss; gradient into flat_param.grad
            stats = loss_and_grad(*(t[idx] for t in batch))

            # 3. Target-KL early stop: no step on a minibatch whose KL(pi_old || pi) is already too large.
            if cfg.target_kl is not None and stats[STAT_NAMES.index("approx_kl")] > 1.5 * cfg.target_kl:
                early_stop_epoch = epoch + 1
                stop = True
                break

            if cfg.max_grad_norm > 0:
                clip_grad_norm(flat_param.grad, cfg.max_grad_norm)
            optimizer.step()
            n_minibatches += 1
            sums += stats
        if stop:
            break

    means = (sums / n_minibatches).tolist() if n_minibatches else [float("nan")] * len(STAT_NAMES)
    metrics = dict(zip(STAT_NAMES, means))
    metrics["explained_variance"] = explained_var
    metrics["early_stop_epoch"] = float(early_stop_epoch)
    metrics["minibatch_steps"] = float(n_minibatches)
    metrics["batch_transitions"] = float(n_real)
    return metrics
