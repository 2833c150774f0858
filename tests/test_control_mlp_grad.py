"""The numpy PPO gradient (numpy MLPs, hand-written backward, closed-form loss gradient) equals autograd's; the
numpy classes refuse layers they do not support, and grad_backend picks numpy only where it can run."""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from proxrl.control import PRESETS, ControlConfig
from proxrl.control.flat_params import flatten_parameters
from proxrl.control.mlp_grad import NumpyMLP
from proxrl.control.policy import ActorCritic, NumpyPolicy
from proxrl.control.ppo import TorchPPOGradient, resolve_grad_backend
from proxrl.control.ppo_grad import NumpyPPOGradient
from proxrl.core import entropy_from_logits, policy_loss, value_loss
from proxrl.errors import UserError

torch.set_num_threads(1)

HIDDEN = {"linear": (), "64": (64,), "64,64": (64, 64), "5,7,3": (5, 7, 3)}


def _setup(discrete, hidden, activation, dtype=torch.float64, m=37, obs_dim=4, n_act=3, seed=0):
    torch.manual_seed(seed)
    policy = ActorCritic(obs_dim, n_act, discrete, hidden, activation, init_log_std=-0.3).to(dtype)
    flat = flatten_parameters(policy)
    with torch.no_grad():  # perturb so that biases and heads are not at their (zero / tiny) init
        flat.add_(0.1 * torch.randn_like(flat))
        obs = torch.randn(m, obs_dim, dtype=dtype)
        out, values = policy.actor(obs), policy.value(obs)
        actions = torch.randint(0, n_act, (m,)) if discrete else out + torch.randn(m, n_act, dtype=dtype)
        logp, _ = policy.log_prob_entropy(out, None if discrete else policy.log_std, actions)
    # old log-probs / values spread enough that some ratios and values fall outside the clip ranges
    old_logp = logp + 0.3 * torch.randn(m, dtype=dtype)
    old_values = values + 0.3 * torch.randn(m, dtype=dtype)
    batch = (obs, actions, old_logp, old_values, torch.randn(m, dtype=dtype), values + torch.randn(m, dtype=dtype))
    return policy, flat, batch


def _grad(fn, flat, batch, as_numpy=False):
    flat.grad.fill_(float("nan"))  # every slot must be written
    stats = fn(*(t.numpy() for t in batch)) if as_numpy else fn(*batch)
    return flat.grad.clone(), stats


@pytest.mark.parametrize(
    "discrete,hidden,activation,clip_value,entropy_coef,normalize_advantages",
    [
        (d, h, a, cv, e, n)
        for d, h, a, cv, e, n in itertools.product([True, False], HIDDEN, ["tanh", "relu"], [None, 0.2], [0.0, 0.01],
                                                    [True, False])
        if n or (cv is None and e == 0.0)
    ],
)
def test_fast_gradients_equal_autograd_float64(discrete, hidden, activation, clip_value, entropy_coef,
                                               normalize_advantages):
    cfg = ControlConfig(**{**PRESETS["CartPole-v1"], "value_clip_coef": clip_value, "entropy_coef": entropy_coef,
                           "value_coef": 0.7, "normalize_advantages": normalize_advantages})
    policy, flat, batch = _setup(discrete, HIDDEN[hidden], activation)
    ref_grad, ref_stats = _grad(TorchPPOGradient(policy, flat, cfg, clip_coef=0.15), flat, batch)
    np_grad, np_stats = _grad(NumpyPPOGradient(policy, cfg, clip_coef=0.15), flat, batch, as_numpy=True)
    assert ref_grad.abs().max() > 1e-3 and torch.isfinite(ref_grad).all()
    assert 0 < ref_stats[4] < 1  # some ratios clipped, some not: both branches of the surrogate are exercised
    torch.testing.assert_close(np_grad, ref_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np_stats, ref_stats, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("discrete", [True, False], ids=["Discrete", "Box"])
def test_fast_gradients_float32_match_autograd(discrete):
    """In training precision (float32, minibatch 256, 64x64 tanh) the gradients agree to rounding."""
    cfg = ControlConfig(**PRESETS["CartPole-v1"])
    policy, flat, batch = _setup(discrete, (64, 64), "tanh", dtype=torch.float32, m=256)
    ref_grad, ref_stats = _grad(TorchPPOGradient(policy, flat, cfg, clip_coef=0.2), flat, batch)
    np_grad, np_stats = _grad(NumpyPPOGradient(policy, cfg, clip_coef=0.2), flat, batch, as_numpy=True)
    assert np_grad.dtype == torch.float32
    torch.testing.assert_close(np_grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())
    np.testing.assert_allclose(np_stats, ref_stats, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("discrete", [True, False], ids=["Discrete", "Box"])
def test_surrogate_gradient_on_ties_and_clip_boundaries_equals_autograd(discrete):
    """Ratios exactly at 1 - eps, 1, 1 + eps and beyond, with advantages of both signs and exactly 0: where min()
    ties and clamp() sits on its boundary the closed form must still give autograd's gradient."""
    cfg = ControlConfig(**{**PRESETS["CartPole-v1"], "normalize_advantages": False})
    eps = 0.25  # exact in binary: 1 +- eps and log(1 +- eps) ratios are reproducible
    policy, flat, batch = _setup(discrete, (8,), "tanh", m=24)
    obs, actions = batch[0], batch[1]
    with torch.no_grad():
        logp = policy.evaluate(obs, actions)[0]
    ratios = torch.tensor([1 - eps, 1.0, 1 + eps, 0.5, 1.5, 1 + eps / 2] * 4, dtype=torch.float64)
    adv = torch.tensor([1.0] * 6 + [-1.0] * 6 + [0.0] * 6 + [2.0, -2.0, 0.5, -0.5, 3.0, -3.0], dtype=torch.float64)
    old_logp = logp - torch.log(ratios)
    batch = (obs, actions, old_logp, batch[3], adv, batch[5])
    ref_grad, ref_stats = _grad(TorchPPOGradient(policy, flat, cfg, clip_coef=eps), flat, batch)
    np_grad, np_stats = _grad(NumpyPPOGradient(policy, cfg, clip_coef=eps), flat, batch, as_numpy=True)
    torch.testing.assert_close(np_grad, ref_grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np_stats[:4], ref_stats[:4], rtol=1e-9, atol=1e-12)
    # clipfrac counts |r - 1| > eps: a ratio on the boundary may round to either side of it in exp(log r)
    assert abs(np_stats[4] - ref_stats[4]) <= 8 / 24


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_gradients_with_large_products_match_autograd(dtype):
    """HalfCheetah's shapes (17 -> 256 -> 256 -> 6 ReLU, minibatch 64): the 256x256 products are large enough to
    run in torch.mm (mlp_grad.TORCH_MM_MACS), the small ones in numpy; the gradients still equal autograd's."""
    from proxrl.control.mlp_grad import TORCH_MM_MACS

    assert 64 * 256 * 256 >= TORCH_MM_MACS > 64 * 17 * 256  # both kinds of product occur below
    cfg = ControlConfig(**PRESETS["HalfCheetah-v5"])
    policy, flat, batch = _setup(False, (256, 256), "relu", dtype=dtype, m=64, obs_dim=17, n_act=6)
    ref_grad, ref_stats = _grad(TorchPPOGradient(policy, flat, cfg, clip_coef=0.1), flat, batch)
    fast = NumpyPPOGradient(policy, cfg, clip_coef=0.1)
    assert fast.pair is not None and 64 >= fast.pair.min_batch  # the batched (PairedMLP) path runs below
    np_grad, np_stats = _grad(fast, flat, batch, as_numpy=True)
    assert np_grad.dtype == dtype and ref_grad.abs().max() > 1e-3
    if dtype == torch.float64:
        torch.testing.assert_close(np_grad, ref_grad, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np_stats, ref_stats, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(np_grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())
        np.testing.assert_allclose(np_stats, ref_stats, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("hidden", [(5, 5), (6, 4, 4), (4, 3, 3, 7)])
def test_paired_mlp_equals_the_two_numpy_mlps(activation, hidden):
    """PairedMLP (both networks' hidden-to-hidden layers as one torch.bmm, elementwise ops over both at once)
    gives the outputs and gradients of running the actor and critic NumpyMLP one after the other (float64)."""
    from proxrl.control.mlp_grad import PairedMLP

    policy, flat, (obs, *_rest) = _setup(True, hidden, activation, m=11, obs_dim=3, n_act=2)  # no log_std slot
    actor, critic = NumpyMLP(policy.actor), NumpyMLP(policy.critic)
    pair = PairedMLP.build(actor, critic)
    assert pair is not None and pair.min_batch >= 1
    x = obs.numpy()
    rng = np.random.default_rng(1)
    g_actor, g_critic = rng.standard_normal((11, 2)), rng.standard_normal((11, 1))
    ref_out, ref_value = actor.forward(x).copy(), critic.forward(x).copy()
    actor.backward(g_actor)
    critic.backward(g_critic)
    ref_grad = flat.grad.clone()
    flat.grad.fill_(float("nan"))  # every slot must be written again
    out, value = pair.forward(x)
    pair.backward(g_actor, g_critic)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat.grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_paired_mlp_only_where_the_two_networks_line_up():
    """No pair (None) for one hidden layer, different hidden sizes or activations, or a critic stored before the
    actor; min_batch keeps CartPole's 64x64 products in numpy and puts HalfCheetah's 256x256 in torch.bmm."""
    from proxrl.control.mlp_grad import TORCH_MM_MACS, PairedMLP

    def pair_of(actor_hidden, critic_hidden, act_a="tanh", act_c="tanh"):
        a = ActorCritic(3, 2, True, actor_hidden, act_a)
        a.critic = ActorCritic(3, 1, True, critic_hidden, act_c).actor
        flatten_parameters(a)
        return PairedMLP.build(NumpyMLP(a.actor), NumpyMLP(a.critic))

    assert pair_of((8, 8), (8, 8)) is not None
    assert pair_of((8,), (8,)) is None  # no hidden-to-hidden layer to batch
    assert pair_of((8, 8), (8, 6)) is None and pair_of((8, 8), (6, 8)) is None
    assert pair_of((8, 8), (8, 8), "tanh", "relu") is None
    policy = ActorCritic(3, 2, True, (8, 8), "tanh")
    flatten_parameters(policy)
    assert PairedMLP.build(NumpyMLP(policy.critic), NumpyMLP(policy.actor)) is None  # second before first in memory
    for hidden, obs_dim, batch, paired in (((64, 64), 4, 256, False), ((256, 256), 17, 64, True)):
        policy = ActorCritic(obs_dim, 2, False, hidden, "tanh")
        flatten_parameters(policy)
        pair = PairedMLP.build(NumpyMLP(policy.actor), NumpyMLP(policy.critic))
        assert (batch >= pair.min_batch) == paired == (batch * hidden[0] * hidden[1] >= TORCH_MM_MACS)


@pytest.mark.parametrize("discrete,hidden,activation", [(True, "64,64", "tanh"), (False, "64", "relu"),
                                                        (True, "linear", "tanh"), (False, "5,7,3", "tanh")])
def test_numpy_mlp_backward_with_any_masked_loss(discrete, hidden, activation):
    """NumpyMLP.backward is exact for any loss of the outputs (here core losses with masks and entropy): autograd
    on the loss graph down to the MLP outputs as leaves, then the hand-written backward through both MLPs."""
    policy, flat, (obs, actions, old_logp, old_values, adv, returns) = _setup(discrete, HIDDEN[hidden], activation)
    mask = torch.rand(obs.shape[0]) > 0.3

    def loss_fn(out, values, log_std):
        logp, ent = policy.log_prob_entropy(out, log_std, actions)
        pg, _ = policy_loss(logp, old_logp, adv, 0.2, mask=mask)
        extra = entropy_from_logits(out).mean() if discrete else (out.square().sum(-1) * mask).mean()
        return pg + 0.6 * value_loss(values, old_values, returns, 0.1, mask=mask) - 0.01 * ent.mean() + 0.1 * extra

    flat.grad.zero_()
    log_std = None if discrete else policy.log_std
    loss_fn(policy.actor(obs), policy.value(obs), log_std).backward()
    ref = flat.grad.clone()

    actor, critic = NumpyMLP(policy.actor), NumpyMLP(policy.critic)
    flat.grad.fill_(float("nan"))
    out = torch.from_numpy(actor.forward(obs.numpy())).requires_grad_()
    values = torch.from_numpy(critic.forward(obs.numpy()).reshape(-1)).requires_grad_()
    leaves = (out, values) if discrete else (out, values, policy.log_std.detach().requires_grad_())
    grads = torch.autograd.grad(loss_fn(*leaves, *([None] if discrete else [])), leaves)
    actor.backward(grads[0].numpy())
    critic.backward(grads[1].numpy().reshape(-1, 1))
    if not discrete:
        policy.log_std.grad.copy_(grads[2])
    torch.testing.assert_close(flat.grad, ref, rtol=1e-10, atol=1e-12)


def test_numpy_views_follow_optimizer_updates():
    """The numpy MLPs are views: an in-place parameter update is seen without rebuilding."""
    policy, flat, (obs, *_rest) = _setup(True, (64, 64), "tanh")
    actor = NumpyMLP(policy.actor)
    with torch.no_grad():
        flat.mul_(1.5)
        ref = policy.actor(obs)
    np.testing.assert_allclose(actor.forward(obs.numpy()), ref.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(NumpyPolicy(policy).value(obs.numpy()),
                               policy.value(obs).detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", [torch.nn.Sigmoid(), torch.nn.GELU(), torch.nn.LayerNorm(64)], ids=lambda m: type(m).__name__)
def test_numpy_classes_raise_on_an_unsupported_layer(layer):
    """An activation the numpy paths do not implement is refused by all three (never silently taken as tanh/ReLU)."""
    policy, flat, _ = _setup(True, (64, 64), "tanh")
    policy.actor[1] = layer  # Linear, <layer>, Linear, Tanh, Linear
    with pytest.raises(ValueError, match=type(layer).__name__):
        NumpyMLP(policy.actor)
    with pytest.raises(ValueError, match=type(layer).__name__):
        NumpyPolicy(policy)
    with pytest.raises(ValueError, match=type(layer).__name__):
        NumpyPPOGradient(policy, ControlConfig(**PRESETS["CartPole-v1"]), clip_coef=0.2)
    with pytest.raises(ValueError, match="activation='gelu'"):
        ActorCritic(4, 2, True, (8,), "gelu")


def test_grad_backend_auto_takes_numpy_only_where_it_can():
    policy, _, _ = _setup(True, (64, 64), "relu")
    assert resolve_grad_backend("auto", policy) == "numpy"
    assert resolve_grad_backend("numpy", policy) == "numpy"
    assert resolve_grad_backend("autograd", policy) == "autograd"

    class Custom(ActorCritic):  # a subclass may change the outputs or the loss: the numpy path cannot know
        pass

    custom = Custom(4, 3, True, (8,))
    other, _, _ = _setup(True, (64, 64), "tanh")
    other.critic[1] = torch.nn.SiLU()
    for unsupported, needle in ((custom, "Custom"), (other, "SiLU")):
        assert resolve_grad_backend("auto", unsupported) == "autograd"
        with pytest.raises(UserError, match=f"grad_backend='numpy' cannot train this policy.*{needle}"):
            resolve_grad_backend("numpy", unsupported)


def _rollout(discrete, t=16, n=4, obs_dim=4, n_act=3, dtype=torch.float64, seed=0):
    from proxrl.control.rollout import Rollout

    g = torch.Generator().manual_seed(seed)
    values = torch.randn(t + 1, n, generator=g, dtype=dtype)
    valid = torch.rand(t, n, generator=g) > 0.1
    return Rollout(
        obs=torch.randn(t, n, obs_dim, generator=g, dtype=dtype),
        actions=torch.randint(0, n_act, (t, n), generator=g) if discrete else torch.randn(t, n, n_act, generator=g, dtype=dtype),
        logprobs=-torch.rand(t, n, generator=g, dtype=dtype) - 0.5,
        values=values[:t], next_values=values[1:],
        rewards=torch.randn(t, n, generator=g, dtype=dtype),
        terminated=torch.rand(t, n, generator=g) > 0.9, truncated=torch.rand(t, n, generator=g) > 0.95, valid=valid,
        episode_returns=[], episode_lengths=[],
    )


@pytest.mark.parametrize("discrete,minibatches,extra", [
    (True, 1, {}), (True, 4, {"value_clip_coef": 0.2, "entropy_coef": 0.01}), (False, 2, {"target_kl": 0.003}),
    (False, 1, {"entropy_coef": 0.01, "normalize_advantages": False}), (True, 3, {"max_grad_norm": None}),
])
def test_ppo_update_backends_agree(discrete, minibatches, extra):
    """Whole updates (epochs, minibatches, clipping, Adam, target-KL stop) give the same weights and metrics."""
    from proxrl.control.adam import FlatAdam
    from proxrl.control.ppo import BACKENDS, ppo_update

    cfg = ControlConfig(**{**PRESETS["CartPole-v1"], "num_envs": 4, "rollout_steps": 16, "epochs": 5,
                           "num_minibatches": minibatches, **extra})
    results = []
    for backend in BACKENDS:
        policy, flat, _ = _setup(discrete, (64, 64), "tanh")
        optimizer = FlatAdam(flat, lr=1e-3, eps=1e-5)
        rollout = _rollout(discrete)
        with torch.no_grad():  # behaviour log-probs near the current policy's, so that the KL starts small
            logp, _, _ = policy.evaluate(rollout.obs, rollout.actions)
            rollout.logprobs = logp + 0.02 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2),
                                                         dtype=logp.dtype)
        metrics = ppo_update(policy, optimizer, flat, rollout, cfg, 0.2, torch.Generator().manual_seed(1),
                             backend=backend)
        results.append((flat.detach().clone(), metrics))
    (ref, ref_metrics), others = results[-1], results[:-1]
    assert BACKENDS[-1] == "autograd" and ref_metrics["minibatch_steps"] > 0
    if "target_kl" in extra:
        assert ref_metrics["early_stop_epoch"] < cfg.epochs
    for weights, metrics in others:
        torch.testing.assert_close(weights, ref, rtol=1e-9, atol=1e-11)
        assert metrics == pytest.approx(ref_metrics, rel=1e-9, abs=1e-11, nan_ok=True)


@pytest.mark.parametrize("backend", ["numpy", "autograd"])
def test_target_kl_stops_above_target_kl_without_a_factor(backend):
    """core.kl_early_stop's rule (approx_kl > target_kl) in the update: a first minibatch whose KL is 1.2x the
    target stops before its step (SB3's 1.5x rule would step on), one whose KL is just below the target steps."""
    from proxrl.control.adam import FlatAdam
    from proxrl.control.ppo import ppo_update

    def run(target_kl_factor):
        policy, flat, _ = _setup(True, (16,), "tanh")
        rollout = _rollout(True)
        rollout.valid[:] = True
        with torch.no_grad():
            logp, _, _ = policy.evaluate(rollout.obs, rollout.actions)
            log_ratio = -0.1 * torch.rand(logp.shape, generator=torch.Generator().manual_seed(3), dtype=logp.dtype)
            rollout.logprobs = logp - log_ratio  # so that r = pi / pi_old = exp(log_ratio) before any step
            kl = ((log_ratio.exp() - 1) - log_ratio).mean().item()  # k3 of the whole (single) minibatch
        cfg = ControlConfig(**{**PRESETS["CartPole-v1"], "num_envs": 4, "rollout_steps": 16, "epochs": 3,
                               "num_minibatches": 1, "target_kl": kl * target_kl_factor})
        before = flat.detach().clone()
        m = ppo_update(policy, FlatAdam(flat, lr=1e-3), flat, rollout, cfg, 0.2, torch.Generator(), backend=backend)
        return m, torch.equal(before, flat.detach())

    stopped, unchanged = run(1 / 1.2)
    assert stopped["minibatch_steps"] == 0 and stopped["early_stop_epoch"] == 1 and unchanged
    went_on, unchanged = run(1.01)
    assert went_on["minibatch_steps"] >= 1 and not unchanged


@pytest.mark.parametrize("backend", ["numpy", "autograd"])
def test_non_finite_loss_stops_the_update_before_any_step(backend):
    """A reward that overflows float32 once squared makes the loss non-finite: the update raises one line naming
    the loss term and where (the caller's `where`, epoch, minibatch) before its optimizer step, without numpy
    warnings; the weights are untouched."""
    from proxrl.control.adam import FlatAdam
    from proxrl.control.ppo import ppo_update
    from proxrl.runs.finite import NonFiniteError

    policy, flat, _ = _setup(True, (16,), "tanh", dtype=torch.float32)
    rollout = _rollout(True, dtype=torch.float32)
    rollout.rewards[3, 1] = 3e38  # finite, but its square is not
    before = flat.detach().clone()
    cfg = ControlConfig(**{**PRESETS["CartPole-v1"], "num_envs": 4, "rollout_steps": 16, "num_minibatches": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would print lines before the one-line error
        with pytest.raises(NonFiniteError, match=r"non-finite (policy_loss|value_loss) \((nan|inf)\) at update 7 "
                                                 r"\(env step 448\), epoch 1, minibatch 1$"):
            ppo_update(policy, FlatAdam(flat, lr=1e-3), flat, rollout, cfg, 0.2, torch.Generator(), backend=backend,
                       where="update 7 (env step 448)")
    assert torch.equal(flat.detach(), before)


def test_numpy_gradient_is_reused_only_while_its_views_hold():
    """for_policy hands back the object built before (reconfigured) while the layers and parameter memory are the
    same, and a new one after a layer swap or a new flat parameter; gradients always match a fresh build."""
    policy, flat, batch = _setup(True, (64, 64), "tanh")
    cfg = ControlConfig(**PRESETS["CartPole-v1"])
    first = NumpyPPOGradient.for_policy(policy, cfg, clip_coef=0.2)
    again = NumpyPPOGradient.for_policy(policy, ControlConfig(**{**PRESETS["CartPole-v1"], "value_coef": 0.7}),
                                        clip_coef=0.1)
    assert again is first and (again.clip_coef, again.value_coef) == (0.1, 0.7)
    got, _ = _grad(again, flat, batch, as_numpy=True)
    ref, _ = _grad(NumpyPPOGradient(policy, ControlConfig(**{**PRESETS["CartPole-v1"], "value_coef": 0.7}), 0.1),
                   flat, batch, as_numpy=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)

    policy.actor[1], policy.actor[3] = torch.nn.ReLU(), torch.nn.ReLU()  # same parameters, other activations
    swapped = NumpyPPOGradient.for_policy(policy, cfg, clip_coef=0.2)
    assert swapped is not first and swapped.actor.relu
    flat2 = flatten_parameters(policy)  # new memory for every parameter
    moved = NumpyPPOGradient.for_policy(policy, cfg, clip_coef=0.2)
    assert moved is not swapped
    got, _ = _grad(moved, flat2, batch, as_numpy=True)
    ref, _ = _grad(NumpyPPOGradient(policy, cfg, 0.2), flat2, batch, as_numpy=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("discrete,hidden", [(True, (64, 64)), (False, (64, 64)), (False, (256, 256)), (True, ())])
def test_numpy_policy_refresh_equals_a_new_build(discrete, hidden):
    """After the weights change, refresh() gives exactly what a newly built NumpyPolicy gives (fused and split
    layouts, Gaussian std included)."""
    policy, flat, (obs, *_rest) = _setup(discrete, hidden, "tanh", dtype=torch.float32)
    fast = NumpyPolicy(policy)
    before = fast.act(obs.numpy(), noise=np.full(obs.shape[0] if discrete else (obs.shape[0], 3), 0.3, np.float32))
    with torch.no_grad():
        flat.add_(0.05 * torch.randn_like(flat))
    noise = np.full(obs.shape[0] if discrete else (obs.shape[0], 3), 0.3, np.float32)
    assert fast.reads(policy)
    fast.refresh()
    got, ref = fast.act(obs.numpy(), noise=noise), NumpyPolicy(policy).act(obs.numpy(), noise=noise)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    assert not np.array_equal(before[2], got[2])  # the values did move
    flatten_parameters(policy)
    assert not fast.reads(policy)


def test_normalized_advantages_equals_core_normalize():
    from proxrl.control.ppo_grad import normalized_advantages
    from proxrl.core import normalize

    adv = torch.randn(37, dtype=torch.float64) * 3 + 1
    got = normalized_advantages(adv.numpy())
    np.testing.assert_allclose(got, normalize(adv).numpy(), rtol=1e-12, atol=1e-12)
    assert abs(got.mean()) < 1e-12 and abs(got.std(ddof=1) - 1) < 1e-6
