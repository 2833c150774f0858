"""Action distributions (hand-computed log-probs and entropies), the Nature-CNN actor-critic, the MLP actor-critic
for any action head with Dict observations, and the Atari env stack (skipped without ale-py / opencv)."""
import math
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from gymnasium import spaces

from proxrl.control.cnn import CNNActorCritic, MLPActorCritic, image_layout
from proxrl.control.distributions import action_dist_for
from proxrl.control.envs_extra import flatten_observations, observation_kind, require_extra_for
from proxrl.control.flat_params import flatten_parameters
from proxrl.control.presets import PRESETS
from proxrl.errors import UserError

LN2 = math.log(2.0)


# ---------------------------------------------------------------- distributions


def test_categorical_log_prob_entropy_by_hand():
    d = action_dist_for(spaces.Discrete(2))
    out = torch.tensor([[0.0, LN2]])  # p = (1/3, 2/3)
    logp, h = d.log_prob_entropy(out, None, torch.tensor([1]))
    assert logp.item() == pytest.approx(math.log(2 / 3), abs=1e-6)
    assert h.item() == pytest.approx(-(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)), abs=1e-6)
    assert d.mode(out).tolist() == [1] and d.action_shape == () and d.out_dim == 2


def test_multi_categorical_log_prob_entropy_by_hand():
    d = action_dist_for(spaces.MultiDiscrete([2, 3]))
    assert (d.kind, d.out_dim, d.action_shape, d.start) == ("multi_categorical", 5, (2,), None)
    out = torch.tensor([[0.0, 0.0, 0.0, 0.0, LN2]])  # p1 = (1/2, 1/2), p2 = (1/4, 1/4, 1/2)
    logp, h = d.log_prob_entropy(out, None, torch.tensor([[1, 2]]))
    assert logp.item() == pytest.approx(math.log(1 / 2) + math.log(1 / 2), abs=1e-6)
    assert h.item() == pytest.approx(LN2 + 1.5 * LN2, abs=1e-6)  # H1 = ln 2, H2 = 2 * (1/4) ln 4 + (1/2) ln 2
    assert d.mode(out).tolist() == [[0, 2]]


def test_bernoulli_log_prob_entropy_by_hand():
    d = action_dist_for(spaces.MultiBinary(2))
    out = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/2, 3/4)
    logp, h = d.log_prob_entropy(out, None, torch.tensor([[1, 0]]))
    assert logp.item() == pytest.approx(math.log(1 / 2) + math.log(1 / 4), abs=1e-6)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert h.item() == pytest.approx(LN2 + h2, abs=1e-6)
    assert d.mode(out).tolist() == [[0, 1]]
    # extreme logits stay finite (softplus form)
    logp, h = d.log_prob_entropy(torch.tensor([[100.0, -100.0]]), None, torch.tensor([[0, 1]]))
    assert logp.item() == pytest.approx(-200.0, rel=1e-6) and h.item() == pytest.approx(0.0, abs=1e-6)


def test_gaussian_log_prob_entropy_by_hand():
    d = action_dist_for(spaces.Box(-1, 1, (2,)))
    log_std = torch.tensor([0.0, LN2])  # sigma = (1, 2)
    logp, h = d.log_prob_entropy(torch.zeros(1, 2), log_std, torch.tensor([[1.0, 2.0]]))
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    assert logp.item() == pytest.approx((-0.5 - half_log_2pi) + (-0.5 - LN2 - half_log_2pi), abs=1e-6)
    assert h.item() == pytest.approx(2 * (0.5 + half_log_2pi) + LN2, abs=1e-6)


@pytest.mark.parametrize("space", [spaces.Discrete(3), spaces.MultiDiscrete([2, 3]), spaces.MultiBinary(3)])
def test_sampling_frequencies_and_logprobs(space):
    d = action_dist_for(space)
    gen = torch.Generator().manual_seed(0)
    out = torch.tensor([[0.5, -1.0, 0.25, 1.0, 0.0][: d.out_dim]]).repeat(20_000, 1)
    action, logp = d.sample(out, None, gen)
    assert action.dtype == torch.int64 and action.shape == (20_000,) + d.action_shape
    ref_logp, _ = d.log_prob_entropy(out, None, action)
    torch.testing.assert_close(logp, ref_logp)
    # empirical log-likelihood matches minus the entropy (law of large numbers)
    _, h = d.log_prob_entropy(out[:1], None, action[:1])
    assert (-logp.mean()).item() == pytest.approx(h.item(), abs=0.03)


def test_to_env_offsets_and_dtypes():
    d = action_dist_for(spaces.MultiDiscrete([2, 3], start=[1, -1]))
    assert d.to_env(np.array([[0, 2]])).tolist() == [[1, 1]]
    assert d.to_env(np.array([[1, 0]]))[0] in spaces.MultiDiscrete([2, 3], start=[1, -1])
    b = action_dist_for(spaces.MultiBinary(3))
    assert b.to_env(np.array([[1, 0, 1]])).dtype == np.int8


@pytest.mark.parametrize("space", [spaces.Box(-1, 1, (2, 2)), spaces.Discrete(3, start=1), spaces.Text(5),
                                   spaces.MultiBinary([2, 2])])
def test_unsupported_action_spaces(space):
    with pytest.raises(UserError, match="unsupported action space"):
        action_dist_for(space)


# ---------------------------------------------------------------- CNN actor-critic


def _orthonormal_rows(w: torch.Tensor, gain: float) -> bool:
    m = w.reshape(w.shape[0], -1)
    eye = torch.eye(m.shape[0]) if m.shape[0] <= m.shape[1] else None
    gram = m @ m.T if eye is not None else m.T @ m
    return torch.allclose(gram, gain**2 * torch.eye(gram.shape[0]), atol=1e-4 * max(1.0, gain**2))


def test_cnn_shapes_init_and_shared_trunk():
    torch.manual_seed(0)
    pol = CNNActorCritic((4, 84, 84), action_dist_for(spaces.Discrete(4)))
    convs = [m for m in pol.trunk.convs if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 4, 8, 8), (64, 32, 4, 4), (64, 64, 3, 3)]
    assert pol.trunk.fc[0].in_features == 64 * 7 * 7 and pol.trunk.fc[0].out_features == 512
    for layer in convs + [pol.trunk.fc[0]]:
        assert _orthonormal_rows(layer.weight, math.sqrt(2.0)) and not layer.bias.any()
    assert _orthonormal_rows(pol.actor_head.weight, 0.01) and _orthonormal_rows(pol.critic_head.weight, 1.0)
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    action, logp, value = pol.act(obs, torch.Generator().manual_seed(1))
    action = action.clone()  # act() runs in inference mode; the rollout buffer holds copies like this
    assert action.shape == (5,) and logp.shape == (5,) and value.shape == (5,)
    out, v = pol.actor_value(obs)
    torch.testing.assert_close(out, pol.actor(obs))
    torch.testing.assert_close(v, pol.value(obs))
    torch.testing.assert_close(v, value)
    # uint8 pixels are scaled inside: the same values as float give the same outputs
    torch.testing.assert_close(pol.actor(obs.float()), out)
    lp, ent, val = pol.evaluate(obs, action)
    torch.testing.assert_close(lp, logp)
    assert ent.shape == (5,) and (ent > 0).all()
    assert pol.deterministic_action(obs).tolist() == out.argmax(-1).tolist()
    torch.testing.assert_close(pol.action_probs(obs).sum(-1), torch.ones(5))


def test_cnn_scales_pixels_by_255():
    torch.manual_seed(0)
    pol = CNNActorCritic((1, 36, 36), action_dist_for(spaces.Discrete(2)))
    x = torch.full((1, 1, 36, 36), 255, dtype=torch.uint8)
    conv1 = pol.trunk.convs[0]
    # first conv on all-ones input: bias + sum of each filter's weights
    expected = conv1.weight.sum(dim=(1, 2, 3))
    got = pol.trunk.convs[1](conv1(x.float() / 255.0))[0, :, 0, 0]
    torch.testing.assert_close(torch.relu(expected), got)
    torch.testing.assert_close(pol.trunk(x), pol.trunk(torch.ones(1, 1, 36, 36) * 255))


def test_cnn_channels_last_matches_channels_first():
    torch.manual_seed(0)
    chw = CNNActorCritic((3, 40, 44), action_dist_for(spaces.Box(-1, 1, (2,))), init_log_std=-0.5)
    hwc = CNNActorCritic((40, 44, 3), action_dist_for(spaces.Box(-1, 1, (2,))), channels_last=True)
    hwc.load_state_dict(chw.state_dict())
    x = torch.randint(0, 256, (2, 3, 40, 44), dtype=torch.uint8)
    torch.testing.assert_close(hwc.actor(x.permute(0, 2, 3, 1)), chw.actor(x))
    assert not chw.discrete and chw.log_std.tolist() == [-0.5, -0.5]
    assert image_layout((40, 44, 3)) == "hwc" and image_layout((4, 84, 84)) == "chw" and image_layout((3,)) is None


def test_cnn_batch_layout_keeps_values_and_minibatches_keep_the_layout():
    torch.manual_seed(0)
    net = CNNActorCritic((4, 40, 40), action_dist_for(spaces.Discrete(3)))
    x = torch.randint(0, 256, (6, 4, 40, 40), dtype=torch.uint8)
    y = net.batch_layout(x)
    assert torch.equal(y, x) and y.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last)
    mb = y[torch.tensor([4, 1, 2])]
    assert mb.is_contiguous(memory_format=torch.channels_last)  # what the update's minibatches get
    assert torch.equal(net.actor_value(mb)[1], net.actor_value(x[torch.tensor([4, 1, 2])])[1])
    hwc = CNNActorCritic((40, 40, 4), action_dist_for(spaces.Discrete(3)), channels_last=True)
    z = x.permute(0, 2, 3, 1).contiguous()
    assert hwc.batch_layout(z) is z


def test_cnn_rejects_small_images():
    with pytest.raises(UserError, match="too small"):
        CNNActorCritic((4, 20, 84), action_dist_for(spaces.Discrete(2)))


def test_cnn_learns_with_autograd_on_flat_parameters():
    """Policy gradient on a two-image bandit: the flat gradient is filled and the rewarded actions become likely."""
    torch.manual_seed(0)
    pol = CNNActorCritic((1, 36, 36), action_dist_for(spaces.Discrete(2)))
    flat = flatten_parameters(pol)
    opt = torch.optim.Adam([flat], lr=1e-3)
    obs = torch.zeros(2, 1, 36, 36, dtype=torch.uint8)
    obs[1] = 255  # image 0 wants action 0, image 1 action 1
    target = torch.tensor([0, 1])
    initial_error = pol.value(obs).detach().sub(1.0).abs().max()
    for _ in range(60):
        flat.grad.zero_()
        logp, ent, value = pol.evaluate(obs, target)
        loss = -logp.mean() + 0.5 * (value - 1.0).square().mean()
        loss.backward()
        assert flat.grad.abs().sum() > 0
        opt.step()
    assert pol.deterministic_action(obs).tolist() == [0, 1]
    assert pol.value(obs).detach().sub(1.0).abs().max() < 0.5 * initial_error


# ---------------------------------------------------------------- MLP heads and Dict observations


class _DictEnv(gym.Env):
    """Dict observation {pos: Box(2), mode: Discrete(3)}, MultiDiscrete([3, 2]) actions; 5-step episodes."""

    observation_space = spaces.Dict({"pos": spaces.Box(-1, 1, (2,)), "mode": spaces.Discrete(3)})
    action_space = spaces.MultiDiscrete([3, 2])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return {"pos": np.zeros(2, np.float32), "mode": 1}, {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action))
        self.t += 1
        return {"pos": np.full(2, 0.1 * self.t, np.float32), "mode": 2}, float(action[0]), False, self.t >= 5, {}


def test_dict_observations_flattened_and_multidiscrete_mlp():
    venv = gym.vector.SyncVectorEnv([lambda: flatten_observations(_DictEnv())] * 3)
    obs, _ = venv.reset(seed=0)
    # Dict keys in sorted order: mode (one-hot of 3), pos (2)
    assert obs.shape == (3, 5) and obs.dtype == np.float32 and obs[0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert observation_kind(venv.single_observation_space) == "vector"
    dist = action_dist_for(venv.single_action_space)
    torch.manual_seed(0)
    pol = MLPActorCritic(obs.shape[1], dist, (16,), "tanh")
    action, logp, value = pol.act(torch.as_tensor(obs), torch.Generator().manual_seed(0))
    action = action.clone()
    assert action.shape == (3, 2) and pol.discrete
    venv.step(dist.to_env(action.numpy()))
    lp, ent, v = pol.evaluate(torch.as_tensor(obs), action)
    torch.testing.assert_close(lp, logp)
    # fresh policy: head gain 0.01 -> nearly uniform -> entropy ln 3 + ln 2
    assert ent.mean().item() == pytest.approx(math.log(3) + LN2, abs=1e-3)
    venv.close()


def test_observation_kind_rejects_unsupported():
    assert observation_kind(spaces.Box(0, 255, (4, 84, 84), np.uint8)) == "image"
    with pytest.raises(UserError, match="unsupported observation space"):
        observation_kind(spaces.Discrete(4))
    with pytest.raises(UserError, match="unsupported observation space"):
        observation_kind(spaces.Box(0, 1, (2, 3)))


# ---------------------------------------------------------------- extras missing


def test_missing_extras_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # importlib.util.find_spec -> None: "not installed"
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(UserError, match=r"pip install 'proxrl\[atari\]'") as e:
        require_extra_for("ALE/Breakout-v5")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"pip install 'proxrl\[atari\]'"):
        require_extra_for("PongNoFrameskip-v4")
    with pytest.raises(UserError, match=r"pip install 'proxrl\[mujoco\]'"):
        require_extra_for("HalfCheetah-v5")
    require_extra_for("CartPole-v1")  # no extra needed


# ---------------------------------------------------------------- Atari env stack (needs ale-py and opencv)


def _atari():
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    from proxrl.control import atari

    return atari


def test_atari_env_preprocessing():
    atari = _atari()
    assert atari.is_atari("ALE/Pong-v5") and atari.is_atari("BreakoutNoFrameskip-v4") and not atari.is_atari("CartPole-v1")
    env = atari.make_atari_env("ALE/Breakout-v5")
    assert env.observation_space.shape == (4, 84, 84) and env.observation_space.dtype == np.uint8
    assert env.action_space == spaces.Discrete(4)
    assert observation_kind(env.observation_space) == "image"
    obs, info = env.reset(seed=3)
    assert info["episode_frame_number"] >= 2  # >= 1 no-op frame, then FIRE (4 frames)
    assert all((obs[i] == obs[0]).all() for i in range(4))  # the stack starts filled with the first frame
    prev = obs
    rng = np.random.default_rng(0)
    for _ in range(500):
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(4)))
        assert (obs[:3] == prev[1:]).all()  # oldest frame first, shifted by one each step
        assert reward in (-1.0, 0.0, 1.0)
        prev = obs
        if terminated:
            break
    assert terminated and info["lives"] == 4  # training: the first lost life ends the episode
    assert "episode" in info and info["episode"]["r"] >= 0
    env.close()


def test_atari_eval_env_plays_whole_games_and_is_deterministic():
    atari = _atari()

    def run(seed):
        env = atari.make_atari_env("ALE/Breakout-v5", evaluation=True)
        obs, _ = env.reset(seed=seed)
        frames, lives = [obs], []
        for t in range(1000):
            obs, reward, terminated, truncated, info = env.step(t % 4)
            frames.append(obs)
            lives.append(info["lives"])
            if terminated or truncated:
                break
        env.close()
        return np.stack(frames), lives, terminated

    a, lives, terminated = run(7)
    b, _, _ = run(7)
    assert a.shape == b.shape and (a == b).all()
    # whole games: lives 5 -> 0 within one episode (FireReset relaunched the ball after each lost life)
    assert terminated and lives[-1] == 0 and lives.count(4) > 1 and sorted(set(lives)) == [0, 1, 2, 3, 4, 5]


def test_atari_settings_for_config_yaml():
    atari = _atari()
    s = atari.atari_settings("ALE/Breakout-v5")
    assert yaml.safe_load(yaml.safe_dump(s)) == s
    assert s["noop_max"] == 30 and s["frame_skip"] == 4 and s["frame_stack"] == 4 and s["screen_size"] == 84
    assert s["repeat_action_probability"] == 0.25 and s["terminal_on_life_loss"] and s["clip_rewards"]


def test_ale_native_vector_env_preprocessing_and_seeding():
    atari = _atari()
    venv = atari.make_ale_vector_env("ALE/Breakout-v5", 2)
    assert venv.single_observation_space.shape == (4, 84, 84) and venv.single_observation_space.dtype == np.uint8
    assert venv.single_action_space == spaces.Discrete(4)
    obs, _ = venv.reset(seed=5)
    assert obs.shape == (2, 4, 84, 84)
    prev, ended = obs, np.zeros(2, bool)
    rng = np.random.default_rng(0)
    for _ in range(400):
        obs, reward, terminated, truncated, info = venv.step(rng.integers(0, 4, 2))
        assert set(np.unique(reward)) <= {-1, 0, 1}  # clipped
        keep = ~ended  # NEXT_STEP: the step after an end is a reset step
        assert (obs[keep, :3] == prev[keep, 1:]).all()  # oldest frame first, shifted by one each step
        # training: the first lost life ends the episode (lives still 4 on that step)
        assert (info["lives"][terminated] == 4).all()
        ended = terminated | truncated
        prev = obs
    venv.close()

    def first_frames(n, seed):
        v = atari.make_ale_vector_env("ALE/Breakout-v5", n)
        v.reset(seed=seed)
        for _ in range(30):
            out = v.step(np.full(n, 2))[0]
        v.close()
        return out

    pair = first_frames(2, 11)
    assert (pair[1] == first_frames(1, 12)[0]).all()  # env i gets seed + i, as sync/async envs are seeded
    assert (pair == first_frames(2, 11)).all()


def test_native_vector_mode_for_atari_training_and_evaluation():
    _atari()
    from proxrl.control.envs import make_vector_env

    venv, info = make_vector_env("ALE/Breakout-v5", 2, "native")
    assert type(venv).__name__ == "AtariVectorEnv" and info.obs_kind == "image" and info.obs_shape == (4, 84, 84)
    venv.close()
    venv, _ = make_vector_env("ALE/Breakout-v5", 1, "native", evaluation=True)  # whole games, raw rewards
    assert type(venv).__name__ == "AtariVectorEnv"
    venv.reset(seed=0)
    lives = []
    for t in range(3000):
        _, r, terminated, truncated, info = venv.step(np.array([1 if t % 3 == 0 else t % 4]))
        lives.append(int(info["lives"][0]))
        if terminated[0] or truncated[0]:
            break
    venv.close()
    assert terminated[0] and lives[-1] == 0 and 5 in lives  # one episode = all five lives
    venv, _ = make_vector_env("ALE/Breakout-v5", 1, "auto")  # auto never picks AtariVectorEnv
    assert type(venv).__name__ != "AtariVectorEnv"
    venv.close()
    with pytest.raises(UserError, match="ALE/Nope-v5"):
        atari_mod = _atari()
        atari_mod.make_ale_vector_env("ALE/Nope-v5", 1)
    s = atari_mod.atari_settings("ALE/Breakout-v5", vector_mode="native")
    assert "AtariVectorEnv" in s["training_envs"] and yaml.safe_load(yaml.safe_dump(s)) == s
    assert "async" in atari_mod.atari_settings("ALE/Breakout-v5")["training_envs"]


def test_cnn_bf16_autocast_close_to_float32_and_float32_outputs():
    if not getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)():
        pytest.skip("this CPU has no native bfloat16")
    torch.manual_seed(0)
    d = action_dist_for(spaces.Discrete(4))
    ref = CNNActorCritic((4, 84, 84), d)
    fast = CNNActorCritic((4, 84, 84), d, bf16=True)
    fast.load_state_dict(ref.state_dict())
    obs = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8)
    (o32, v32), (o16, v16) = ref.actor_value(obs), fast.actor_value(obs)
    assert o16.dtype == torch.float32 and v16.dtype == torch.float32
    assert not torch.equal(v16, v32)  # really computed in bf16 ...
    scale = v32.abs().max().item()
    assert (v16 - v32).abs().max().item() < 0.03 * scale  # ... to bf16's ~3 significant digits
    assert (o16 - o32).abs().max().item() < 0.03 * o32.abs().max().item()
    (v16.sum() + o16.sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fast.parameters() if p.requires_grad)


def test_breakout_preset_is_cleanrl_ppo_atari():
    p = PRESETS["ALE/Breakout-v5"]
    expected = {"num_envs": 8, "rollout_steps": 128, "num_minibatches": 4, "epochs": 4, "learning_rate": 2.5e-4,
                "lr_schedule": "linear", "clip_coef": 0.1, "entropy_coef": 0.01, "value_coef": 0.5,
                "max_grad_norm": 0.5, "gamma": 0.99, "gae_lambda": 0.95, "value_clip_coef": 0.1}
    assert {k: p[k] for k in expected} == expected


# ---------------------------------------------------------------- the trainer's PPO update runs these policies as is


@pytest.mark.parametrize("obs_shape,space", [((1, 36, 36), spaces.Discrete(3)), ((5,), spaces.MultiDiscrete([2, 3])),
                                             ((1, 36, 36), spaces.Box(-1, 1, (2,))), ((5,), spaces.MultiBinary(3))])
def test_ppo_update_trains_these_policies_with_autograd(obs_shape, space):
    from proxrl.control.adam import FlatAdam
    from proxrl.control.config import ControlConfig
    from proxrl.control.ppo import ppo_update
    from proxrl.control.rollout import Rollout

    T, N = 8, 4
    torch.manual_seed(0)
    dist = action_dist_for(space)
    image = len(obs_shape) == 3
    pol = CNNActorCritic(obs_shape, dist) if image else MLPActorCritic(obs_shape[0], dist)
    flat = flatten_parameters(pol)
    before = flat.detach().clone()
    obs = torch.randint(0, 256, (T, N, *obs_shape), dtype=torch.uint8) if image else torch.randn(T, N, *obs_shape)
    action, logp, value = pol.act(obs.reshape(-1, *obs_shape), torch.Generator().manual_seed(0))
    rollout = Rollout(
        obs=obs, actions=action.reshape(T, N, *dist.action_shape).clone(), logprobs=logp.reshape(T, N).clone(),
        values=value.reshape(T, N).clone(), next_values=torch.zeros(T, N), rewards=torch.randn(T, N),
        terminated=torch.zeros(T, N, dtype=torch.bool), truncated=torch.zeros(T, N, dtype=torch.bool),
        valid=torch.ones(T, N, dtype=torch.bool), episode_returns=[], episode_lengths=[],
    )
    cfg = ControlConfig(num_envs=N, rollout_steps=T, num_minibatches=2, epochs=2, entropy_coef=0.01)
    metrics = ppo_update(pol, FlatAdam(flat, lr=1e-3, eps=1e-5), flat, rollout, cfg, 0.2,
                         torch.Generator().manual_seed(0))
    assert all(math.isfinite(metrics[k]) for k in ("policy_loss", "value_loss", "entropy", "approx_kl"))
    assert metrics["approx_kl"] > 0 and not torch.equal(flat.detach(), before)
    # the first minibatch sees the rollout's own policy: entropy starts near the uniform one for discrete heads
    if dist.kind == "categorical":
        assert metrics["entropy"] == pytest.approx(math.log(3), abs=0.05)
