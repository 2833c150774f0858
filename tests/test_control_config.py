"""ControlConfig validation, presets and env id suggestions."""
from __future__ import annotations

import dataclasses

import pytest

from proxrl.config import from_dict
from proxrl.control import PRESETS, ControlConfig, sizes
from proxrl.errors import UserError


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
        ({"learning_rate": -1e-3}, "learning_rate=-0.001"),
        ({"clip_coef": 0.0}, "clip_coef=0.0"),
        ({"gamma": 0.0}, "gamma=0.0"),
        ({"gamma": 1.5}, "gamma=1.5"),
        ({"gae_lambda": 1.01}, "gae_lambda=1.01"),
        ({"gae_lambda": -0.1}, "gae_lambda=-0.1"),
        ({"epochs": 0}, "epochs=0"),
        ({"num_envs": 2, "rollout_steps": 4, "num_minibatches": 16}, "num_minibatches=16"),
        ({"num_envs": 0}, "num_envs=0"),
        ({"rollout_steps": 0}, "rollout_steps=0"),
        ({"total_steps": 0}, "total_steps=0"),
        ({"target_kl": 0.0}, "target_kl=0.0"),
        ({"value_clip_coef": -0.2}, "value_clip_coef=-0.2"),
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
        ({"max_grad_norm": 0.0}, "use none to disable"),
        ({"seed": -1}, "seed=-1 must be in [0, 2**63)"),
        ({"seed": 2**63}, "seed=9223372036854775808"),
        ({"keep_checkpoints": 0}, "keep_checkpoints=0"),
        ({"grad_backend": "jax"}, "grad_backend='jax'"),
        ({"value_coef": float("inf")}, "value_coef=inf must be a finite number"),
        ({"entropy_coef": float("inf")}, "entropy_coef=inf"),
        ({"init_log_std": float("nan")}, "init_log_std=nan"),
        ({"target_return": float("-inf")}, "target_return=-inf"),
        ({"entropy_coef": -0.01}, "entropy_coef=-0.01"),
        ({"hidden_sizes": "64,x"}, "hidden_sizes='64,x'"),
        ({"hidden_sizes": "64,0"}, "hidden_sizes='64,0'"),
        ({"eval_episodes": 0}, "eval_episodes=0"),
        ({"threads": 0}, "threads=0"),
        ({"lr_schedule": "cosine"}, "lr_schedule='cosine'"),
        ({"vector_mode": "gpu"}, "vector_mode='gpu'"),
    ],
)
def test_bad_config_raises_one_line_user_error(changes, needle):
    with pytest.raises(UserError) as info:
        ControlConfig(**changes)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_unknown_env_id_suggests_close_matches():
    with pytest.raises(UserError, match="did you mean 'CartPole-v1'"):
        ControlConfig(env_id="CartPol-v1")
    with pytest.raises(UserError, match="unknown Gymnasium env id 'NoSuchThing-v9'"):
        ControlConfig(env_id="NoSuchThing-v9")


def test_presets_are_valid_configs():
    for env_id, preset in PRESETS.items():
        cfg = from_dict(ControlConfig, preset)
        assert cfg.env_id == env_id
    cp = ControlConfig(**PRESETS["CartPole-v1"])
    assert (cp.num_envs, cp.rollout_steps, cp.num_minibatches, cp.epochs) == (8, 32, 1, 20)
    assert (cp.gamma, cp.gae_lambda, cp.learning_rate, cp.lr_schedule, cp.clip_schedule) == (0.98, 0.8, 1e-3, "linear", "linear")


def test_every_field_has_help_text():
    for f in dataclasses.fields(ControlConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


def test_sizes_are_derived_not_written_back():
    cfg = ControlConfig(num_envs=8, rollout_steps=32, num_minibatches=4, total_steps=1000)
    s = sizes(cfg)
    assert (s.batch_size, s.num_updates) == (256, 4)
    assert not hasattr(cfg, "batch_size")
    # the batch need not divide evenly: ppo_update splits the real transitions into near-equal minibatches
    assert ControlConfig(num_envs=3, rollout_steps=5, num_minibatches=2).num_minibatches == 2


@pytest.mark.parametrize("old, new", [("clip_value_coef", "value_clip_coef"), ("norm_adv", "normalize_advantages")])
def test_old_option_names_get_a_one_line_error_naming_the_new_one(old, new):
    with pytest.raises(UserError, match=f"option '{old}' was renamed to '{new}'"):
        from_dict(ControlConfig, {old: 0.2 if "clip" in old else True}, source="old.yaml")


@pytest.mark.parametrize("key, value", [("value_coef", float("inf")), ("entropy_coef", "inf"),
                                        ("init_log_std", float("nan")), ("max_grad_norm", float("nan"))])
def test_non_finite_float_options_are_rejected_from_a_file(key, value):
    with pytest.raises(UserError, match=f"'{key}'.*finite"):
        from_dict(ControlConfig, {key: value}, source="c.yaml")


def test_max_grad_norm_none_disables_clipping():
    assert ControlConfig(max_grad_norm=None).max_grad_norm is None
    assert from_dict(ControlConfig, {"max_grad_norm": None}).max_grad_norm is None


def test_resumable_fields_are_fields_and_exclude_what_changes_learning():
    names = {f.name for f in dataclasses.fields(ControlConfig)}
    assert ControlConfig.resumable_fields <= names
    for learning in ("learning_rate", "seed", "num_envs", "hidden_sizes", "grad_backend", "vector_mode", "gamma"):
        assert learning not in ControlConfig.resumable_fields


def test_ortho_init_false_keeps_pytorchs_default_linear_init():
    """ortho_init=False (SB3's, as the zoo's HalfCheetah/Hopper presets) leaves nn.Linear's default init; the
    default is orthogonal with gains sqrt(2) / 0.01 / 1 and zero biases; the CNN refuses it in one line."""
    import math

    import torch
    from torch import nn

    from proxrl.control.checkpointing import build_policy
    from proxrl.control.envs import make_vector_env
    from proxrl.control.policy import ActorCritic

    assert PRESETS["HalfCheetah-v5"]["ortho_init"] is False and PRESETS["Hopper-v5"]["ortho_init"] is False
    torch.manual_seed(3)
    plain = ActorCritic(5, 2, False, (8,), "tanh", ortho_init=False)
    torch.manual_seed(3)
    ref = [nn.Linear(5, 8), nn.Linear(8, 2), nn.Linear(5, 8), nn.Linear(8, 1)]  # same draw order: actor, critic
    got = [plain.actor[0], plain.actor[2], plain.critic[0], plain.critic[2]]
    for a, b in zip(got, ref):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    ortho = ActorCritic(5, 2, False, (8,), "tanh")
    w = ortho.actor[0].weight.detach()  # (8, 5), orthonormal columns scaled by sqrt(2)
    assert torch.allclose(w.T @ w, 2.0 * torch.eye(5), atol=1e-5)
    assert float(ortho.actor[2].weight.detach().norm(dim=1).max()) == pytest.approx(0.01, rel=1e-4)
    assert float(ortho.critic[2].weight.detach().norm()) == pytest.approx(1.0, rel=1e-5) and not ortho.actor[0].bias.any()
    assert not math.isclose(float(plain.actor[0].bias.detach().abs().sum()), 0.0)

    cfg = ControlConfig(env_id="CartPole-v1", ortho_init=False)
    venv, info = make_vector_env("CartPole-v1", 1, "sync")
    venv.close()
    torch.manual_seed(3)
    policy = build_policy(cfg, info)
    torch.manual_seed(3)
    assert torch.equal(policy.actor[0].weight, ActorCritic(4, 2, True, (64, 64), "tanh", ortho_init=False).actor[0].weight)


def test_ortho_init_false_is_refused_for_the_cnn():
    from proxrl.control.checkpointing import build_policy
    from proxrl.control.distributions import ActionDist
    from proxrl.control.envs import SpaceInfo

    info = SpaceInfo((84, 84, 4), "image", ActionDist("categorical", 1, (4,)))
    with pytest.raises(UserError, match="ortho_init=false is for MLP policies"):
        build_policy(ControlConfig(env_id="CartPole-v1", ortho_init=False), info)


@pytest.mark.parametrize("option, value, needle", [
    ("hidden_sizes", "256,256", "hidden_sizes='256,256' is for MLP policies"),
    ("activation", "relu", "activation='relu' is for MLP policies"),
])
def test_mlp_options_are_refused_for_the_cnn(option, value, needle):
    """--hidden-sizes / --activation on an Atari id did nothing, silently (the Nature CNN's layers are fixed)."""
    from proxrl.control.checkpointing import build_policy
    from proxrl.control.cnn import CNNActorCritic
    from proxrl.control.distributions import ActionDist
    from proxrl.control.envs import SpaceInfo

    info = SpaceInfo((84, 84, 4), "image", ActionDist("categorical", 1, (4,)))
    with pytest.raises(UserError, match=needle):
        build_policy(ControlConfig(env_id="CartPole-v1", **{option: value}), info)
    assert isinstance(build_policy(ControlConfig(env_id="CartPole-v1", **{option: value}), info, training=False),
                      CNNActorCritic)  # a saved run still loads for evaluation
    assert isinstance(build_policy(ControlConfig(env_id="CartPole-v1", hidden_sizes="64, 64"), info), CNNActorCritic)
