"""The trainer beyond classic control (issue 9) and its device option (issue 7), end to end on small runs:
Atari (Nature CNN, uint8 rollouts, exact resume, evaluation), MuJoCo with normalisation in checkpoints,
MultiDiscrete / MultiBinary actions with Dict observations, the torch rollout path, videos, bad input."""
from __future__ import annotations

import shutil
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml
from checkpoint_compare import assert_bitwise_equal, final_tensors
from conftest import importable_module
from gymnasium import spaces

from proxrl.cli import main
from proxrl.control import PRESETS, ControlConfig, evaluate_run, train
from proxrl.control.checkpointing import load_agent
from proxrl.control.cnn import CNNActorCritic, MLPActorCritic
from proxrl.control.envs import make_vector_env
from proxrl.control.policy import ActorCritic
from proxrl.control.rollout import Collector, uses_numpy_rollout
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.runs import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)

QUIET = {"tensorboard": False, "eval_every": 0}




def _interrupted_equals_uninterrupted(cfg: ControlConfig, tmp_path, env_fn=None):
    """Train ``cfg`` once, then again from its first checkpoint; both must end with the same bits."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    last = train(cfg, full, progress=False, env_fn=env_fn)
    shutil.copytree(full, cut)
    ckpts = list_checkpoints(cut)
    assert len(ckpts) >= 2
    for extra in ckpts[1:]:  # "crash" after the first checkpoint
        shutil.rmtree(extra)
    train(cfg, cut, resume=True, progress=False, env_fn=env_fn)
    (ta, sa), (tb, sb) = final_tensors(full), final_tensors(cut)
    assert_bitwise_equal(ta, tb)
    assert sa["action_rng"] == sb["action_rng"] and sa["generator"] == sb["generator"]
    return last


# ------------------------------------------------------------------------------------------------ Atari
def test_atari_run_trains_resumes_bitwise_and_evaluates(tmp_path):
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    cfg = ControlConfig(**{**PRESETS["ALE/Breakout-v5"], "total_steps": 96, "num_envs": 2, "rollout_steps": 16,
                           "num_minibatches": 2, "epochs": 1, "checkpoint_every": 32, "keep_checkpoints": 5,
                           "eval_episodes": 1, "vector_mode": "sync", **QUIET})  # 384 frames
    last = _interrupted_equals_uninterrupted(cfg, tmp_path)
    run = tmp_path / "full"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    atari = saved["run_info"]["atari"]
    assert atari["frame_skip"] == 4 and atari["frame_stack"] == 4 and atari["observation_shape"] == [4, 84, 84]
    assert "FireReset" in atari["wrappers"] and saved["run_info"]["device"] == "cpu"
    agent = load_agent(run)
    assert isinstance(agent.policy, CNNActorCritic) and agent.info.obs_kind == "image"
    assert agent.info.obs_shape == (4, 84, 84) and not agent.obs_norm.enabled
    rows = read_metrics(run)
    assert [r["global_step"] for r in rows] == [32, 64, 96]
    assert all(np.isfinite(r["policy_loss"]) and r["minibatch_steps"] == 2 for r in rows)
    # eval reproduces the final evaluation of training (whole game, deterministic, same seed)
    result = evaluate_run(run)
    assert result["returns"] == [last["eval_return_mean"]] and result["lengths"][0] > 50


def test_atari_native_vector_env_with_bf16_trains_and_resumes_bitwise(tmp_path):
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    if not getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)():
        pytest.skip("this CPU has no native bfloat16")
    cfg = ControlConfig(**{**PRESETS["ALE/Breakout-v5"], "total_steps": 96, "num_envs": 2, "rollout_steps": 16,
                           "num_minibatches": 2, "epochs": 1, "checkpoint_every": 32, "keep_checkpoints": 5,
                           "eval_episodes": 1, "vector_mode": "native", "bf16": True, **QUIET})
    _interrupted_equals_uninterrupted(cfg, tmp_path)
    run = tmp_path / "full"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["bf16"] is True and saved["vector_mode"] == "native"
    assert "AtariVectorEnv" in saved["run_info"]["atari"]["training_envs"]
    agent = load_agent(run)
    assert isinstance(agent.policy, CNNActorCritic) and agent.policy.trunk.bf16
    rows = read_metrics(run)
    assert [r["global_step"] for r in rows] == [32, 64, 96]
    assert all(np.isfinite(r["policy_loss"]) and r["approx_kl"] >= 0 for r in rows)


# ------------------------------------------------------------------------------------------------ MuJoCo
def test_halfcheetah_normalisation_saved_in_checkpoints_and_used_by_eval(tmp_path):
    pytest.importorskip("mujoco")
    cfg = ControlConfig(**{**PRESETS["HalfCheetah-v5"], "total_steps": 384, "rollout_steps": 128, "epochs": 2,
                           "num_minibatches": 2, "checkpoint_every": 128, "keep_checkpoints": 5, "eval_episodes": 1,
                           **QUIET})
    last = _interrupted_equals_uninterrupted(cfg, tmp_path)
    run = tmp_path / "full"
    tensors, _ = final_tensors(run)
    assert tensors["obs_rms.mean"].shape == (17,) and tensors["obs_rms.count"].item() > 384
    assert tensors["ret_rms.var"].dtype == torch.float64 and tensors["ret_rms.var"].item() != 1.0
    assert isinstance(load_agent(run).policy, ActorCritic)
    result = evaluate_run(run)
    assert result["mean_return"] == pytest.approx(last["eval_return_mean"], rel=1e-6)
    t, s = load_checkpoint(latest_checkpoint(run))  # the stats are really used: move them, the return changes
    t["obs_rms.mean"] = t["obs_rms.mean"] + 3.0
    save_checkpoint(latest_checkpoint(run), t, s)
    assert evaluate_run(run)["mean_return"] != pytest.approx(last["eval_return_mean"], rel=1e-3)


# ------------------------------------------------------------------------------------------------ multi-head actions
class ToyEnv(gym.Env):
    """Dict observation {"cue": Discrete(3), "noise": Box(2)}; reward 1 per action component that matches the cue:
    MultiDiscrete([3, 2]) wants (cue, cue % 2), MultiBinary(3) wants the one-hot of the cue. 8 steps."""

    def __init__(self, binary: bool = False):
        self.binary = binary
        self.observation_space = spaces.Dict({"cue": spaces.Discrete(3), "noise": spaces.Box(-1, 1, (2,), np.float32)})
        self.action_space = spaces.MultiBinary(3) if binary else spaces.MultiDiscrete([3, 2])
        self.t = 0

    def _obs(self):
        self.cue = int(self.np_random.integers(3))
        return {"cue": self.cue, "noise": self.np_random.uniform(-1, 1, 2).astype(np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, dtype=self.action_space.dtype)), action
        want = np.eye(3, dtype=int)[self.cue] if self.binary else np.array([self.cue, self.cue % 2])
        reward = float((np.asarray(action) == want).sum())
        self.t += 1
        return self._obs(), reward, False, self.t >= 8, {}


@pytest.mark.parametrize("binary", [False, True], ids=["MultiDiscrete", "MultiBinary"])
def test_multi_head_actions_with_dict_observations_learn_and_resume(tmp_path, binary):
    cfg = ControlConfig(env_id="toy_envs:ToyEnv", num_envs=4, rollout_steps=32, total_steps=3072, num_minibatches=4, epochs=4,
                        learning_rate=3e-3, checkpoint_every=1024, keep_checkpoints=5, eval_episodes=8,
                        entropy_coef=0.0, hidden_sizes="32", **QUIET)
    last = _interrupted_equals_uninterrupted(cfg, tmp_path, env_fn=lambda: ToyEnv(binary))
    agent = load_agent(tmp_path / "full")
    assert isinstance(agent.policy, MLPActorCritic) and agent.info.obs_shape == (5,)  # one-hot(3) + 2
    assert agent.info.dist.kind == ("bernoulli" if binary else "multi_categorical")
    best = 8 * (3 if binary else 2)  # a random policy gets 8 * 1.5 (binary) / 8 * (1/3 + 1/2)
    assert last["eval_return_mean"] >= 0.9 * best, last["eval_return_mean"]


# ------------------------------------------------------------------------------------------------ rollout paths
class _TorchPathActorCritic(ActorCritic):
    """The same network; a subclass, so the rollout runs its torch forward instead of the numpy copy."""


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_torch_rollout_path_samples_what_the_numpy_path_samples(env_id):
    rollouts = []
    for cls in (ActorCritic, _TorchPathActorCritic):
        venv, info = make_vector_env(env_id, 3, "sync")
        torch.manual_seed(0)
        policy = cls(info.obs_dim, info.action_dim, info.discrete, (16,), "tanh", -0.5)
        assert uses_numpy_rollout(policy, torch.device("cpu")) == (cls is ActorCritic)
        col = Collector(venv, info, 40, ObsNormalizer(info.obs_dim, True), RewardScaler(3, 0.9, True),
                        np.random.default_rng(7))
        col.reset(seed=3)
        ro = col.collect(policy)
        rollouts.append({k: getattr(ro, k).clone() for k in ("obs", "actions", "logprobs", "values", "rewards")})
        venv.close()
    a, b = rollouts
    assert torch.equal(a["actions"], b["actions"]) if info.discrete else torch.allclose(a["actions"], b["actions"])
    for k in ("obs", "logprobs", "values", "rewards"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ device
def test_resume_with_another_device_value_gives_identical_weights(tmp_path):
    """Checkpoints are device-independent: a run resumed with --device auto (the CPU here, or a GPU where there is
    one) continues the run saved with --device cpu; on the CPU the weights are identical bit for bit."""
    base = {**PRESETS["Pendulum-v1"], "total_steps": 768, "rollout_steps": 64, "num_minibatches": 2, "epochs": 2,
            "checkpoint_every": 256, "keep_checkpoints": 5, "eval_episodes": 1, **QUIET}
    train(ControlConfig(**base, device="cpu"), tmp_path / "full", progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for extra in list_checkpoints(tmp_path / "cut")[1:]:
        shutil.rmtree(extra)
    result = train(ControlConfig(**base, device="auto"), tmp_path / "cut", resume=True, progress=False)
    assert yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())["device"] == "auto"
    assert yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())["run_info"]["device"] == result["device"]
    (ta, _), (tb, _) = final_tensors(tmp_path / "full"), final_tensors(tmp_path / "cut")
    if result["device"] == "cpu":
        assert_bitwise_equal(ta, tb)
    else:  # another device rounds differently
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-3, atol=1e-3)
    for t in tb.values():
        assert t.device.type == "cpu"


# ------------------------------------------------------------------------------------------------ videos
def test_eval_video_writes_files_and_train_video_every(tmp_path, capsys):
    pytest.importorskip("pygame")
    run = tmp_path / "run"
    code = main(["train", "CartPole-v1", "--run-dir", str(run), "--total-steps", "512", "--eval-every", "0",
                 "--eval-episodes", "1", "--no-progress", "--tensorboard", "false", "--video-every", "256",
                 "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    videos = sorted(p.name for p in (run / "videos").iterdir())
    assert [v.rsplit(".", 1)[0] for v in videos] == ["step-256-episode-0", "step-512-episode-0"]
    code = main(["eval", str(run), "--video", "--video-episodes", "2", "--video-format", "gif", "--episodes", "1"])
    out = capsys.readouterr().out
    assert code == 0
    gifs = sorted((run / "videos").glob("eval-step-512-episode-*.gif"))
    assert [p.name for p in gifs] == ["eval-step-512-episode-0.gif", "eval-step-512-episode-1.gif"]
    assert all(f"video: {p}" in out for p in gifs)
    from PIL import Image

    with Image.open(gifs[0]) as im:
        assert im.size == (600, 400) and im.n_frames >= 2


# ------------------------------------------------------------------------------------------------ bad input
def _cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _one_line(code, err, *needles, exit_code=2):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])


ENV_MODULE = '''
import gymnasium as gym
import numpy as np
from gymnasium import spaces


class Env(gym.Env):
    def __init__(self, space):
        self.observation_space, self.action_space = space, spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def discrete_obs():
    return Env(spaces.Discrete(4))


def pixels():
    return Env(spaces.Box(0, 255, (4, 84, 84), np.uint8))
'''


@pytest.fixture
def bad_envs(tmp_path):
    with importable_module(tmp_path, "bad_envs", ENV_MODULE) as name:
        yield name


QUICK = ["--total-steps", "64", "--num-envs", "1", "--rollout-steps", "32", "--eval-every", "0", "--no-progress",
         "--tensorboard", "false"]


def test_bad_input_is_one_line(capsys, tmp_path, bad_envs, monkeypatch):
    code, err = _cli(capsys, "train", f"{bad_envs}:discrete_obs", "--run-dir", tmp_path / "a", *QUICK)
    _one_line(code, err, "unsupported observation space Discrete")
    code, err = _cli(capsys, "train", f"{bad_envs}:pixels", "--run-dir", tmp_path / "b", "--grad-backend", "numpy",
                     *QUICK)
    _one_line(code, err, "grad_backend='numpy' cannot train this policy", "CNNActorCritic")
    code, err = _cli(capsys, "train", f"{bad_envs}:pixels", "--run-dir", tmp_path / "c", "--norm-obs", "true", *QUICK)
    _one_line(code, err, "norm_obs=true is for vector observations")
    if not torch.cuda.is_available():
        code, err = _cli(capsys, "train", "CartPole-v1", "--run-dir", tmp_path / "d", "--device", "cuda", *QUICK)
        _one_line(code, err, "CUDA is not available")
    code, err = _cli(capsys, "train", "CartPole-v1", "--run-dir", tmp_path / "e", "--device", "tpu", *QUICK)
    _one_line(code, err, "device='tpu'")
    code, err = _cli(capsys, "train", "CartPole-v1", "--run-dir", tmp_path / "h", "--bf16", "true", *QUICK)
    _one_line(code, err, "bf16=true is for image (CNN) policies", "'CartPole-v1'")
    code, err = _cli(capsys, "train", f"{bad_envs}:pixels", "--run-dir", tmp_path / "i", "--bf16", "true",
                     "--grad-backend", "numpy", *QUICK)
    _one_line(code, err, "bf16=true needs grad_backend auto or autograd")
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "config.yaml").exists()
    monkeypatch.setitem(sys.modules, "ale_py", None)  # as if proxrl[atari] were not installed
    monkeypatch.setitem(sys.modules, "mujoco", None)
    code, err = _cli(capsys, "train", "ALE/Pong-v5", "--run-dir", tmp_path / "f", *QUICK)
    _one_line(code, err, "pip install 'proxrl[atari]'")
    code, err = _cli(capsys, "train", "Hopper-v5", "--run-dir", tmp_path / "g", *QUICK)
    _one_line(code, err, "pip install 'proxrl[mujoco]'")
