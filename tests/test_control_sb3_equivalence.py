"""One PPO update of proxrl against Stable-Baselines3's on the same rollout, weights and minibatch order.

The benchmarks compare proxrl with SB3 on returns over whole runs, where seed noise hides small differences.
Here the randomness is taken out: SB3 collects one rollout (with ``VecNormalize``, so the rewards are scaled
and truncations bootstrapped as SB3 does it), proxrl's policy gets SB3's initial weights, both run the same
minibatch permutations, and then:

* proxrl's GAE advantages and returns equal SB3's buffer (termination, truncation bootstrap, lambda-returns);
* after ``epochs x minibatches`` Adam steps the weights of both libraries agree to float32 rounding (the gap
  is ~4e-6 of the update's largest step; the test allows 1e-4), for both gradient backends; one changed
  hyperparameter (e.g. the value coefficient without the factor 2 of SB3's MSE, see
  :mod:`proxrl.control.presets`) moves it beyond 1e-3;
* the logged means (policy loss, value loss, entropy, clip fraction) agree;
* proxrl's observation and reward normalisers return what SB3's ``VecNormalize`` returns on the same stream of
  observations, rewards and episode ends.

Pendulum-v1 (Gaussian policy, truncation at 200 steps) and CartPole-v1 (categorical, terminations), 2 envs.
Skipped when stable-baselines3 is not installed (``pip install proxrl[dev]`` installs it).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

sb3 = pytest.importorskip("stable_baselines3")
import gymnasium as gym  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.utils import obs_as_tensor  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize  # noqa: E402

from proxrl.control.adam import FlatAdam  # noqa: E402
from proxrl.control.config import ControlConfig  # noqa: E402
from proxrl.control.flat_params import flatten_parameters  # noqa: E402
from proxrl.control.policy import ActorCritic  # noqa: E402
from proxrl.control.ppo import compute_advantages, ppo_update  # noqa: E402
from proxrl.control.rollout import Rollout  # noqa: E402
from proxrl.control.running_stats import ObsNormalizer, RewardScaler  # noqa: E402

N_ENVS, N_STEPS, BATCH, EPOCHS = 2, 256, 64, 3  # 256 steps: Pendulum truncates (200) inside the rollout
HP = dict(learning_rate=3e-4, gamma=0.98, gae_lambda=0.92, clip_range=0.1, ent_coef=0.01, vf_coef=0.58,
          max_grad_norm=0.5)


def _sb3_model(env_id: str):
    venv = VecNormalize(make_vec_env(env_id, n_envs=N_ENVS, seed=3), gamma=HP["gamma"])
    return sb3.PPO("MlpPolicy", venv, n_steps=N_STEPS, batch_size=BATCH, n_epochs=EPOCHS, seed=3, device="cpu",
                   policy_kwargs={"log_std_init": -1.0, "ortho_init": False, "activation_fn": nn.ReLU,
                                  "net_arch": {"pi": [32, 32], "vf": [32, 32]}}, **HP)


def _collect(model) -> None:
    """One SB3 rollout into ``model.rollout_buffer`` (advantages and returns computed by SB3)."""
    _, callback = model._setup_learn(N_STEPS * N_ENVS, None)
    callback.on_training_start(locals(), globals())
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=N_STEPS)


def _proxrl_policy(model) -> ActorCritic:
    """proxrl's ActorCritic holding SB3's weights (pi/vf MLPs, action_net, value_net, log_std)."""
    p = model.policy
    discrete = not hasattr(p, "log_std")
    n_out = p.action_net.out_features
    ours = ActorCritic(p.observation_space.shape[0], n_out, discrete, (32, 32), "relu", -1.0, ortho_init=False)
    pairs = [(ours.actor[0], p.mlp_extractor.policy_net[0]), (ours.actor[2], p.mlp_extractor.policy_net[2]),
             (ours.actor[4], p.action_net), (ours.critic[0], p.mlp_extractor.value_net[0]),
             (ours.critic[2], p.mlp_extractor.value_net[2]), (ours.critic[4], p.value_net)]
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        if not discrete:
            ours.log_std.copy_(p.log_std)
    return ours


def _rollout_from_buffer(model) -> Rollout:
    """SB3's rollout as a proxrl Rollout: a done step (SB3 has added ``gamma V(final obs)`` to its reward on
    truncation) ends the GAE chain as a termination; the value after the last step is recomputed."""
    buf = model.rollout_buffer
    with torch.no_grad():
        last_values = model.policy.predict_values(obs_as_tensor(model._last_obs, "cpu")).flatten()
    values = torch.as_tensor(buf.values)
    next_values = torch.cat([values[1:], last_values[None]])
    done_after = np.concatenate([buf.episode_starts[1:], model._last_episode_starts[None]]).astype(bool)
    actions = torch.as_tensor(buf.actions)
    if not hasattr(model.policy, "log_std"):
        actions = actions[..., 0].long()
    return Rollout(obs=torch.as_tensor(buf.observations), actions=actions, logprobs=torch.as_tensor(buf.log_probs),
                   values=values, next_values=next_values, rewards=torch.as_tensor(buf.rewards),
                   terminated=torch.as_tensor(done_after), truncated=torch.zeros(done_after.shape, dtype=torch.bool),
                   valid=torch.ones(done_after.shape, dtype=torch.bool), episode_returns=[], episode_lengths=[])


def _permutations(seed: int) -> list[np.ndarray]:
    """The minibatch permutations ppo_update draws from ``torch.Generator().manual_seed(seed)`` (time-major
    indices ``t * N + e``)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(N_STEPS * N_ENVS, generator=g).numpy() for _ in range(EPOCHS)]


def _to_sb3_order(perm: np.ndarray) -> np.ndarray:
    """The same samples in SB3's env-major flattening (``e * T + t``)."""
    return (perm % N_ENVS) * N_STEPS + perm // N_ENVS


def _cfg(env_id: str, **override) -> ControlConfig:
    kw = dict(env_id=env_id, num_envs=N_ENVS, rollout_steps=N_STEPS, num_minibatches=N_STEPS * N_ENVS // BATCH,
              epochs=EPOCHS, learning_rate=HP["learning_rate"], gamma=HP["gamma"], gae_lambda=HP["gae_lambda"],
              clip_coef=HP["clip_range"], entropy_coef=HP["ent_coef"], value_coef=2 * HP["vf_coef"],
              max_grad_norm=HP["max_grad_norm"], normalize_advantages=True, value_clip_coef=None, target_kl=None)
    kw.update(override)
    return ControlConfig(**kw)


def _flat_sb3(model) -> torch.Tensor:
    """SB3's parameters in proxrl's flat order (log_std, actor layers, critic layers)."""
    p = model.policy
    parts = [p.mlp_extractor.policy_net[0], p.mlp_extractor.policy_net[2], p.action_net,
             p.mlp_extractor.value_net[0], p.mlp_extractor.value_net[2], p.value_net]
    flat = [p.log_std.detach().reshape(-1)] if hasattr(p, "log_std") else []
    flat += [t.detach().reshape(-1) for m in parts for t in (m.weight, m.bias)]
    return torch.cat(flat)


@pytest.fixture(scope="module", params=["Pendulum-v1", "CartPole-v1"])
def sb3_update(request):
    """SB3 after one collected rollout and one ``train()``: (env_id, proxrl's policy holding SB3's initial weights,
    SB3's flat weights before and after, SB3's logged values, the rollout as proxrl's, SB3's advantages and
    returns ``(T, N)``). ``np.random.permutation`` is replaced during ``train()`` by proxrl's permutations."""
    torch.set_num_threads(1)
    env_id = request.param
    model = _sb3_model(env_id)
    policy = _proxrl_policy(model)
    _collect(model)
    rollout = _rollout_from_buffer(model)
    before = _flat_sb3(model).clone()
    adv, ret = torch.as_tensor(model.rollout_buffer.advantages), torch.as_tensor(model.rollout_buffer.returns)
    perms = iter([_to_sb3_order(p) for p in _permutations(11)])
    real_permutation = np.random.permutation
    np.random.permutation = lambda n: next(perms)  # SB3's RolloutBuffer.get draws one per epoch
    try:
        model.train()
    finally:
        np.random.permutation = real_permutation
    yield env_id, policy, before, _flat_sb3(model), dict(model.logger.name_to_value), rollout, adv, ret


def _proxrl_after(env_id, policy_template, rollout, backend, **override):
    policy = ActorCritic(*_shape_args(policy_template))
    policy.load_state_dict(policy_template.state_dict())
    flat = flatten_parameters(policy)
    cfg = _cfg(env_id, **override)
    opt = FlatAdam(flat, lr=cfg.learning_rate, eps=1e-5)
    metrics = ppo_update(policy, opt, flat, rollout, cfg, cfg.clip_coef, torch.Generator().manual_seed(11), backend)
    return flat.detach().clone(), metrics


def _shape_args(p: ActorCritic):
    return (p.actor[0].in_features, p.actor[4].out_features, p.discrete, (32, 32), "relu", -1.0, False)


def test_same_initial_weights(sb3_update):
    _, policy, before, *_ = sb3_update
    ours = ActorCritic(*_shape_args(policy))
    ours.load_state_dict(policy.state_dict())
    flat = flatten_parameters(ours)
    assert torch.equal(flat.detach(), before)


def test_gae_equals_sb3(sb3_update):
    _, _, _, _, _, rollout, adv, ret = sb3_update
    ours_adv, ours_ret = compute_advantages(rollout, HP["gamma"], HP["gae_lambda"])
    torch.testing.assert_close(ours_adv.double(), adv.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_ret.double(), ret.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["numpy", "autograd"])
def test_update_equals_sb3(sb3_update, backend):
    env_id, policy, before, after_sb3, logged, rollout, _, _ = sb3_update
    after, metrics = _proxrl_after(env_id, policy, rollout, backend)
    step_sb3 = after_sb3 - before
    assert step_sb3.abs().max() > 1e-3  # the update moved the weights
    gap = (after - after_sb3).abs().max()
    assert gap <= 1e-4 * step_sb3.abs().max(), f"max weight gap {float(gap):.3g} vs step {float(step_sb3.abs().max()):.3g}"
    # SB3's logged means over the update's minibatches; its value loss is the plain MSE (ours 0.5 * MSE)
    assert metrics["policy_loss"] == pytest.approx(logged["train/policy_gradient_loss"], rel=1e-3, abs=1e-6)
    assert metrics["value_loss"] == pytest.approx(logged["train/value_loss"] / 2, rel=1e-3)
    assert metrics["entropy"] == pytest.approx(-logged["train/entropy_loss"], rel=1e-4)
    assert metrics["clipfrac"] == pytest.approx(logged["train/clip_fraction"], abs=1.5 / (N_STEPS * N_ENVS))


@pytest.mark.parametrize("change", [{"value_coef": HP["vf_coef"]}, {"entropy_coef": 0.0}, {"max_grad_norm": None},
                                    {"normalize_advantages": False}, {"gae_lambda": 0.95}])
def test_sb3_comparison_catches_a_changed_hyperparameter(sb3_update, change):
    """The comparison above can fail: one hyperparameter changed (e.g. SB3's vf_coef taken without the factor 2
    of its plain-MSE value loss) moves the weights at least 10x the tolerance away from SB3's."""
    env_id, policy, before, after_sb3, _, rollout, _, _ = sb3_update
    after, _ = _proxrl_after(env_id, policy, rollout, "numpy", **change)
    step_sb3 = after_sb3 - before
    assert (after - after_sb3).abs().max() > 1e-3 * step_sb3.abs().max()


class _Replay(gym.Env):
    """Observations around a non-zero mean, rewards, and episode ends every 17-29 steps, from a seeded stream."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.left = 0

    def _obs(self):
        return (self.rng.normal(5.0, 3.0, 3) * [1, 10, 0.1]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        self.left = int(self.rng.integers(17, 30))
        return self._obs(), {}

    def step(self, action):
        self.left -= 1
        return self._obs(), float(self.rng.normal(1.0, 2.0)), self.left == 0, False, {}


def test_normalisers_equal_vecnormalize():
    """SB3's ``VecNormalize`` (observations: running mean/var, clip 10; rewards: scaled by the running std of the
    discounted return, reset at episode ends) against :class:`ObsNormalizer` + :class:`RewardScaler` fed the raw
    values it saw, 300 steps of 2 envs with 20+ episode ends."""
    gamma = 0.98
    vn = VecNormalize(DummyVecEnv([lambda i=i: _Replay(i) for i in range(2)]), gamma=gamma)
    obs_norm, scaler = ObsNormalizer(3, True), RewardScaler(2, gamma, True)
    out = np.empty((2, 3), np.float32)
    first = vn.reset()
    np.testing.assert_allclose(obs_norm(vn.get_original_obs(), out, update=True), first, rtol=1e-6, atol=1e-6)
    ends = 0
    for _ in range(300):
        obs, reward, done, _ = vn.step(np.zeros(2, dtype=np.int64))
        ends += int(done.sum())
        ours_r = scaler(vn.get_original_reward(), done, np.ones(2, bool))
        np.testing.assert_allclose(ours_r, reward, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(obs_norm(vn.get_original_obs(), out, update=True), obs, rtol=1e-6, atol=1e-6)
    assert ends >= 20
    np.testing.assert_allclose(obs_norm.rms.var, vn.obs_rms.var, rtol=1e-7)
    np.testing.assert_allclose(scaler.rms.var, vn.ret_rms.var, rtol=1e-7)
