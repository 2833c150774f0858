"""MuJoCo v5 envs construct and step (skipped without the mujoco package); their presets are the zoo's values."""
import gymnasium as gym
import numpy as np
import pytest

from proxrl.config import from_dict
from proxrl.control.config import ControlConfig, sizes
from proxrl.control.envs_extra import is_mujoco, require_extra_for
from proxrl.control.presets import PRESET_SOURCES, PRESETS

MUJOCO_IDS = {"HalfCheetah-v5": (17, 6), "Hopper-v5": (11, 3), "Walker2d-v5": (17, 6), "Ant-v5": (105, 8)}


@pytest.mark.parametrize("env_id", list(MUJOCO_IDS))
def test_mujoco_env_constructs_and_steps(env_id):
    pytest.importorskip("mujoco")
    require_extra_for(env_id)  # installed: no error
    assert is_mujoco(env_id)
    env = gym.make(env_id)
    obs_dim, act_dim = MUJOCO_IDS[env_id]
    assert env.observation_space.shape == (obs_dim,) and env.action_space.shape == (act_dim,)
    obs, _ = env.reset(seed=0)
    obs2, _ = gym.make(env_id).reset(seed=0)
    np.testing.assert_array_equal(obs, obs2)  # seeded resets are reproducible
    rng = np.random.default_rng(0)
    for _ in range(5):
        obs, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, act_dim).astype(np.float32))
        assert obs.shape == (obs_dim,) and np.isfinite(obs).all() and np.isfinite(reward)
    env.close()


@pytest.mark.parametrize("env_id", list(MUJOCO_IDS))
def test_mujoco_presets_load_and_state_their_source(env_id):
    cfg = from_dict(ControlConfig, PRESETS[env_id], source=f"preset {env_id}")
    assert cfg.norm_obs and cfg.norm_reward and cfg.num_envs == 1 and cfg.total_steps == 1_000_000
    assert "rl-baselines3-zoo" in PRESET_SOURCES[env_id]
    assert sizes(cfg).batch_size % cfg.num_minibatches == 0


def test_halfcheetah_preset_is_the_zoo_entry():
    """rl-baselines3-zoo hyperparams/ppo.yml, HalfCheetah-v4: batch_size 64 of n_steps 512, vf_coef 0.58096 of MSE."""
    p = PRESETS["HalfCheetah-v5"]
    assert p["rollout_steps"] // p["num_minibatches"] == 64
    assert p["value_coef"] == pytest.approx(2 * 0.58096)
    expected = {"learning_rate": 2.0633e-05, "gamma": 0.98, "gae_lambda": 0.92, "clip_coef": 0.1, "epochs": 20,
                "entropy_coef": 0.000401762, "max_grad_norm": 0.8, "init_log_std": -2.0, "hidden_sizes": "256,256",
                "activation": "relu", "lr_schedule": "constant"}
    assert {k: p[k] for k in expected} == expected


_DEPRECATED_XML = ('<mujoco><compiler settotalmass="5"/><worldbody><body><joint type="free"/><geom size="0.1"/>'
                   '</body></worldbody></mujoco>')


def test_mujoco_model_deprecations_are_quiet_and_other_warnings_still_show(capfd, tmp_path, monkeypatch):
    """MuJoCo 4 printed a deprecation of Gymnasium's half_cheetah.xml on every env built (8 lines per short run)
    and wrote MUJOCO_LOG.TXT into the working directory."""
    mujoco = pytest.importorskip("mujoco")
    monkeypatch.chdir(tmp_path)
    before = mujoco.get_mju_user_warning()
    try:
        require_extra_for("HalfCheetah-v5")  # what every MuJoCo run calls first
        handler = mujoco.get_mju_user_warning()
        require_extra_for("Hopper-v5")
        assert mujoco.get_mju_user_warning() is handler  # installed once per process, not wrapped again
        model = mujoco.MjModel.from_xml_string(_DEPRECATED_XML)  # the same deprecated attribute as half_cheetah.xml
        env = gym.make("HalfCheetah-v5")
        env.close()
        out, err = capfd.readouterr()
        assert "deprecated" not in out + err
        data = mujoco.MjData(model)  # a real problem is still reported, once, on stderr
        data.qvel[0] = float("nan")
        mujoco.mj_step(model, data)
        out, err = capfd.readouterr()
        assert err.count("WARNING: Nan, Inf or huge value in QVEL") == 1 and "WARNING" not in out
        assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    finally:
        mujoco.set_mju_user_warning(before)
