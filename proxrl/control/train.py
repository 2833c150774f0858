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
* A resume may change only ``ControlConfig.resumable_fields`` (budget, evaluation, checkpointing, logging);
  config.yaml is rewritten only once the checkpoint has been loaded and checked against the config.
* The first NaN or infinity in an observation, reward, loss term, gradient or weight stops the run with a
  one-line :class:`~proxrl.runs.finite.NonFiniteError` naming it, the update and the env step, before the
  next checkpoint: the newest checkpoint is the last good one.
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
from proxrl.control.checkpointing import STATE_KEYS, Learner, build_policy, check_checkpoint, pack, restore
from proxrl.control.config import ControlConfig, sizes
from proxrl.control.envs import EnvFactory, derive_seed, make_vector_env
from proxrl.control.evaluate import Evaluator, eval_seed
from proxrl.control.flat_params import flatten_parameters
from proxrl.control.ppo import ppo_update, resolve_grad_backend
from proxrl.control.rollout import Collector
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.core import constant_schedule, linear_schedule
from proxrl.errors import UserError
from proxrl.runs import (
    MetricsLogger,
    RunDir,
    checkpoint_dir,
    latest_checkpoint,
    load_latest_checkpoint,
    progress_bar,
    prune_checkpoints,
    save_checkpoint,
)
from proxrl.runs.finite import NonFiniteError, check_finite

__all__ = ["train"]

# derive_seed streams of the run's random numbers (evaluation: proxrl.control.evaluate.EVAL_ENV_STREAM = 3)
SAMPLING_STREAM, TRAIN_ENV_STREAM, MINIBATCH_STREAM = 1, 2, 4


def _schedule(kind: str, initial: float):
    return linear_schedule(initial, 0.0) if kind == "linear" else constant_schedule(initial)


def _crossed(step: int, prev: int, every: int) -> bool:
    return every > 0 and step // every > prev // every


def _resolve_config(rd: RunDir, cfg: ControlConfig | None, resume: bool) -> ControlConfig:
    """The run's config: ``cfg`` for a new run; for a resume, the saved config.yaml, or ``cfg`` if it differs
    from it only in ``ControlConfig.resumable_fields`` (one-line UserError naming the first other field)."""
    if not resume:
        if cfg is None:
            raise UserError("train needs a config unless resuming")
        return cfg
    saved = from_dict(ControlConfig, rd.read_config(), source=str(rd.config_path))
    if cfg is None:
        return saved
    for f in dataclasses.fields(ControlConfig):
        if f.name not in ControlConfig.resumable_fields and getattr(saved, f.name) != getattr(cfg, f.name):
            raise UserError(
                f"cannot resume {rd.path} with {f.name}={getattr(cfg, f.name)!r} (the run was started with "
                f"{getattr(saved, f.name)!r}); a resume may change only {', '.join(sorted(ControlConfig.resumable_fields))}"
            )
    return cfg


def _restore_checkpoint(rd: RunDir, cfg: ControlConfig, info: Any, learner: Learner,
                        counters: dict[str, Any]) -> dict[str, Any] | None:
    """Load the newest checkpoint of ``rd`` into the freshly built ``learner`` after checking that it fits them
    and ``cfg``; returns its state (None if the run has no checkpoint yet).

    One-line UserError for a checkpoint that is corrupt or misses an entry (offering the previous good one, see
    :func:`proxrl.runs.load_latest_checkpoint`), whose config differs from ``cfg`` in a field a resume may not
    change, whose tensors do not fit the config, or that has done more steps than ``total_steps``.
    """
    expected, _ = pack(cfg, info, learner, counters)
    expected = {k: v for k, v in expected.items() if not k.startswith("rng.torch_cuda")}  # present only if CUDA ran
    always = [k for k in expected if k.startswith(("optim.", "rng."))]  # the rest depends on the config: see below
    loaded = load_latest_checkpoint(rd.path, require_state=STATE_KEYS, require_tensors=always)
    if loaded is None:
        return None
    ckpt, tensors, state = loaded
    check_checkpoint(ckpt, tensors, state, expected, cfg, str(rd.config_path))
    done = state["global_step"]
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        raise UserError(f"checkpoint {ckpt}: state.json has global_step={done!r}, not a step count; delete it to use "
                        "an earlier checkpoint")
    if cfg.total_steps < done:
        raise UserError(f"total_steps={cfg.total_steps} is below the {done} env steps {rd.path} has already done; "
                        f"give --total-steps {done} or more")
    try:
        restore(tensors, state, learner)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {ckpt} cannot be restored ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                        "delete it to use an earlier checkpoint, or start the run again") from e
    for name, param in learner.policy.named_parameters():
        check_finite(f"weight {name}", param, f"checkpoint {ckpt}")
    return state


def train(
    cfg: ControlConfig | None,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    env_fn: EnvFactory | None = None,
) -> dict[str, Any]:
    """Train PPO on ``cfg.env_id`` (or on ``env_fn()`` envs), writing metrics, checkpoints and config to ``run_dir``.

    ``resume=True`` continues from the latest checkpoint of ``run_dir`` (``cfg=None`` reuses the saved
    config; otherwise ``cfg`` may differ from it only in ``ControlConfig.resumable_fields``) and ends with
    exactly the weights an uninterrupted run would have. The run directory is locked for the life of the run
    (:meth:`proxrl.runs.RunDir.lock`): a second process on it gets a one-line error naming this one's PID.
    Returns the metrics of the last update, including the final evaluation (``eval_return_mean``/
    ``eval_return_std``).
    """
    from threadpoolctl import threadpool_limits

    rd = RunDir(run_dir)
    if resume and not rd.has_run():  # before the lock, which would create the directory
        raise UserError(f"cannot resume: {rd.path} holds no run (no config.yaml); start it without --resume")
    # numpy's BLAS runs the update's small matmuls; its worker threads spin like OpenMP's, which made the
    # update much slower on a busy 2-core machine. One thread per process is fastest for these sizes.
    with threadpool_limits(limits=max(1, cfg.threads) if cfg is not None else 1, user_api="blas"), rd.lock():
        return _train(cfg, run_dir, resume, progress, env_fn)


def _train(
    cfg: ControlConfig | None, run_dir: str | Path, resume: bool, progress: bool, env_fn: EnvFactory | None
) -> dict[str, Any]:
    rd = RunDir(run_dir)
    cfg = _resolve_config(rd, cfg, resume)
    rd.create(exist_ok=resume)
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
        backend = resolve_grad_backend(cfg.grad_backend, policy)
        flat_param = flatten_parameters(policy)  # one tensor for Adam, clipping and zeroing (speed)
        optimizer = FlatAdam(flat_param, lr=cfg.learning_rate, eps=1e-5)
        obs_norm = ObsNormalizer(info.obs_dim, cfg.norm_obs, cfg.obs_clip)
        reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.norm_reward, cfg.reward_clip)
        collector = Collector(venv, info, cfg.rollout_steps, obs_norm, reward_scaler, action_rng, env_id=cfg.env_id)
        learner = Learner(policy, optimizer, obs_norm, reward_scaler, generator, action_rng)
        lr_at = _schedule(cfg.lr_schedule, cfg.learning_rate)
        clip_at = _schedule(cfg.clip_schedule, cfg.clip_coef)

        counters: dict[str, Any] = {"global_step": 0, "update": 0, "env_epoch": 0, "train_seconds": 0.0, "stopped": False}
        last_row: dict[str, Any] = {}
        resume_step = 0 if resume else None  # drop metrics logged after the checkpoint we resume from
        state = _restore_checkpoint(rd, cfg, info, learner, counters) if resume else None
        if state is not None:
            counters = {k: state[k] for k in counters}
            last_row = dict(state.get("last_row") or {})
            resume_step = counters["global_step"]
        rd.write_config(to_dict(cfg))  # only now: a resume that fails above leaves config.yaml as it was
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

            prev_step = counters["global_step"]
            step = prev_step + sz.batch_size
            try:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # NaN/inf are named below
                    rollout = collector.collect(policy)
                collector.check_finite(prev_step, f"update {update}")
                metrics = ppo_update(policy, optimizer, flat_param, rollout, cfg, clip_coef, generator, backend,
                                     where=f"update {update} (env step {step})")
            except NonFiniteError as e:
                kept = latest_checkpoint(rd.path)
                raise NonFiniteError(f"{e}; training stopped, " + (
                    f"the last good checkpoint is {kept}" if kept else "before its first checkpoint")) from e
            counters["global_step"] = step

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
                tensors, state = pack(cfg, info, learner, counters)
                state["last_row"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                save_checkpoint(checkpoint_dir(rd.path, step), tensors, state)
                prune_checkpoints(rd.path, cfg.keep_checkpoints)
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
