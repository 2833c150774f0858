"""What a control checkpoint holds, and rebuilding a trained agent from a run directory.

Tensors (``model.safetensors``): ``policy.*`` (network weights), ``optim.exp_avg/exp_avg_sq`` (Adam moments
of the flat parameter, see :mod:`.flat_params` and :mod:`.adam`), ``obs_rms.*`` / ``ret_rms.*`` (float64 running stats, when
enabled), ``space.action_low/high`` (Box bounds) and ``rng.*`` (global python/numpy/torch RNG state).
State (``state.json``): counters (``global_step``, ``update``, ``env_epoch``, ``train_seconds``), the
sampling and minibatch generators' states, the scalar RNG parts, the space summary and the config.

Environment state is *not* stored: envs are re-seeded deterministically at every checkpoint boundary
(see :mod:`proxrl.control.trainer`), which makes resuming exact for any Gymnasium env.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from proxrl import distributed as D
from proxrl.config import from_dict, to_dict
from proxrl.control.adam import FlatAdam
from proxrl.control.config import ControlConfig, parse_hidden_sizes
from proxrl.control.envs import SpaceInfo
from proxrl.control.policy import ActorCritic
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.errors import UserError
from proxrl.runs import RunDir, generator_state, latest_checkpoint, load_checkpoint, rng_state, set_generator_state, set_rng_state

__all__ = ["Learner", "pack", "restore", "build_policy", "check_checkpoint", "LoadedAgent", "load_agent", "STATE_KEYS"]

# What pack() writes into state.json (restore() and the trainer read every one of them).
STATE_KEYS = ("global_step", "update", "env_epoch", "train_seconds", "stopped", "optim_steps", "generator",
              "action_rng", "rng", "space", "config")


# MLP-only options at their defaults (an image run must leave them there)
MLP_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ControlConfig) if f.name in ("hidden_sizes", "activation")}


def build_policy(cfg: ControlConfig, info: SpaceInfo, training: bool = True) -> nn.Module:
    """A freshly initialised policy for ``cfg`` and the env's spaces (uses the global torch RNG).

    * image observations: :class:`~proxrl.control.cnn.CNNActorCritic` (Nature CNN, shared trunk, uint8 in);
    * vector observations with Discrete or Box actions: :class:`~proxrl.control.policy.ActorCritic` (the MLP
      the numpy fast path runs);
    * vector observations with MultiDiscrete or MultiBinary actions: :class:`~proxrl.control.cnn.MLPActorCritic`.
    """
    if info.obs_kind == "image":
        from proxrl.control.cnn import CNNActorCritic, image_layout

        if cfg.bf16 and training:  # (a saved bf16 policy still evaluates anywhere, slowly without support)
            _check_bf16_supported(cfg)
        if not cfg.ortho_init:
            raise UserError(f"ortho_init=false is for MLP policies; {cfg.env_id!r} has image observations, whose Nature "
                            "CNN is always orthogonally initialised (CleanRL): use --ortho-init true")
        if training:  # the Nature CNN's layers are fixed: an MLP option changed from its default would do nothing
            for name, changed in (
                    ("hidden_sizes", parse_hidden_sizes(cfg.hidden_sizes) != parse_hidden_sizes(MLP_DEFAULTS["hidden_sizes"])),
                    ("activation", cfg.activation != MLP_DEFAULTS["activation"])):
                if changed:
                    raise UserError(f"{name}={getattr(cfg, name)!r} is for MLP policies; {cfg.env_id!r} has image "
                                    f"observations, whose Nature CNN has fixed layers: leave --{name.replace('_', '-')} "
                                    f"at {MLP_DEFAULTS[name]!r}")
        return CNNActorCritic(info.obs_shape, info.dist, channels_last=image_layout(info.obs_shape) == "hwc",
                              init_log_std=cfg.init_log_std, bf16=cfg.bf16)
    if cfg.bf16:
        raise UserError(f"bf16=true is for image (CNN) policies; {cfg.env_id!r} has vector observations, whose "
                        "MLP policy trains in float32: use --bf16 false")
    hidden = parse_hidden_sizes(cfg.hidden_sizes)
    if info.dist.kind in ("categorical", "gaussian"):
        return ActorCritic(info.obs_dim, info.action_dim, info.discrete, hidden, cfg.activation, cfg.init_log_std,
                           cfg.ortho_init)
    from proxrl.control.cnn import MLPActorCritic

    return MLPActorCritic(info.obs_dim, info.dist, hidden, cfg.activation, cfg.init_log_std, cfg.ortho_init)


def _check_bf16_supported(cfg: ControlConfig) -> None:
    """UserError unless the device the CNN trains on (``cfg.device``) computes bfloat16 natively."""
    D.require_native_bf16(D.resolve_device(cfg.device))


def _space_state(info: SpaceInfo) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {}
    if info.action_low is not None:
        tensors["space.action_low"] = torch.from_numpy(info.action_low.copy())
        tensors["space.action_high"] = torch.from_numpy(info.action_high.copy())
    return tensors, info.to_json()


@dataclass
class Learner:
    """What training changes and a checkpoint must hold to resume exactly (besides counters and global RNGs)."""

    policy: nn.Module  # ActorCritic, MLPActorCritic or CNNActorCritic (build_policy)
    optimizer: FlatAdam
    obs_norm: ObsNormalizer
    reward_scaler: RewardScaler
    generator: torch.Generator  # minibatch order
    action_rng: np.random.Generator  # action sampling


def pack(
    cfg: ControlConfig, info: SpaceInfo, learner: Learner, counters: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to resume training exactly, as ``(tensors, json_state)`` for ``runs.save_checkpoint``.

    Tensors are on the CPU whatever device trained (checkpoints are device-independent).
    """
    tensors: dict[str, torch.Tensor] = {f"policy.{k}": v for k, v in learner.policy.state_dict().items()}
    tensors.update(learner.optimizer.state_tensors())
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    tensors.update(learner.obs_norm.state_tensors())
    tensors.update(learner.reward_scaler.state_tensors())
    space_tensors, space = _space_state(info)
    tensors.update(space_tensors)
    rng_tensors, rng = rng_state()
    tensors.update(rng_tensors)
    state = {
        **counters,
        "optim_steps": learner.optimizer.step_count,
        "generator": generator_state(learner.generator),
        "action_rng": generator_state(learner.action_rng),
        "rng": rng,
        "space": space,
        "config": to_dict(cfg),
    }
    return tensors, state


def restore(tensors: dict[str, torch.Tensor], state: dict[str, Any], learner: Learner) -> None:
    """Inverse of :func:`pack` (counters are read from ``state`` by the caller)."""
    learner.policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    learner.optimizer.load_state(tensors, state["optim_steps"])
    learner.obs_norm.load_state_tensors(tensors)
    learner.reward_scaler.load_state_tensors(tensors)
    set_generator_state(learner.generator, state["generator"])
    set_generator_state(learner.action_rng, state["action_rng"])
    set_rng_state(tensors, state["rng"])


def check_checkpoint(
    ckpt: Path,
    tensors: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    expected: Mapping[str, torch.Tensor],
    cfg: ControlConfig | None = None,
    config_source: str = "the config",
    state_keys: tuple[str, ...] = STATE_KEYS,
) -> None:
    """One-line UserError unless checkpoint ``ckpt`` can be restored into the objects that produced ``expected``.

    Checks, in this order: ``state`` holds every key of ``state_keys``; when ``cfg`` is given, the config saved in
    the checkpoint equals ``cfg`` on every field a resume may not change (``ControlConfig.resumable_fields``),
    naming the first that differs and where ``cfg`` came from (``config_source``, e.g. the run's config.yaml);
    ``tensors`` holds every tensor of ``expected`` (``pack()`` of freshly built objects) with the same shape.
    """
    where = f"delete {ckpt} to use an earlier checkpoint, or start the run again"
    missing = [k for k in state_keys if k not in state]
    if missing:
        raise UserError(f"checkpoint {ckpt} is incomplete: state.json lacks {missing[0]!r}; {where}")
    if cfg is not None:
        saved = from_dict(ControlConfig, state["config"], source=str(ckpt / "state.json"))
        for f in dataclasses.fields(ControlConfig):
            ours, theirs = getattr(cfg, f.name), getattr(saved, f.name)
            if f.name not in ControlConfig.resumable_fields and ours != theirs:
                raise UserError(f"{config_source} has {f.name}={ours!r} but checkpoint {ckpt} was trained with "
                                f"{f.name}={theirs!r}; restore {f.name}: {theirs!r} to resume it")
    for name, tensor in expected.items():
        if name not in tensors:
            raise UserError(f"checkpoint {ckpt} is incomplete: model.safetensors lacks tensor {name!r}; {where}")
        if tuple(tensors[name].shape) != tuple(tensor.shape) or tensors[name].dtype != tensor.dtype:
            raise UserError(f"checkpoint {ckpt}: tensor {name!r} is {tensors[name].dtype} {list(tensors[name].shape)} "
                            f"but the config builds {tensor.dtype} {list(tensor.shape)}; the checkpoint belongs to "
                            "another config")
    if any(name.startswith("policy.") for name in expected):
        extra = [name for name in tensors if name.startswith("policy.") and name not in expected]
        if extra:
            raise UserError(f"checkpoint {ckpt} holds tensor {extra[0]!r} that the config does not build; the "
                            "checkpoint belongs to another config")


@dataclass
class LoadedAgent:
    """A trained policy with its frozen observation normaliser, as stored in a run directory."""

    cfg: ControlConfig
    info: SpaceInfo
    policy: nn.Module
    obs_norm: ObsNormalizer
    state: dict[str, Any]
    checkpoint: Path


def load_agent(run_dir: str | Path, device: torch.device | str = "cpu") -> LoadedAgent:
    """Rebuild the policy (on ``device``) and obs normaliser from the latest checkpoint of ``run_dir`` (UserError if none)."""
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise UserError(f"run directory {rd.path} does not exist; pass the directory given to 'proxrl train'")
    if rd.has_run() and "env_id" not in rd.read_config():  # (config.yaml also holds run_info; only env_id matters)
        raise UserError(f"{rd.path} is not a control run (its config.yaml has no env_id, e.g. an LM run); "
                        "pass a directory written by 'proxrl train'")
    ckpt = latest_checkpoint(rd.path)
    if ckpt is None:
        raise UserError(f"no checkpoint in {rd.checkpoints}; train the run (or let it reach a checkpoint) first")
    tensors, state = load_checkpoint(ckpt)
    check_checkpoint(ckpt, tensors, state, {}, state_keys=("config", "space"))
    cfg = from_dict(ControlConfig, state["config"], source=str(ckpt / "state.json"))
    space = state["space"]
    low = tensors.get("space.action_low")
    high = tensors.get("space.action_high")
    try:
        info = SpaceInfo.from_json(space, None if low is None else low.numpy(), None if high is None else high.numpy())
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt}: state.json has a malformed 'space' entry ({e!r}); delete it or use "
                        "another checkpoint") from e
    policy = build_policy(cfg, info, training=False)
    obs_norm = ObsNormalizer(info.obs_dim, cfg.norm_obs, cfg.obs_clip)
    expected = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    check_checkpoint(ckpt, tensors, state, {**expected, **obs_norm.state_tensors()}, state_keys=())
    policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    policy.eval()
    policy.to(device)
    obs_norm.load_state_tensors(tensors)
    return LoadedAgent(cfg, info, policy, obs_norm, state, ckpt)

