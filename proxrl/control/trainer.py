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

Devices and processes (docs/distributed.md): ``cfg.device`` (:func:`proxrl.distributed.resolve_device`) holds the
policy, the optimizer state and the update's batch; envs and rollout buffers stay on the CPU. Under torchrun
every size is global: process ``r`` steps the envs ``D.shard_indices(num_envs, r, N)`` (seeded by their global
index), the rollouts are gathered with the job's episode lists (:func:`~proxrl.control.rollout.gather_rollout`,
one all-gather) so GAE, normalisers, the minibatch order and the episode metrics are the same on every process;
each process computes the gradient of its share of every large minibatch and one all-reduce gives all of them
the whole minibatch's gradient, while a small one (every MLP preset's) is computed whole by every process on
one machine's CPU, with no collective (:func:`~proxrl.control.ppo.ppo_update`). Only rank 0 writes the run
directory, evaluates and records videos.
With sync/async vector envs, N processes compute what one process computes, up to the order of float sums
(a native vector env such as CartPole's draws its resets from one generator per process, so there the runs
differ in env randomness). A checkpoint written with N processes resumes with M.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proxrl import distributed as D
from proxrl.config import from_dict, to_dict
from proxrl.control.adam import FlatAdam
from proxrl.control.checkpointing import STATE_KEYS, Learner, build_policy, check_checkpoint, pack, restore
from proxrl.control.config import RUN_INFO_KEY, ControlConfig, config_values, sizes
from proxrl.control.envs import EnvFactory, derive_seed, make_vector_env
from proxrl.control.evaluate import Evaluator, eval_seed
from proxrl.control.flat_params import flatten_parameters
from proxrl.control.ppo import ppo_update, resolve_grad_backend
from proxrl.control.rollout import Collector, gather_rollout
from proxrl.control.running_stats import ObsNormalizer, RewardScaler
from proxrl.core import constant_schedule, linear_schedule
from proxrl.errors import UserError
from proxrl.runs import (
    MetricsLogger,
    RunDir,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
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
    saved = from_dict(ControlConfig, config_values(rd.read_config()), source=str(rd.config_path))
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
    change, whose tensors do not fit the config, or that has done more steps than ``total_steps``. With several
    processes rank 0 picks the checkpoint and tells the others its path; every process reads it.
    """
    expected, _ = pack(cfg, info, learner, counters)
    expected = {k: v for k, v in expected.items() if not k.startswith("rng.torch_cuda")}  # present only if CUDA ran
    always = [k for k in expected if k.startswith(("optim.", "rng."))]  # the rest depends on the config: see below
    if D.is_main():
        loaded = load_latest_checkpoint(rd.path, require_state=STATE_KEYS, require_tensors=always)
        D.broadcast_object({"path": None if loaded is None else str(loaded[0])})
    else:
        path = D.broadcast_object(None)["path"]
        loaded = None if path is None else (Path(path), *load_checkpoint(path, require_state=STATE_KEYS,
                                                                         require_tensors=always))
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
    Under torchrun (``WORLD_SIZE > 1``) every process calls it with the same arguments (see the module
    docstring). Returns the metrics of the last update, including the final evaluation (``eval_return_mean``/
    ``eval_return_std``), plus ``device`` (the device used) and ``processes``.
    """
    from threadpoolctl import threadpool_limits

    rd = RunDir(run_dir)
    if resume and not rd.has_run():  # before the lock, which would create the directory
        raise UserError(f"cannot resume: {rd.path} holds no run (no config.yaml); start it without --resume")
    cfg = _resolve_config(rd, cfg, resume)
    device = D.resolve_device(cfg.device)
    dist = D.init_distributed(device)
    D.configure_device(device)
    # numpy's BLAS runs the update's small matmuls; its worker threads spin like OpenMP's, which made the
    # update much slower on a busy 2-core machine. One thread is fastest for these sizes, also with --threads 2
    # (torch's threads then run the large products and Adam: HalfCheetah 9.2 s vs 9.7 s with 2 BLAS threads).
    with threadpool_limits(limits=1, user_api="blas"), \
            (rd.lock() if dist.is_main else contextlib.nullcontext()):
        return _train(cfg, rd, resume, progress, env_fn, device, dist)


def _run_info(cfg: ControlConfig, device: torch.device, dist: D.DistInfo) -> dict[str, Any]:
    """config.yaml's ``run_info`` section: what ran the latest session and the env preprocessing."""
    from proxrl.control.atari import atari_settings, is_atari

    info: dict[str, Any] = {"device": str(device), "processes": dist.world_size}
    if is_atari(cfg.env_id):
        info["atari"] = atari_settings(cfg.env_id, vector_mode=cfg.vector_mode)
    return info


def _check_policy_fits(cfg: ControlConfig, info: Any) -> None:
    if info.obs_kind == "image" and cfg.norm_obs:
        raise UserError(f"norm_obs=true is for vector observations; {cfg.env_id!r} has images {list(info.obs_shape)}, "
                        "which the CNN scales by 1/255 itself: use --norm-obs false")


def _weights_agree(flat_param: torch.nn.Parameter) -> None:
    """RuntimeError unless every process holds the same weights (they must: same data, same all-reduced steps)."""
    if not D.is_distributed():
        return
    hi = D.all_reduce_max(flat_param.detach())
    lo = -D.all_reduce_max(-flat_param.detach())
    if not torch.equal(hi, lo):
        raise RuntimeError(f"processes hold different weights (largest gap {float((hi - lo).abs().max()):.3g}); "
                           "please report this")


def _train(
    cfg: ControlConfig, rd: RunDir, resume: bool, progress: bool, env_fn: EnvFactory | None,
    device: torch.device, dist: D.DistInfo,
) -> dict[str, Any]:
    main = dist.is_main
    sz = sizes(cfg)
    torch.set_num_threads(cfg.threads)
    shard = D.shard_indices(cfg.num_envs, dist.rank, dist.world_size, what="num_envs")
    if main:
        rd.create(exist_ok=resume)

    # Seeding: init from the global RNGs, action sampling from a numpy generator, minibatch order from a
    # torch generator; each stream derived from the seed, the same in every process.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, MINIBATCH_STREAM))
    action_rng = np.random.default_rng(derive_seed(cfg.seed, SAMPLING_STREAM))

    venv, info = make_vector_env(cfg.env_id, shard.stop - shard.start, cfg.vector_mode, env_fn)
    evaluator: Evaluator | None = None
    logger: MetricsLogger | None = None
    bar = None
    # Denormal floats (|x| < 1.2e-38) are flushed to zero during training: tiny gradients squared in Adam's second
    # moment otherwise hit the CPU's slow microcode path (8% of a HalfCheetah run); restored on the way out.
    torch.set_flush_denormal(True)
    try:
        _check_policy_fits(cfg, info)
        policy = build_policy(cfg, info).to(device)
        backend = resolve_grad_backend(cfg.grad_backend, policy, device)
        flat_param = flatten_parameters(policy)  # one tensor for Adam, clipping and zeroing (speed)
        optimizer = FlatAdam(flat_param, lr=cfg.learning_rate, eps=1e-5)
        obs_norm = ObsNormalizer(info.obs_dim, cfg.norm_obs, cfg.obs_clip)
        reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.norm_reward, cfg.reward_clip)
        collector = Collector(venv, info, cfg.rollout_steps, obs_norm, reward_scaler, action_rng, env_id=cfg.env_id,
                              device=device, env_slice=shard, num_envs_global=cfg.num_envs)
        learner = Learner(policy, optimizer, obs_norm, reward_scaler, generator, action_rng)
        lr_at = _schedule(cfg.lr_schedule, cfg.learning_rate)
        clip_at = _schedule(cfg.clip_schedule, cfg.clip_coef)
        if main and cfg.video_every > 0:
            from proxrl.control.video import check_can_record

            check_can_record(cfg.env_id, env_fn)

        counters: dict[str, Any] = {"global_step": 0, "update": 0, "env_epoch": 0, "train_seconds": 0.0, "stopped": False}
        last_row: dict[str, Any] = {}
        resume_step = 0 if resume else None  # drop metrics logged after the checkpoint we resume from
        state = _restore_checkpoint(rd, cfg, info, learner, counters) if resume else None
        if state is not None:
            counters = {k: state[k] for k in counters}
            last_row = dict(state.get("last_row") or {})
            resume_step = counters["global_step"]
        if main:
            # only now: a resume that fails above leaves config.yaml as it was
            rd.write_config({**to_dict(cfg), RUN_INFO_KEY: _run_info(cfg, device, dist)})
            logger = MetricsLogger(rd.path, tensorboard=cfg.tensorboard, resume_from_step=resume_step)
            if progress:
                where = f"{device}" + (f", {dist.world_size} processes" if dist.distributed else "")
                print(f"training {cfg.env_id} on {where} ({backend} gradient) -> {rd.path}", flush=True)
        collector.reset(derive_seed(cfg.seed, TRAIN_ENV_STREAM, counters["env_epoch"]))

        if progress and main:
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
                    rollout = gather_rollout(collector.collect(policy))
                collector.check_finite(rollout, prev_step, f"update {update}")
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
                **_episode_stats(rollout.episode_returns, rollout.episode_lengths),
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
                stop = False
                if main:
                    if evaluator is None:
                        evaluator = Evaluator(cfg.env_id, cfg.eval_episodes, cfg.vector_mode, env_fn,
                                              deterministic=cfg.eval_deterministic)
                    last_eval = evaluator.evaluate(policy, obs_norm, eval_seed(cfg.seed))
                    row["eval_return_mean"] = last_eval["mean_return"]
                    row["eval_return_std"] = last_eval["std_return"]
                    stop = cfg.target_return is not None and last_eval["mean_return"] >= cfg.target_return
                if D.broadcast_object(bool(stop)):  # rank 0 evaluates; every process stops with it
                    final = counters["stopped"] = True
            if main and _crossed(step, prev_step, cfg.video_every):
                _record_video(cfg, rd, policy, obs_norm, step, env_fn)

            t_log = time.perf_counter()
            if logger is not None:
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
                _weights_agree(flat_param)
                if main:
                    tensors, state = pack(cfg, info, learner, counters)
                    state["last_row"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                         for k, v in row.items()}
                    save_checkpoint(checkpoint_dir(rd.path, step), tensors, state)
                    prune_checkpoints(rd.path, cfg.keep_checkpoints)
                if not final:
                    # Re-seed at the boundary so that a run resumed from this checkpoint continues identically.
                    collector.reset(derive_seed(cfg.seed, TRAIN_ENV_STREAM, counters["env_epoch"]))
            if final:
                break
        result = {k: (math.nan if v is None else v) for k, v in last_row.items()}
        result.update(device=str(device), processes=dist.world_size)
        return result
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        if evaluator is not None:
            evaluator.close()
        venv.close()
        torch.set_flush_denormal(False)


def _episode_stats(returns: list[float], lengths: list[int]) -> dict[str, float]:
    """``episodic_return`` / ``episodic_length`` (means over the episodes that ended in the job's rollout, NaN
    if none) and ``episodes``. With several processes the lists are already the job's (gather_rollout gathers
    them in one process's order), so no collective is needed and the figures equal one process's."""
    return {"episodic_return": float(np.mean(returns)) if returns else math.nan,
            "episodic_length": float(np.mean(lengths)) if lengths else math.nan,
            "episodes": len(returns)}


def _record_video(cfg: ControlConfig, rd: RunDir, policy: torch.nn.Module, obs_norm: ObsNormalizer, step: int,
                  env_fn: EnvFactory | None) -> None:
    """One greedy episode of the current policy as ``run_dir/videos/step-<step>-episode-0.<mp4|gif>``."""
    from proxrl.control.video import record_policy_episodes

    record_policy_episodes(policy, obs_norm, cfg.env_id, rd.path / "videos", episodes=1, seed=eval_seed(cfg.seed),
                           env_fn=env_fn, name_prefix=f"step-{step}")
