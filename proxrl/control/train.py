"""The PPO training loop for Gymnasium environments: rollout -> update -> log -> (evaluate) -> (checkpoint).

Reproducibility and exact resume:

* ``seed`` fixes the network init (global torch RNG), a numpy ``Generator`` for action sampling, a
  ``torch.Generator`` for the minibatch order, and the env seeds, so two runs with the same config give bitwise identical weights
  (on the same machine, torch version and thread count).
* Environment state is not checkpointed (it is not accessible for every Gymnasium env). Instead, at every
  checkpoint boundary the training envs are reset with a seed derived from ``(seed, checkpoint index)``,
  in uninterrupted and resumed runs alike; the episodes in progress end there (their last step is
  bootstrapped with ``V(s)`` like a time-limit truncation and they are not counted in ``episodic_return``).
  With the default ``checkpoint_every`` this cuts at most one episode per env every ``checkpoint_every /
  num_envs`` steps. Resuming from a checkpoint therefore replays exactly what the uninterrupted run did.
* ``train_seconds`` counts rollouts, updates and logging only; evaluation and checkpoint writing are excluded.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proxrl.config import from_dict, to_dict
from proxrl.control.adam import FlatAdam
from proxrl.control.checkpointing import build_policy, pack, restore
from proxrl.control.config import ControlConfig, sizes
from proxrl.control.envs import EnvFactory, derive_seed, make_vector_env
from proxrl.control.evaluate import Evaluator
from proxrl.control.flat_params import flatten_parameters
from proxrl.control.ppo import ppo_update
from proxrl.control.rollout import Collector
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.core import constant_schedule, linear_schedule
from proxrl.errors import UserError
from proxrl.runs import MetricsLogger, RunDir, checkpoint_dir, latest_checkpoint, load_checkpoint, progress_bar, save_checkpoint

__all__ = ["train", "RESUMABLE_CHANGES"]

# Fields that may differ between the saved config and the one passed when resuming.
RESUMABLE_CHANGES = ("total_steps", "eval_every", "eval_episodes", "checkpoint_every", "threads", "tensorboard",
                     "vector_mode", "target_return")

SAMPLING_STREAM, TRAIN_ENV_STREAM, EVAL_ENV_STREAM, MINIBATCH_STREAM = 1, 2, 3, 4


def eval_seed(seed: int) -> int:
    """Seed of the evaluation envs of a run with ``seed`` (also the default of ``evaluate_run``)."""
    return derive_seed(seed, EVAL_ENV_STREAM)


def _schedule(kind: str, initial: float):
    return linear_schedule(initial, 0.0) if kind == "linear" else constant_schedule(initial)


def _crossed(step: int, prev: int, every: int) -> bool:
    return every > 0 and step // every > prev // every


def _resolve_config(rd: RunDir, cfg: ControlConfig | None, resume: bool) -> ControlConfig:
    if not resume:
        if cfg is None:
            raise UserError("train needs a config unless resuming")
        return cfg
    if not rd.has_run():
        raise UserError(f"cannot resume: {rd.path} holds no run (no config.yaml); start it without --resume")
    saved = from_dict(ControlConfig, rd.read_config(), source=str(rd.config_path))
    if cfg is None:
        return saved
    changed = [
        f"{f.name} ({getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r})"
        for f in dataclasses.fields(ControlConfig)
        if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if changed:
        raise UserError(
            f"cannot resume {rd.path} with a different config: {', '.join(changed)}; "
            f"only {', '.join(RESUMABLE_CHANGES)} may change"
        )
    return cfg


def train(
    cfg: ControlConfig | None,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    env_fn: EnvFactory | None = None,
) -> dict[str, Any]:
    """Train PPO on ``cfg.env_id`` (or on ``env_fn()`` envs), writing metrics, checkpoints and config to ``run_dir``.

    ``resume=True`` continues from the latest checkpoint of ``run_dir`` (``cfg=None`` reuses the saved
    config) and ends with exactly the weights an uninterrupted run would have. Returns the metrics of the
    last update, including the final evaluation (``eval_return_mean``/``eval_return_std``).
    """
    from threadpoolctl import threadpool_limits

    # numpy's BLAS runs the update's small matmuls; its worker threads spin like OpenMP's, which made the
    # update ~8x slower on a busy 2-core machine. One thread per process is fastest for these sizes.
    with threadpool_limits(limits=max(1, cfg.threads) if cfg is not None else 1, user_api="blas"):
        return _train(cfg, run_dir, resume, progress, env_fn)


def _train(
    cfg: ControlConfig | None, run_dir: str | Path, resume: bool, progress: bool, env_fn: EnvFactory | None
) -> dict[str, Any]:
    rd = RunDir(run_dir)
    cfg = _resolve_config(rd, cfg, resume)
    rd.create(exist_ok=resume)
    rd.write_config(to_dict(cfg))
    sz = sizes(cfg)
    torch.set_num_threads(cfg.threads)

    # Seeding: init from the global RNGs, action sampling from a numpy generator, minibatch order from a
    # torch generator; each stream derived from the seed.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, MINIBATCH_STREAM))
    action_rng = np.random.default_rng(derive_seed(cfg.seed, SAMPLING_STREAM))

    venv, info = make_vector_env(cfg.env_id, cfg.num_envs, cfg.vector_mode, env_fn)
    evaluator: Evaluator | None = None
    logger: MetricsLogger | None = None
    bar = None
    try:
        policy = build_policy(cfg, info)
        flat_param = flatten_parameters(policy)  # one tensor for Adam, clipping and zeroing (speed)
        optimizer = FlatAdam(flat_param, lr=cfg.learning_rate, eps=1e-5)
        obs_norm = ObsNormalizer(info.obs_dim, cfg.norm_obs, cfg.obs_clip)
        reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.norm_reward, cfg.reward_clip)
        collector = Collector(venv, info, cfg.rollout_steps, obs_norm, reward_scaler, action_rng)
        lr_at = _schedule(cfg.lr_schedule, cfg.learning_rate)
        clip_at = _schedule(cfg.clip_schedule, cfg.clip_coef)

        counters: dict[str, Any] = {"global_step": 0, "update": 0, "env_epoch": 0, "train_seconds": 0.0, "stopped": False}
        last_row: dict[str, Any] = {}
        resume_step = 0 if resume else None  # drop metrics logged after the checkpoint we resume from
        if resume:
            ckpt = latest_checkpoint(rd.path)
            if ckpt is not None:
                tensors, state = load_checkpoint(ckpt)
                restore(tensors, state, policy, optimizer, obs_norm, reward_scaler, generator, action_rng)
                counters = {k: state.get(k, v) for k, v in counters.items()}
                last_row = dict(state.get("last_row", {}))
                resume_step = counters["global_step"]
        logger = MetricsLogger(rd.path, tensorboard=cfg.tensorboard, resume_from_step=resume_step)
        collector.reset(derive_seed(cfg.seed, TRAIN_ENV_STREAM, counters["env_epoch"]))

        if progress:
            bar = progress_bar(total=sz.num_updates * sz.batch_size, desc=cfg.env_id, unit="step")
            bar.update(counters["global_step"])
        recent = collections.deque(maxlen=100)
        last_eval: dict[str, Any] | None = None
        session_start_step, session_start_seconds = counters["global_step"], counters["train_seconds"]
        last_postfix = 0.0

        first_update = sz.num_updates + 1 if counters["stopped"] else counters["update"] + 1
        for update in range(first_update, sz.num_updates + 1):
            t0 = time.perf_counter()
            frac_done = (update - 1) / sz.num_updates
            lr = lr_at(frac_done)
            clip_coef = clip_at(frac_done)
            optimizer.lr = lr

            rollout = collector.collect(policy)
            prev_step = counters["global_step"]
            counters["global_step"] += sz.batch_size
            step = counters["global_step"]
            metrics = ppo_update(policy, optimizer, flat_param, rollout, cfg, clip_coef, generator)

            recent.extend(rollout.episode_returns)
            row: dict[str, Any] = {
                "global_step": step,
                "update": update,
                "episodic_return": float(np.mean(rollout.episode_returns)) if rollout.episode_returns else math.nan,
                "episodic_length": float(np.mean(rollout.episode_lengths)) if rollout.episode_lengths else math.nan,
                "episodes": len(rollout.episode_returns),
                **metrics,
                "learning_rate": lr,
                "clip_coef": clip_coef,
            }
            counters["update"] = update
            counters["train_seconds"] += time.perf_counter() - t0
            session_seconds = counters["train_seconds"] - session_start_seconds
            row["steps_per_second"] = (step - session_start_step) / max(session_seconds, 1e-9)
            row["train_seconds"] = counters["train_seconds"]

            final = update == sz.num_updates
            if final or _crossed(step, prev_step, cfg.eval_every):
                if evaluator is None:
                    evaluator = Evaluator(cfg.env_id, cfg.eval_episodes, cfg.vector_mode, env_fn)
                last_eval = evaluator.evaluate(policy, obs_norm, eval_seed(cfg.seed))
                row["eval_return_mean"] = last_eval["mean_return"]
                row["eval_return_std"] = last_eval["std_return"]
                if cfg.target_return is not None and last_eval["mean_return"] >= cfg.target_return:
                    final = counters["stopped"] = True

            t_log = time.perf_counter()
            logger.log(step, row)
            last_row = row
            if bar is not None:
                bar.update(step - prev_step)
                if t_log - last_postfix > 0.5 or final:
                    last_postfix = t_log
                    postfix = {"sps": int(row["steps_per_second"])}
                    if recent:
                        postfix["return"] = float(np.mean(recent))
                    if last_eval is not None:
                        postfix["eval"] = last_eval["mean_return"]
                    bar.set_postfix(postfix)
            counters["train_seconds"] += time.perf_counter() - t_log

            if final or _crossed(step, prev_step, cfg.checkpoint_every):
                if not final:
                    counters["env_epoch"] += 1
                tensors, state = pack(cfg, info, policy, optimizer, obs_norm, reward_scaler, generator, action_rng, counters)
                state["last_row"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                save_checkpoint(checkpoint_dir(rd.path, step), tensors, state)
                if not final:
                    # Re-seed at the boundary so that a run resumed from this checkpoint continues identically.
                    collector.reset(derive_seed(cfg.seed, TRAIN_ENV_STREAM, counters["env_epoch"]))
            if final:
                break
        return {k: (math.nan if v is None else v) for k, v in last_row.items()}
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        if evaluator is not None:
            evaluator.close()
        venv.close()
