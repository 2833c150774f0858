"""Stable-Baselines3 side of ``control_bench.py``: one PPO run, results written as JSON.

The workloads are rl-baselines3-zoo's tuned PPO settings, exactly as the peers' reference scripts run them:

* ``cartpole``: ``make_vec_env("CartPole-v1", n_envs=8, seed=seed)`` (a ``DummyVecEnv``), ``MlpPolicy``,
  ``n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0``, learning rate and
  clip range ``lin_1e-3`` / ``lin_0.2`` (linear decay to 0). A callback checks after every vector step whether
  ``num_timesteps`` reached the next multiple of ``eval_every`` (5000) and, if so, runs
  ``evaluate_policy(model, gym.make("CartPole-v1"), n_eval_episodes=20, deterministic=True)``; its time is
  excluded from the training time. "Solved" = the first evaluation with mean return >= 475.
* ``pendulum``: ``make_vec_env("Pendulum-v1", n_envs=4, seed=seed)``, ``n_steps=1024, gae_lambda=0.95,
  gamma=0.9, n_epochs=10, ent_coef=0, learning_rate=1e-3, clip_range=0.2, use_sde=True, sde_sample_freq=4``
  (batch_size stays SB3's default 64); no evaluation during training; the final deterministic evaluation
  (20 episodes) after ``learn`` is not timed.

* ``breakout``: ``ALE/Breakout-v5`` through SB3's own Atari pipeline, ``make_atari_env(n_envs=8,
  vec_env_cls=SubprocVecEnv, env_kwargs={"frameskip": 1})`` (``AtariWrapper``: 30 no-ops, max-and-skip 4,
  episodic life, fire reset, 84x84 grey, reward clipping) + ``VecFrameStack(4)``; ``CnnPolicy`` (Nature CNN,
  shared trunk) with CleanRL ``ppo_atari``'s values as proxrl's preset has them: ``n_steps=128, batch_size=256,
  n_epochs=4``, learning rate 2.5e-4 decayed linearly, ``clip_range=0.1, clip_range_vf=0.1, ent_coef=0.01,
  vf_coef=0.25`` (SB3's value loss is the plain MSE: 0.25 = proxrl's value_coef 0.5 of 0.5*MSE),
  ``max_grad_norm=0.5, gamma=0.99, gae_lambda=0.95``. STEPS are agent steps (4 frames each); no evaluation
  (``final_eval_mean`` is NaN). Reported: whole-loop frames/s (``learn``'s wall time, env start-up excluded).
* ``halfcheetah``: ``HalfCheetah-v5`` with rl-baselines3-zoo's tuned ``HalfCheetah-v4`` entry (hyperparams/ppo.yml),
  exactly as the zoo builds it: ``make_vec_env(n_envs=1)`` (``DummyVecEnv`` + ``Monitor``) in
  ``VecNormalize(gamma=0.98)`` (obs and reward, clip 10), ``MlpPolicy`` with ``n_steps=512, batch_size=64,
  n_epochs=20, learning_rate=2.0633e-5, gamma=0.98, gae_lambda=0.92, clip_range=0.1, ent_coef=0.000401762,
  vf_coef=0.58096, max_grad_norm=0.8`` and ``policy_kwargs=dict(log_std_init=-2, ortho_init=False,
  activation_fn=nn.ReLU, net_arch=dict(pi=[256, 256], vf=[256, 256]))``. No evaluation during training; after
  ``learn`` (not timed) ``evaluate_policy(deterministic=True)`` over ``--eval-episodes`` (10) episodes on a fresh
  env in ``VecNormalize(training=False, norm_reward=False)`` carrying the training env's observation
  statistics (frozen): the returns are the raw env rewards (``Monitor``).

Both set ``torch.set_num_threads(--threads)`` (default 1); the parent sets ``OMP_WAIT_POLICY=PASSIVE`` in the
environment for 1 thread, GNU OpenMP's default spin (``GOMP_SPINCOUNT=300000``) for more.

Usage: ``python benchmarks/_sb3_side.py {cartpole,pendulum,breakout,halfcheetah} SEED STEPS OUT.json
[--eval-every 5000] [--eval-episodes 10]``
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

T_START = time.perf_counter()

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402

SOLVED = 475.0


def _linear(initial: float):
    """SB3 schedules take the *remaining* progress (1 -> 0)."""
    return lambda progress_remaining: progress_remaining * initial


class _EvalEvery(BaseCallback):
    """Deterministic 20-episode evaluation every ``every`` env steps; accumulates its wall time."""

    def __init__(self, every: int, episodes: int = 20) -> None:
        super().__init__()
        self.every = every
        self.next = every
        self.episodes = episodes
        self.env = gym.make("CartPole-v1")
        self.eval_seconds = 0.0
        self.t0 = 0.0
        self.history: list[dict] = []
        self.solved: dict | None = None

    def _on_step(self) -> bool:
        if self.every > 0 and self.num_timesteps >= self.next:
            self.next += self.every
            t = time.perf_counter()
            mean, std = evaluate_policy(self.model, self.env, n_eval_episodes=self.episodes, deterministic=True)
            now = time.perf_counter()
            self.eval_seconds += now - t
            point = {
                "step": int(self.num_timesteps),
                "train_seconds": now - self.t0 - self.eval_seconds,
                "eval_return_mean": float(mean),
            }
            self.history.append(point)
            if mean >= SOLVED and self.solved is None:
                self.solved = point
        return True


def run_cartpole(seed: int, steps: int, eval_every: int) -> dict:
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO(
        "MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
        learning_rate=_linear(1e-3), clip_range=_linear(0.2), seed=seed, verbose=0, device="cpu",
    )
    cb = _EvalEvery(eval_every)
    t0 = time.perf_counter()
    cb.t0 = t0
    model.learn(steps, callback=cb)
    wall = time.perf_counter() - t0 - cb.eval_seconds
    mean, std = evaluate_policy(model, gym.make("CartPole-v1"), n_eval_episodes=20, deterministic=True)
    return {
        "steps": int(model.num_timesteps),
        "train_seconds": wall,
        "steps_per_second": model.num_timesteps / wall,
        "eval_seconds": cb.eval_seconds,
        "solved_step": cb.solved["step"] if cb.solved else None,
        "solved_seconds": cb.solved["train_seconds"] if cb.solved else None,
        "evals": cb.history,
        "final_eval_mean": float(mean),
        "final_eval_std": float(std),
    }


def run_pendulum(seed: int, steps: int) -> dict:
    env = make_vec_env("Pendulum-v1", n_envs=4, seed=seed)
    model = PPO(
        "MlpPolicy", env, n_steps=1024, gae_lambda=0.95, gamma=0.9, n_epochs=10, ent_coef=0.0, learning_rate=1e-3,
        clip_range=0.2, use_sde=True, sde_sample_freq=4, seed=seed, verbose=0, device="cpu",
    )
    t0 = time.perf_counter()
    model.learn(steps)
    wall = time.perf_counter() - t0
    mean, std = evaluate_policy(model, gym.make("Pendulum-v1"), n_eval_episodes=20, deterministic=True)
    return {
        "steps": int(model.num_timesteps),
        "train_seconds": wall,
        "steps_per_second": model.num_timesteps / wall,
        "final_eval_mean": float(mean),
        "final_eval_std": float(std),
    }


def _make_breakout(**kwargs):
    """``gym.make("ALE/Breakout-v5")`` in a SubprocVecEnv worker (the ALE ids exist once ale_py is imported there)."""
    import ale_py

    gym.register_envs(ale_py)
    return gym.make("ALE/Breakout-v5", **kwargs)


class _GameReturns(BaseCallback):
    """After each rollout: (frames, mean raw whole-game score of the last 100 finished games) from SB3's
    Monitor, which sits under the Atari wrappers (no life loss ends its episode, no reward clipping)."""

    def __init__(self) -> None:
        super().__init__()
        self.curve: list[tuple[int, float, int]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buf = self.model.ep_info_buffer
        if buf:
            self.curve.append((4 * self.num_timesteps, statistics.fmean(e["r"] for e in buf), len(buf)))


def run_breakout(seed: int, steps: int) -> dict:
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import SubprocVecEnv, VecFrameStack

    env = VecFrameStack(make_atari_env(_make_breakout, n_envs=8, seed=seed, vec_env_cls=SubprocVecEnv,
                                       env_kwargs={"frameskip": 1}), n_stack=4)
    model = PPO(
        "CnnPolicy", env, n_steps=128, batch_size=256, n_epochs=4, learning_rate=_linear(2.5e-4), clip_range=0.1,
        clip_range_vf=0.1, ent_coef=0.01, vf_coef=0.25, max_grad_norm=0.5, gamma=0.99, gae_lambda=0.95,
        seed=seed, verbose=0, device="cpu",
    )
    games = _GameReturns()
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(steps, callback=games)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    env.close()
    return {
        "steps": int(model.num_timesteps),
        "frames": 4 * int(model.num_timesteps),
        "game_return_curve": games.curve,  # (frames, mean whole-game score of the last <= 100 games, games)
        "learner_cpu_seconds": cpu,  # this process only (policy + updates); the env workers are other processes
        "train_seconds": wall,
        "steps_per_second": model.num_timesteps / wall,
        "frames_per_second": 4 * model.num_timesteps / wall,
        "parameters": sum(p.numel() for p in model.policy.parameters()),
        "final_eval_mean": float("nan"),
        "final_eval_std": float("nan"),
    }


HALFCHEETAH_EVAL_SEED_OFFSET = 10_000  # evaluation env seed = training seed + this (a stream of its own)


def run_halfcheetah(seed: int, steps: int, eval_episodes: int) -> dict:
    from stable_baselines3.common.vec_env import VecNormalize
    from torch import nn

    gamma = 0.98
    env = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=1, seed=seed), gamma=gamma)  # zoo: normalize + gamma
    model = PPO(
        "MlpPolicy", env, n_steps=512, batch_size=64, n_epochs=20, learning_rate=2.0633e-5, gamma=gamma,
        gae_lambda=0.92, clip_range=0.1, ent_coef=0.000401762, vf_coef=0.58096, max_grad_norm=0.8,
        policy_kwargs={"log_std_init": -2, "ortho_init": False, "activation_fn": nn.ReLU,
                       "net_arch": {"pi": [256, 256], "vf": [256, 256]}},
        seed=seed, verbose=0, device="cpu",
    )
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    eval_env = VecNormalize(make_vec_env("HalfCheetah-v5", n_envs=1, seed=seed + HALFCHEETAH_EVAL_SEED_OFFSET),
                            training=False, norm_reward=False, gamma=gamma)
    eval_env.obs_rms = env.obs_rms.copy()  # frozen training statistics
    t = time.perf_counter()
    returns, lengths = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True,
                                       return_episode_rewards=True)
    eval_seconds = time.perf_counter() - t
    return {
        "steps": int(model.num_timesteps),
        "train_seconds": wall,
        "train_cpu_seconds": cpu,
        "steps_per_second": model.num_timesteps / wall,
        "updates": int(model._n_updates // model.n_epochs),
        "parameters": sum(p.numel() for p in model.policy.parameters()),
        "final_eval_mean": float(statistics.fmean(returns)),
        "final_eval_std": float(statistics.pstdev(returns)),
        "final_eval_returns": [float(r) for r in returns],
        "final_eval_lengths": [int(n) for n in lengths],
        "eval_seconds": eval_seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("env", choices=("cartpole", "pendulum", "breakout", "halfcheetah"))
    p.add_argument("seed", type=int)
    p.add_argument("steps", type=int)
    p.add_argument("out")
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=10, help="halfcheetah: final deterministic evaluation episodes")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import_seconds = time.perf_counter() - T_START
    if a.env == "cartpole":
        res = run_cartpole(a.seed, a.steps, a.eval_every)
    elif a.env == "pendulum":
        res = run_pendulum(a.seed, a.steps)
    elif a.env == "halfcheetah":
        res = run_halfcheetah(a.seed, a.steps, a.eval_episodes)
    else:
        res = run_breakout(a.seed, a.steps)
    res.update(side="sb3", env=a.env, seed=a.seed, threads=a.threads, import_seconds=import_seconds,
               process_seconds=time.perf_counter() - T_START)
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
