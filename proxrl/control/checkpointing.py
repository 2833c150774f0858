"""What a control checkpoint holds, and rebuilding a trained agent from a run directory.

Tensors (``model.safetensors``): ``policy.*`` (network weights), ``optim.exp_avg/exp_avg_sq`` (Adam moments
of the flat parameter, see :mod:`.flat_params` and :mod:`.adam`), ``obs_rms.*`` / ``ret_rms.*`` (float64 running stats, when
enabled), ``space.action_low/high`` (Box bounds) and ``rng.*`` (global python/numpy/torch RNG state).
State (``state.json``): counters (``global_step``, ``update``, ``env_epoch``, ``train_seconds``), the
sampling and minibatch generators' states, the scalar RNG parts, the space summary and the config.

Environment state is *not* stored: envs are re-seeded deterministically at every checkpoint boundary
(see :mod:`proxrl.control.train`), which makes resuming exact for any Gymnasium env.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proxrl.config import from_dict, to_dict
from proxrl.control.adam import FlatAdam
from proxrl.control.config import ControlConfig, parse_hidden_sizes
from proxrl.control.envs import SpaceInfo
from proxrl.control.policy import ActorCritic
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.errors import UserError
from proxrl.runs import RunDir, generator_state, latest_checkpoint, load_checkpoint, rng_state, set_generator_state, set_rng_state

__all__ = ["pack", "restore", "build_policy", "LoadedAgent", "load_agent"]


def build_policy(cfg: ControlConfig, info: SpaceInfo) -> ActorCritic:
    """A freshly initialised policy for ``cfg`` and the env's spaces (uses the global torch RNG)."""
    return ActorCritic(
        info.obs_dim, info.action_dim, info.discrete, parse_hidden_sizes(cfg.hidden_sizes), cfg.activation, cfg.init_log_std
    )


def _space_state(info: SpaceInfo) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {}
    if info.action_low is not None:
        tensors["space.action_low"] = torch.from_numpy(info.action_low.copy())
        tensors["space.action_high"] = torch.from_numpy(info.action_high.copy())
    return tensors, {"obs_dim": info.obs_dim, "discrete": info.discrete, "action_dim": info.action_dim}


def pack(
    cfg: ControlConfig,
    info: SpaceInfo,
    policy: ActorCritic,
    optimizer: FlatAdam,
    obs_norm: ObsNormalizer,
    reward_scaler: RewardScaler,
    generator: torch.Generator,
    action_rng: np.random.Generator,
    counters: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to resume training exactly, as ``(tensors, json_state)`` for ``runs.save_checkpoint``."""
    tensors: dict[str, torch.Tensor] = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    tensors.update(optimizer.state_tensors())
    tensors.update(obs_norm.state_tensors())
    tensors.update(reward_scaler.state_tensors())
    space_tensors, space = _space_state(info)
    tensors.update(space_tensors)
    rng_tensors, rng = rng_state()
    tensors.update(rng_tensors)
    state = {
        **counters,
        "optim_steps": optimizer.step_count,
        "generator": generator_state(generator),
        "action_rng": generator_state(action_rng),
        "rng": rng,
        "space": space,
        "config": to_dict(cfg),
    }
    return tensors, state


def restore(
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    policy: ActorCritic,
    optimizer: FlatAdam,
    obs_norm: ObsNormalizer,
    reward_scaler: RewardScaler,
    generator: torch.Generator,
    action_rng: np.random.Generator,
) -> None:
    """Inverse of :func:`pack` (counters are read from ``state`` by the caller)."""
    policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    optimizer.load_state(tensors, state["optim_steps"])
    obs_norm.load_state_tensors(tensors)
    reward_scaler.load_state_tensors(tensors)
    set_generator_state(generator, state["generator"])
    set_generator_state(action_rng, state["action_rng"])
    set_rng_state(tensors, state["rng"])


@dataclass
class LoadedAgent:
    """A trained policy with its frozen observation normaliser, as stored in a run directory."""

    cfg: ControlConfig
    info: SpaceInfo
    policy: ActorCritic
    obs_norm: ObsNormalizer
    state: dict[str, Any]
    checkpoint: Path


def load_agent(run_dir: str | Path) -> LoadedAgent:
    """Rebuild the policy and obs normaliser from the latest checkpoint of ``run_dir`` (UserError if none)."""
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise UserError(f"run directory {rd.path} does not exist; pass the directory given to 'proxrl train'")
    ckpt = latest_checkpoint(rd.path)
    if ckpt is None:
        raise UserError(f"no checkpoint in {rd.checkpoints}; train the run (or let it reach a checkpoint) first")
    tensors, state = load_checkpoint(ckpt)
    cfg = from_dict(ControlConfig, state["config"], source=str(ckpt / "state.json"))
    space = state["space"]
    low = tensors.get("space.action_low")
    high = tensors.get("space.action_high")
    info = SpaceInfo(
        int(space["obs_dim"]),
        bool(space["discrete"]),
        int(space["action_dim"]),
        None if low is None else low.numpy(),
        None if high is None else high.numpy(),
    )
    policy = build_policy(cfg, info)
    policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    policy.eval()
    obs_norm = ObsNormalizer(info.obs_dim, cfg.norm_obs, cfg.obs_clip)
    obs_norm.load_state_tensors(tensors)
    return LoadedAgent(cfg, info, policy, obs_norm, state, ckpt)

