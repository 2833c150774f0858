"""Rollout semantics on tiny hand-computable envs: truncation bootstrap, termination, NEXT_STEP reset steps,
raw vs clipped Box actions, unsupported spaces."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from proxrl.control.envs import make_vector_env
from proxrl.control.policy import ActorCritic
from proxrl.control.ppo import compute_advantages
from proxrl.control.rollout import Collector
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.errors import UserError

torch.set_num_threads(1)


class CounterEnv(gym.Env):
    """obs = [steps taken in this episode], reward 1 per step; terminates at ``term_at`` if given."""

    def __init__(self, term_at: int | None = None, box_actions: bool = False):
        self.observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32) if box_actions else spaces.Discrete(2)
        self.term_at = term_at
        self.received: list = []
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.received.append(np.array(action, copy=True))
        self.t += 1
        terminated = self.term_at is not None and self.t >= self.term_at
        return np.array([float(self.t)], np.float32), 1.0, terminated, False, {}


def _policy_with_value(info, value_bias=10.0, init_log_std=0.0):
    """Policy whose critic is exactly V(obs) = 10 + obs[0]."""
    torch.manual_seed(0)
    pol = ActorCritic(info.obs_dim, info.action_dim, info.discrete, (), "tanh", init_log_std)
    with torch.no_grad():
        pol.critic[0].weight.fill_(1.0)
        pol.critic[0].bias.fill_(value_bias)
    return pol


def _collect(factory, steps, num_envs=1, init_log_std=0.0):
    venv, info = make_vector_env("custom", num_envs, "sync", factory)
    pol = _policy_with_value(info, init_log_std=init_log_std)
    col = Collector(venv, info, steps, ObsNormalizer(1, False), RewardScaler(num_envs, 0.5, False), np.random.default_rng(0))
    col.reset(seed=0)
    ro = col.collect(pol)
    ro.policy = pol
    return venv, ro


def test_truncation_bootstraps_from_true_final_observation():
    venv, ro = _collect(lambda: gym.wrappers.TimeLimit(CounterEnv(), max_episode_steps=3), steps=6)
    # t: 0 1 2 | 3 = NEXT_STEP reset step (ignored action) | 4 5
    assert ro.obs[:, 0, 0].tolist() == [0, 1, 2, 3, 0, 1]
    assert ro.truncated[:, 0].tolist() == [False, False, True, False, False, False]
    assert not ro.terminated.any()
    assert ro.valid[:, 0].tolist() == [True, True, True, False, True, True]
    assert ro.rewards[:, 0].tolist() == [1, 1, 1, 0, 1, 1]
    # V(final obs [3]) = 13 is the bootstrap of the truncated step, not V(reset obs [0]) = 10.
    assert ro.next_values[2, 0].item() == pytest.approx(13.0)
    _, returns = compute_advantages(ro, gamma=0.5, lam=1.0)
    r2 = 1 + 0.5 * 13
    expected = [1 + 0.5 * (1 + 0.5 * r2), 1 + 0.5 * r2, r2]
    assert returns[:3, 0].tolist() == pytest.approx(expected)
    # last real step bootstraps from V(obs after the rollout) = V([2]) = 12
    assert returns[5, 0].item() == pytest.approx(1 + 0.5 * 12)
    venv.close()


def test_termination_does_not_bootstrap():
    venv, ro = _collect(lambda: CounterEnv(term_at=3), steps=5)
    assert ro.terminated[:, 0].tolist() == [False, False, True, False, False]
    assert ro.valid[:, 0].tolist() == [True, True, True, False, True]
    adv, returns = compute_advantages(ro, gamma=0.5, lam=1.0)
    assert returns[:3, 0].tolist() == pytest.approx([1.75, 1.5, 1.0])
    assert adv[2, 0].item() == pytest.approx(1.0 - 12.0)  # r - V(s2)
    assert ro.episode_returns == [3.0] and ro.episode_lengths == [3]
    venv.close()


def test_box_actions_clipped_for_env_but_stored_raw():
    venv, ro = _collect(lambda: CounterEnv(box_actions=True), steps=50, init_log_std=1.5)
    raw = ro.actions[:, 0, 0].numpy()
    sent = np.array([a[0] for a in venv.envs[0].unwrapped.received])
    assert (np.abs(raw) > 1).any(), "test needs samples outside the bounds"
    assert np.array_equal(sent, np.clip(raw, -1.0, 1.0))
    # the stored log-prob is the Gaussian log-density of the raw (unclipped) sample
    with torch.no_grad():
        logp, _, _ = ro.policy.evaluate(ro.obs[:, 0], ro.actions[:, 0])
    assert torch.allclose(logp, ro.logprobs[:, 0], atol=1e-5)
    venv.close()


def test_native_cartpole_is_used_and_next_step():
    venv, info = make_vector_env("CartPole-v1", 4, "auto")
    assert type(venv).__name__ == "CartPoleVectorEnv"
    assert info.discrete and info.obs_dim == 4 and info.action_dim == 2
    venv.close()
    venv, _ = make_vector_env("CartPole-v1", 2, "sync")
    assert isinstance(venv, gym.vector.SyncVectorEnv)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    venv.close()


@pytest.mark.parametrize("env_id,num_envs", [("Pendulum-v1", 3), ("CartPole-v1", 2), ("Pendulum-v1", 1)])
def test_lean_sync_vector_env_steps_exactly_as_gymnasiums(env_id, num_envs):
    """make_vector_env's sync envs (LeanSyncVectorEnv) return what Gymnasium's SyncVectorEnv returns, bit for bit,
    through terminations (CartPole) and truncations (Pendulum at 200 steps) and the NEXT_STEP reset steps after them."""
    from proxrl.control.envs import LeanSyncVectorEnv

    lean, _ = make_vector_env(env_id, num_envs, "sync")
    assert type(lean) is LeanSyncVectorEnv
    ref = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * num_envs,
                                   autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    seeds = [7 + i for i in range(num_envs)]
    obs_a, _ = lean.reset(seed=seeds)
    obs_b, _ = ref.reset(seed=seeds)
    np.testing.assert_array_equal(obs_a, obs_b)
    ref.action_space.seed(3)
    resets = 0
    for _ in range(450):
        action = ref.action_space.sample()
        got, want = lean.step(action.copy()), ref.step(action.copy())
        for a, b in zip(got[:4], want[:4]):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
        resets += int(np.sum(got[2] | got[3]))
    assert resets >= num_envs  # episode ends (and the reset steps after them) were compared too
    lean.close()
    ref.close()


class _SpaceEnv(gym.Env):
    def __init__(self, obs_space, act_space):
        self.observation_space, self.action_space = obs_space, act_space

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


@pytest.mark.parametrize(
    "obs_space, act_space, name",
    [
        (spaces.Discrete(5), spaces.Discrete(2), "Discrete"),
        (spaces.Box(0, 1, (84, 84, 3), np.float32), spaces.Discrete(2), "Box"),  # float images: not pixels
        (spaces.Box(-1, 1, (2, 3)), spaces.Discrete(2), "Box"),
        (spaces.Box(-1, 1, (2,)), spaces.Box(-1, 1, (2, 2)), "Box"),
        (spaces.Box(-1, 1, (2,)), spaces.MultiDiscrete([[2, 3], [2, 2]]), "MultiDiscrete"),
    ],
)
def test_unsupported_spaces_raise_user_error(obs_space, act_space, name):
    """(Dict observations, uint8 images, MultiDiscrete/MultiBinary actions are supported: test_control_spaces.py.)"""
    with pytest.raises(UserError, match=f"unsupported .*space {name}"):
        make_vector_env("custom", 1, "sync", lambda: _SpaceEnv(obs_space, act_space))


@pytest.mark.parametrize("hidden,activation,depth", [((16, 16), "tanh", 3), ((256, 256), "relu", 3), ((200,), "tanh", 2)])
def test_numpy_rollout_policy_fused_or_split_matches_torch(hidden, activation, depth):
    """Narrow MLPs run fused (block-diagonal), wide ones split after the first layer: both equal the torch modules."""
    from proxrl.control.policy import FUSE_MAX_WIDTH, NumpyPolicy

    torch.manual_seed(1)
    pol = ActorCritic(17, 6, False, hidden, activation, -2.0)
    fast = NumpyPolicy(pol)
    assert (fast.split_at is not None) == (max(hidden) > FUSE_MAX_WIDTH)
    assert len(fast.layers) == (1 if fast.split_at is not None else depth)
    obs = torch.randn(9, 17)
    noise = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    action, logp, value = fast.act(obs.numpy(), noise=noise)
    with torch.no_grad():
        np.testing.assert_allclose(value, pol.value(obs).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(action, (pol.actor(obs) + torch.exp(pol.log_std) * torch.from_numpy(noise)).numpy(),
                                   rtol=1e-5, atol=1e-5)
        ref_logp, _, _ = pol.evaluate(obs, torch.from_numpy(action))
    np.testing.assert_allclose(logp, ref_logp.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast.value(obs.numpy()), value)


@pytest.mark.parametrize("discrete", [True, False])
def test_numpy_rollout_policy_matches_torch_policy(discrete):
    from proxrl.control.policy import NumpyPolicy

    torch.manual_seed(0)
    pol = ActorCritic(5, 3, discrete, (16, 16), "tanh", -0.3)
    with torch.no_grad():  # make the actor far from uniform
        pol.actor[-1].weight.mul_(200.0)
    obs = torch.randn(4000, 5)
    fast = NumpyPolicy(pol)
    action, logp, value = fast.act(obs.numpy(), np.random.default_rng(0))
    ref_logp, _, ref_value = pol.evaluate(obs, torch.from_numpy(np.asarray(action)))
    assert np.allclose(logp, ref_logp.detach().numpy(), atol=1e-4)
    assert np.allclose(value, ref_value.detach().numpy(), atol=1e-5)
    if discrete:  # sampled frequencies follow the policy's probabilities
        probs = pol.action_probs(obs).mean(0).numpy()
        freq = np.bincount(action, minlength=3) / len(action)
        assert np.allclose(freq, probs, atol=0.03)
    else:
        z = (action - pol.actor(obs).detach().numpy()) / np.exp(-0.3)
        assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
