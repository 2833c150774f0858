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
``num_minibatches`` near-equal random minibatches and no loss needs a mask.
"""
from __future__ import annotations

import torch
from torch import Tensor

from proxrl.control.adam import FlatAdam, clip_grad_norm
from proxrl.control.config import ControlConfig
from proxrl.control.policy import ActorCritic
from proxrl.control.rollout import Rollout
from proxrl.core import explained_variance, gae, normalize, policy_loss, value_loss

__all__ = ["ppo_update", "compute_advantages"]


def compute_advantages(rollout: Rollout, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE advantages and lambda-returns ``(T, N)`` of a rollout.

    ``next_values[t] = V(obs[t + 1])`` is the value of the true next observation (NEXT_STEP returns the
    final observation on a done step), so a truncated step bootstraps from ``V(final obs)`` and a
    terminated one from 0 (``core.gae`` multiplies by ``1 - terminated``).
    """
    return gae(rollout.rewards, rollout.values, rollout.next_values, rollout.terminated, rollout.truncated, gamma, lam)


def ppo_update(
    policy: ActorCritic,
    optimizer: FlatAdam,
    flat_param: torch.nn.Parameter,
    rollout: Rollout,
    cfg: ControlConfig,
    clip_coef: float,
    generator: torch.Generator,
) -> dict[str, float]:
    """Run the PPO epochs on ``rollout``; returns the update's metrics (means over the minibatches run).

    ``flat_param`` is the single flat parameter the optimizer updates (see :mod:`.flat_params`); its
    ``.grad`` holds every parameter's gradient.
    """
    # 1. GAE over the (T, N) rollout, then flatten to a batch of T * N transitions.
    advantages, returns = compute_advantages(rollout, cfg.gamma, cfg.gae_lambda)
    b_obs = rollout.obs.reshape(-1, rollout.obs.shape[-1])
    b_actions = rollout.actions.reshape((-1,) + rollout.actions.shape[2:])
    b_logprobs = rollout.logprobs.reshape(-1)
    b_values = rollout.values.reshape(-1)
    b_advantages = advantages.reshape(-1)
    b_returns = returns.reshape(-1)
    # NEXT_STEP reset steps are not transitions: drop them, keep the B' real ones.
    real = rollout.valid.reshape(-1).nonzero().squeeze(1)
    entropy_in_loss = cfg.entropy_coef > 0

    # 2. Epochs of minibatch SGD on the clipped surrogate.
    sums = torch.zeros(5)
    n_minibatches = 0
    early_stop_epoch = cfg.epochs
    for epoch in range(cfg.epochs):
        perm = real[torch.randperm(real.numel(), generator=generator)]
        stop = False
        for idx in perm.tensor_split(cfg.num_minibatches):
            logprobs, entropy, values = policy.evaluate(b_obs[idx], b_actions[idx], with_grad_entropy=entropy_in_loss)

            adv = b_advantages[idx]
            if cfg.norm_adv:
                adv = normalize(adv)
            pg_loss, info = policy_loss(logprobs, b_logprobs[idx], adv, clip_coef)
            v_loss = value_loss(values, b_values[idx], b_returns[idx], cfg.clip_value_coef)
            ent = entropy.mean()
            loss = pg_loss + cfg.value_coef * v_loss
            if entropy_in_loss:
                loss = loss - cfg.entropy_coef * ent

            # 3. Target-KL early stop, checked before stepping on this minibatch.
            if cfg.target_kl is not None and float(info["approx_kl"]) > 1.5 * cfg.target_kl:
                early_stop_epoch = epoch + 1
                stop = True
                break

            flat_param.grad.zero_()
            loss.backward()
            if cfg.max_grad_norm > 0:
                clip_grad_norm(flat_param.grad, cfg.max_grad_norm)
            optimizer.step()

            n_minibatches += 1
            sums += torch.stack([pg_loss.detach(), v_loss.detach(), ent.detach(), info["approx_kl"], info["clipfrac"]])
        if stop:
            break

    names = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")
    means = (sums / n_minibatches).tolist() if n_minibatches else [float("nan")] * len(names)
    metrics = dict(zip(names, means))
    metrics["explained_variance"] = explained_variance(b_values[real], b_returns[real])
    metrics["early_stop_epoch"] = float(early_stop_epoch)
    metrics["minibatch_steps"] = float(n_minibatches)
    metrics["batch_transitions"] = float(real.numel())
    return metrics
