"""One PPO update on a collected rollout (Schulman et al. 2017, Algorithm 1), written top to bottom.

1. Advantages and value targets with GAE (:func:`proxrl.core.gae`), truncation bootstrapped from
   ``V(final observation)``, termination not.
2. For ``epochs`` passes over the batch in random minibatches:
   ratio-clipped surrogate (:func:`proxrl.core.policy_loss`), optionally clipped value loss
   (:func:`proxrl.core.value_loss`), entropy bonus;
   ``loss = policy_loss - entropy_coef * entropy + value_coef * value_loss``; one Adam step with the global
   gradient norm clipped to ``max_grad_norm`` (``None``: not clipped).
3. Target-KL early stop (:func:`proxrl.core.kl_early_stop`): once a minibatch's loss is computed, if the
   k3 estimate of ``KL(pi_old || pi)`` on it exceeds ``target_kl``, its gradient step and the remaining
   minibatches and epochs are skipped (SB3's placement, CleanRL's threshold). ``early_stop_epoch`` reports the (1-based) epoch in which it stopped, or
   ``epochs`` when it ran them all.

NEXT_STEP reset steps (``rollout.valid == False``) are not transitions of the MDP: they are dropped from the
batch before the epochs, so each epoch splits the ``B' <= num_envs * rollout_steps`` real transitions into
``min(num_minibatches, B')`` near-equal random minibatches (sizes differ by at most one) and no loss needs
a mask. With ``num_minibatches == 1`` the minibatch is the whole batch, unshuffled (every loss term is a
mean, so the order is irrelevant), and its advantages are normalised once for all epochs (the same numbers).

:func:`ppo_loss` (built from :mod:`proxrl.core`) is the specification of the minibatch loss. Two gradient
backends compute it (``ControlConfig.grad_backend``, resolved by :func:`resolve_grad_backend`):

* ``"autograd"`` (:class:`TorchPPOGradient`): :func:`ppo_loss` on ``policy.evaluate(obs, actions)`` and
  ``loss.backward()``. Runs any policy module with that method (the reference).
* ``"numpy"`` (:class:`~proxrl.control.ppo_grad.NumpyPPOGradient`): the same loss and its exact gradient in
  closed form, and the MLPs' chain rule by hand (:mod:`.mlp_grad`); proxrl's MLP ``ActorCritic`` only, and
  several times faster on small MLPs (figures: benchmarks/README.md).

``tests/test_control_mlp_grad.py`` checks that both give the same gradients and updates (float64).

Every minibatch's loss terms and gradient, and the weights after the update, must be finite: the first
NaN or infinity raises :class:`~proxrl.runs.finite.NonFiniteError` naming it and where (``where``, epoch,
minibatch), before the optimizer step that would spread it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from proxrl import distributed as D
from proxrl.control.adam import FlatAdam, clip_coefficient, grad_norm
from proxrl.control.config import ControlConfig
from proxrl.control.ppo_grad import STAT_NAMES, NumpyPPOGradient, normalized_advantages, numpy_unsupported
from proxrl.control.rollout import Rollout
from proxrl.core import explained_variance, gae, kl_early_stop, normalize, policy_loss, value_loss
from proxrl.errors import UserError
from proxrl.runs.finite import check_finite

__all__ = ["ppo_update", "ppo_loss", "compute_advantages", "resolve_grad_backend", "TorchPPOGradient", "BACKENDS"]

BACKENDS = ("numpy", "autograd")  # what resolve_grad_backend returns; ControlConfig.grad_backend adds "auto"


def resolve_grad_backend(choice: str, policy: nn.Module, device: torch.device | str = "cpu") -> str:
    """``"numpy"`` or ``"autograd"`` for ``policy`` from ``ControlConfig.grad_backend`` (``auto|numpy|autograd``).

    ``auto`` takes numpy exactly when :func:`~proxrl.control.ppo_grad.numpy_unsupported` accepts the policy
    (proxrl's MLP ``ActorCritic``) and ``device`` is the CPU, autograd otherwise; ``numpy`` for any other
    policy or device is a one-line :class:`UserError` saying why.
    """
    if choice == "autograd":
        return "autograd"
    reason = numpy_unsupported(policy)
    if reason is None and torch.device(device).type != "cpu":
        reason = f"it computes on the CPU and the policy is on {torch.device(device)}"
    if choice == "numpy":
        if reason is not None:
            raise UserError(f"grad_backend='numpy' cannot train this policy: {reason}; use --grad-backend auto or "
                            "autograd" + (" (or --device cpu)" if torch.device(device).type != "cpu" else ""))
        return "numpy"
    if choice != "auto":
        raise UserError(f"grad_backend={choice!r} must be one of auto, numpy, autograd")
    return "numpy" if reason is None else "autograd"


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
    normalize_advantages: bool | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO objective of one minibatch (all inputs ``(M,)``), as a loss to minimise (the specification).

    ``loss = policy_loss - entropy_coef * mean(entropy) + value_coef * value_loss`` with advantages
    normalised per minibatch when ``normalize_advantages`` (None: ``cfg.normalize_advantages``); returns
    ``(loss, stats)``, stats the detached 0-d terms named in :data:`~proxrl.control.ppo_grad.STAT_NAMES`.
    """
    if normalize_advantages is None:
        normalize_advantages = cfg.normalize_advantages
    adv = normalize(advantages) if normalize_advantages else advantages
    pg_loss, info = policy_loss(logprobs, old_logprobs, adv, clip_coef)
    v_loss = value_loss(values, old_values, returns, cfg.value_clip_coef)
    ent = entropy.mean()
    loss = pg_loss + cfg.value_coef * v_loss
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * ent
    stats = {"policy_loss": pg_loss.detach(), "value_loss": v_loss.detach(), "entropy": ent.detach(),
             "approx_kl": info["approx_kl"], "clipfrac": info["clipfrac"]}
    return loss, stats


class TorchPPOGradient:
    """:func:`ppo_loss` on ``policy.evaluate(obs, actions)``, gradient by ``loss.backward()`` into the flat gradient.

    Works for any ``nn.Module`` policy with ``evaluate(obs, actions, with_grad_entropy) -> (logprob, entropy,
    value)``, each ``(M,)``, whose parameters live in ``flat_param`` (:func:`~proxrl.control.flat_params.
    flatten_parameters`). Same call signature and result as :class:`~proxrl.control.ppo_grad.NumpyPPOGradient`
    (with tensors instead of arrays).
    """

    def __init__(self, policy: nn.Module, flat_param: torch.nn.Parameter, cfg: ControlConfig, clip_coef: float,
                 normalize_advantages: bool | None = None) -> None:
        self.policy = policy
        self.flat_param = flat_param
        self.cfg = cfg
        self.clip_coef = clip_coef
        # None: cfg.normalize_advantages; False when the caller normalised them already (several processes)
        self.normalize_advantages = cfg.normalize_advantages if normalize_advantages is None else normalize_advantages

    def __call__(self, obs: Tensor, actions: Tensor, old_logprobs: Tensor, old_values: Tensor, advantages: Tensor,
                 returns: Tensor) -> np.ndarray:
        logprobs, entropy, values = self.policy.evaluate(obs, actions, self.cfg.entropy_coef > 0)
        loss, stats = ppo_loss(logprobs, entropy, values, old_logprobs, old_values, advantages, returns, self.cfg,
                               self.clip_coef, normalize_advantages=self.normalize_advantages)
        self.flat_param.grad.zero_()
        loss.backward()
        return torch.stack([stats[k] for k in STAT_NAMES]).double().cpu().numpy()


@np.errstate(over="ignore", invalid="ignore", divide="ignore")  # NaN/inf get one line below, not warnings
def ppo_update(
    policy: nn.Module,
    optimizer: FlatAdam,
    flat_param: torch.nn.Parameter,
    rollout: Rollout,
    cfg: ControlConfig,
    clip_coef: float,
    generator: torch.Generator,
    backend: str | None = None,
    where: str = "this update",
) -> dict[str, float]:
    """Run the PPO epochs on ``rollout``; returns the update's metrics (means over the minibatches run).

    ``flat_param`` is the single flat parameter the optimizer updates (see :mod:`.flat_params`); its
    ``.grad`` holds every parameter's gradient. ``backend``: ``"numpy"`` or ``"autograd"`` (see the module
    docstring); None resolves ``cfg.grad_backend`` for ``policy`` (:func:`resolve_grad_backend`). Both give
    the same gradients up to float rounding. ``where`` (e.g. ``"update 3 (env step 768)"``) starts the
    position named by a :class:`~proxrl.runs.finite.NonFiniteError`.
    """
    if backend is None:
        backend = resolve_grad_backend(cfg.grad_backend, policy)
    device = flat_param.device
    # 1. GAE over the (T, N) rollout, then flatten to a batch of T * N transitions.
    advantages, returns = compute_advantages(rollout, cfg.gamma, cfg.gae_lambda)
    batch = (
        rollout.obs.reshape((-1,) + rollout.obs.shape[2:]),
        rollout.actions.reshape((-1,) + rollout.actions.shape[2:]),
        rollout.logprobs.reshape(-1),
        rollout.values.reshape(-1),
        advantages.reshape(-1),
        returns.reshape(-1),
    )
    # NEXT_STEP reset steps are not transitions: drop them, keep the B' real ones.
    real = rollout.valid.reshape(-1).nonzero().squeeze(1)
    batch = tuple(t[real] for t in batch)
    batch_layout = getattr(policy, "batch_layout", None)
    if batch_layout is not None:  # e.g. images to the CNN's channels-last layout, once (minibatches keep it)
        batch = (batch_layout(batch[0]), *batch[1:])
    n_real = real.numel()
    explained_var = explained_variance(batch[3], batch[5])
    # Several processes: each holds the whole batch (gather_rollout). A large minibatch is split: each process
    # computes the gradient of its contiguous share (advantages normalised over the whole minibatch first) and
    # one all-reduce gives every process the whole minibatch's; a small one every process computes whole
    # (_shared_minibatch_step says when).
    world = D.dist_info().world_size if D.is_distributed() else 1
    rank = D.dist_info().rank if world > 1 else 0
    normalize_here = cfg.normalize_advantages and world > 1
    if backend == "numpy":
        loss_and_grad = NumpyPPOGradient.for_policy(policy, cfg, clip_coef)
        loss_and_grad.normalize_advantages = cfg.normalize_advantages and not normalize_here
        batch = tuple(t.numpy() for t in batch)
    elif backend == "autograd":
        loss_and_grad = TorchPPOGradient(policy, flat_param, cfg, clip_coef,
                                         normalize_advantages=cfg.normalize_advantages and not normalize_here)
        if device.type != "cpu":
            batch = tuple(t.to(device) for t in batch)
    else:
        raise ValueError(f"backend={backend!r}; use one of {BACKENDS}")
    grad = flat_param.grad
    n_splits = min(cfg.num_minibatches, n_real)
    if n_splits <= 1 and world == 1 and cfg.normalize_advantages and n_real:
        # one minibatch: the whole batch in every epoch, so its advantages are normalised once (the same numbers)
        batch = (*batch[:4], _normalized(batch[4]), batch[5])
        loss_and_grad.normalize_advantages = False

    # 2. Epochs of minibatch SGD on the clipped surrogate.
    sums = np.zeros(len(STAT_NAMES))
    n_minibatches = 0
    early_stop_epoch = cfg.epochs
    for epoch in range(cfg.epochs if n_real else 0):  # no real transition (all reset steps): nothing to learn
        epoch_batch = batch
        if n_splits <= 1:  # the whole batch; the loss is a mean, so the order of samples is irrelevant
            minibatches = [slice(None)]
        else:
            perm = torch.randperm(n_real, generator=generator)
            if world == 1 and backend == "numpy":  # shuffle once, then contiguous slices: the same minibatches
                # as gathering each one, in one gather per array instead of one per minibatch (small MLP inputs;
                # image batches keep the per-minibatch gather, which needs no second copy of the batch)
                epoch_batch = tuple(t[perm.numpy()] for t in batch)
                q, r = divmod(n_real, n_splits)  # tensor_split's sizes: the first r parts one longer
                starts = [i * q + min(i, r) for i in range(n_splits + 1)]
                minibatches = [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]
            else:
                minibatches = perm.tensor_split(n_splits)
        stop = False
        for k, idx in enumerate(minibatches):
            if isinstance(idx, Tensor):
                idx = idx.numpy() if backend == "numpy" else idx.to(device)
            # loss = policy_loss - entropy_coef * entropy + value_coef * value_loss; gradient into flat_param.grad
            if world == 1:
                stats = loss_and_grad(*(epoch_batch if isinstance(idx, slice) and idx == slice(None)
                                        else (t[idx] for t in epoch_batch)))
            else:
                stats = _shared_minibatch_step(loss_and_grad, batch, idx, grad, world, rank, normalize_here)
            if not math.isfinite(stats.sum()):  # one sum for the common case; check_finite names the term
                for name, value in zip(STAT_NAMES, stats):
                    check_finite(name, float(value), f"{where}, epoch {epoch + 1}, minibatch {k + 1}")

            # 3. Target-KL early stop: no step on a minibatch whose KL(pi_old || pi) is already too large.
            if kl_early_stop(stats[STAT_NAMES.index("approx_kl")], cfg.target_kl):
                early_stop_epoch = epoch + 1
                stop = True
                break

            norm = grad_norm(grad)
            if not math.isfinite(norm):
                check_finite("gradient", grad, f"{where}, epoch {epoch + 1}, minibatch {k + 1}")
            # global-norm clipping to max_grad_norm, folded into the Adam step (the same update as rescaling grad)
            optimizer.step(clip_coefficient(norm, cfg.max_grad_norm))
            n_minibatches += 1
            sums += stats
        if stop:
            break
    check_finite("weight", flat_param, f"{where}, after the optimizer steps")

    means = (sums / n_minibatches).tolist() if n_minibatches else [float("nan")] * len(STAT_NAMES)
    metrics = dict(zip(STAT_NAMES, means))
    metrics["explained_variance"] = explained_var
    metrics["early_stop_epoch"] = float(early_stop_epoch)
    metrics["minibatch_steps"] = float(n_minibatches)
    metrics["batch_transitions"] = float(n_real)
    return metrics


def _normalized(adv: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Per-minibatch advantage normalisation as the backends compute it (:func:`proxrl.core.normalize`)."""
    return normalize(adv) if isinstance(adv, Tensor) else normalized_advantages(adv)


def _shared_minibatch_step(loss_and_grad, batch: Sequence, idx, grad: Tensor, world: int, rank: int,
                           normalize_here: bool, min_split_work: int = 10_000_000) -> np.ndarray:
    """The loss terms and gradient (into ``grad``) of the minibatch ``batch[i][idx]`` on every process, all of
    them equal. ``batch``: the update's whole batch (every process holds it, :func:`~proxrl.control.rollout.
    gather_rollout`); ``idx``: the minibatch's indices into it, or ``slice(None)`` for all of it.

    If the minibatch is big (``M * grad.numel() >= min_split_work`` samples x parameters), process ``rank``
    gathers and computes only the ``rank``-th of ``world`` contiguous, near-equal parts of it (as
    ``tensor_split``), and one all-reduce of ``[m_r * grad, m_r * stats, m_r]`` gives every process the whole
    minibatch's means (same values as one process up to the order of float sums). Half of a small minibatch
    (CartPole's: 256 x 9,155 = 2.3e6) takes nearly as long as all of it and an all-reduce adds 0.3-2 ms, so on
    the CPU of one machine every process computes a small minibatch whole, with no collective: exactly what one
    process computes, and the same bits on every process (:func:`proxrl.distributed.single_node`). On a GPU
    (atomic-add backward kernels are not bit-reproducible) and across machines small minibatches are split too,
    so the all-reduce keeps the processes identical. The choice depends on sizes and placement only: the same
    on every process and run. Advantages are normalised over the whole minibatch (``normalize_here``)."""
    m = batch[0].shape[0] if isinstance(idx, slice) else len(idx)
    small = m * grad.numel() < min_split_work and grad.device.type == "cpu" and D.single_node()
    # over the whole minibatch, as one process does (the backends were told not to)
    advantages = _normalized(batch[4][idx]) if normalize_here else None
    if small:
        minibatch = [t[idx] for t in batch]
        if advantages is not None:
            minibatch[4] = advantages
        return loss_and_grad(*minibatch)
    start = rank * (m // world) + min(rank, m % world)
    stop = start + m // world + (1 if rank < m % world else 0)
    mine = slice(start, stop) if isinstance(idx, slice) else idx[start:stop]
    part = [t[mine] for t in batch]  # only this process's share is gathered (pixels: the costly copy)
    if advantages is not None:
        part[4] = advantages[start:stop]
    m_r = stop - start
    if m_r > 0:
        stats = loss_and_grad(*part)
    else:  # fewer samples than processes: this one contributes nothing
        grad.zero_()
        stats = np.zeros(len(STAT_NAMES))
    packed = torch.cat([grad.detach() * m_r, torch.as_tensor(np.append(stats, 1.0) * m_r, dtype=grad.dtype,
                                                             device=grad.device)])
    total = D.all_reduce_sum(packed)
    weight = total[-1]
    grad.copy_(total[: grad.numel()] / weight)
    return (total[grad.numel(): -1] / weight).double().cpu().numpy()
