"""Tuned hyperparameters per environment: ``PRESETS[env_id]`` overrides :class:`ControlConfig` defaults.

Sources: CartPole-v1 and Acrobot-v1 follow rl-baselines3-zoo's ``hyperparams/ppo.yml``; Pendulum-v1 in the
zoo uses gSDE, so its values here were tuned for a plain state-independent Gaussian (see the comment).
"""
from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    # rl-zoo: n_envs 8, n_steps 32, batch 256 (= one minibatch), gae_lambda 0.8, gamma 0.98, n_epochs 20,
    # ent_coef 0, learning_rate lin_1e-3, clip_range lin_0.2, 1e5 timesteps.
    "CartPole-v1": {
        "env_id": "CartPole-v1",
        "total_steps": 100_000,
        "num_envs": 8,
        "rollout_steps": 32,
        "num_minibatches": 1,
        "epochs": 20,
        "learning_rate": 1e-3,
        "lr_schedule": "linear",
        "gamma": 0.98,
        "gae_lambda": 0.8,
        "clip_coef": 0.2,
        "clip_schedule": "linear",
        "entropy_coef": 0.0,
    },
    # rl-zoo: n_envs 16, n_steps 256, gae_lambda 0.94, gamma 0.99, n_epochs 4, ent_coef 0, normalize obs
    # (rl-zoo runs 1e6 steps; the return plateaus near -80 well before that).
    "Acrobot-v1": {
        "env_id": "Acrobot-v1",
        "total_steps": 1_000_000,
        "num_envs": 16,
        "rollout_steps": 256,
        "num_minibatches": 64,
        "epochs": 4,
        "gamma": 0.99,
        "gae_lambda": 0.94,
        "entropy_coef": 0.0,
        "norm_obs": True,
        "lr_schedule": "constant",
        "learning_rate": 3e-4,
    },
    # Plain Gaussian (rl-zoo uses gSDE with 4 envs x 1024 steps). Tuned here: shorter rollouts (4 x 256, 4x
    # more updates, minibatch 64), initial std exp(-0.5) = 0.61 on actions in [-2, 2], obs + reward
    # normalisation; seed 1 reaches eval -185 at 30k steps and -133 at 100k (rl-zoo's 4 x 1024 plain-Gaussian
    # variant stayed at -481).
    "Pendulum-v1": {
        "env_id": "Pendulum-v1",
        "total_steps": 100_000,
        "num_envs": 4,
        "rollout_steps": 256,
        "num_minibatches": 16,
        "init_log_std": -0.5,
        "epochs": 10,
        "learning_rate": 1e-3,
        "lr_schedule": "linear",
        "gamma": 0.9,
        "gae_lambda": 0.95,
        "clip_coef": 0.2,
        "entropy_coef": 0.0,
        "norm_obs": True,
        "norm_reward": True,
    },
}

# --- MuJoCo (Gymnasium v5 ids, `pip install proxrl[mujoco]`) and Atari (`pip install proxrl[atari]`), issue 9 ---
# MuJoCo: rl-baselines3-zoo hyperparams/ppo.yml, its tuned *-v4 entries (the zoo has no v5 entries; v5 keeps
# v4's dynamics and rewards). Translation: zoo batch_size b with n_steps n x n_envs e -> num_minibatches
# n*e/b; `normalize: true` (VecNormalize) -> norm_obs + norm_reward; SB3's value loss is the plain MSE and
# ours is 0.5*MSE, so value_coef = 2 * vf_coef; constant learning rates stay constant; the zoo's
# ortho_init=False (HalfCheetah, Hopper) -> ortho_init False (PyTorch's default Linear init, as SB3's).
# Evaluation as the zoo's: 5 episodes every 25k steps.
PRESETS.update({
    # zoo HalfCheetah-v4 (tuned): n_envs 1, n_steps 512, batch 64, n_epochs 20, lr 2.0633e-5, gamma 0.98,
    # gae_lambda 0.92, clip 0.1, ent_coef 0.000401762, vf_coef 0.58096, max_grad_norm 0.8,
    # log_std_init -2, ReLU, pi/vf [256, 256], normalize, 1e6 steps.
    "HalfCheetah-v5": {
        "env_id": "HalfCheetah-v5", "total_steps": 1_000_000, "num_envs": 1, "rollout_steps": 512,
        "num_minibatches": 8, "epochs": 20, "learning_rate": 2.0633e-5, "lr_schedule": "constant",
        "gamma": 0.98, "gae_lambda": 0.92, "clip_coef": 0.1, "entropy_coef": 0.000401762,
        "value_coef": 1.16192, "max_grad_norm": 0.8, "init_log_std": -2.0, "activation": "relu",
        "hidden_sizes": "256,256", "ortho_init": False, "norm_obs": True, "norm_reward": True,
        "eval_every": 25_000, "eval_episodes": 5,
    },
    # zoo Hopper-v4 (tuned): n_envs 1, n_steps 512, batch 32, n_epochs 5, lr 9.80828e-5, gamma 0.999,
    # gae_lambda 0.99, clip 0.2, ent_coef 0.00229519, vf_coef 0.835671, max_grad_norm 0.7,
    # log_std_init -2, ReLU, pi/vf [256, 256], normalize, 1e6 steps.
    "Hopper-v5": {
        "env_id": "Hopper-v5", "total_steps": 1_000_000, "num_envs": 1, "rollout_steps": 512,
        "num_minibatches": 16, "epochs": 5, "learning_rate": 9.80828e-5, "lr_schedule": "constant",
        "gamma": 0.999, "gae_lambda": 0.99, "clip_coef": 0.2, "entropy_coef": 0.00229519,
        "value_coef": 1.671342, "max_grad_norm": 0.7, "init_log_std": -2.0, "activation": "relu",
        "hidden_sizes": "256,256", "ortho_init": False, "norm_obs": True, "norm_reward": True,
        "eval_every": 25_000, "eval_episodes": 5,
    },
    # zoo Walker2d-v4 (tuned): n_envs 1, n_steps 512, batch 32, n_epochs 20, lr 5.05041e-5, gamma 0.99,
    # gae_lambda 0.95, clip 0.1, ent_coef 0.000585045, vf_coef 0.871923, max_grad_norm 1, SB3's default
    # policy (tanh, [64, 64], log_std_init 0), normalize, 1e6 steps.
    "Walker2d-v5": {
        "env_id": "Walker2d-v5", "total_steps": 1_000_000, "num_envs": 1, "rollout_steps": 512,
        "num_minibatches": 16, "epochs": 20, "learning_rate": 5.05041e-5, "lr_schedule": "constant",
        "gamma": 0.99, "gae_lambda": 0.95, "clip_coef": 0.1, "entropy_coef": 0.000585045,
        "value_coef": 1.743846, "max_grad_norm": 1.0, "norm_obs": True, "norm_reward": True,
        "eval_every": 25_000, "eval_episodes": 5,
    },
    # zoo Ant-v4 (`mujoco-defaults`: normalize, 1e6 steps, otherwise SB3 PPO's defaults): n_envs 1,
    # n_steps 2048, batch 64, n_epochs 10, lr 3e-4 constant, gamma 0.99, gae_lambda 0.95, clip 0.2,
    # ent_coef 0, vf_coef 0.5, max_grad_norm 0.5, tanh [64, 64], log_std_init 0. (CleanRL's
    # ppo_continuous_action.py differs only in lr annealing, clipped value loss and vf_coef 0.5 of 0.5*MSE.)
    "Ant-v5": {
        "env_id": "Ant-v5", "total_steps": 1_000_000, "num_envs": 1, "rollout_steps": 2048,
        "num_minibatches": 32, "epochs": 10, "learning_rate": 3e-4, "lr_schedule": "constant",
        "gamma": 0.99, "gae_lambda": 0.95, "clip_coef": 0.2, "entropy_coef": 0.0, "value_coef": 1.0,
        "max_grad_norm": 0.5, "norm_obs": True, "norm_reward": True, "eval_every": 25_000, "eval_episodes": 5,
    },
    # CleanRL ppo_atari.py (Huang et al. 2022, "The 37 implementation details of PPO"): 8 envs x 128 steps,
    # 4 minibatches, 4 epochs, lr 2.5e-4 annealed linearly, clip 0.1 (constant) also used to clip the value
    # loss (clip_vloss), ent_coef 0.01, vf_coef 0.5 (of 0.5*MSE, as here), max_grad_norm 0.5, gamma 0.99,
    # gae_lambda 0.95, 1e7 agent steps (4e7 frames). Nature-CNN policy; preprocessing in proxrl.control.atari.
    # Evaluation (whole games, sampled actions as rl-zoo's for Atari): 5 games every 100k steps.
    "ALE/Breakout-v5": {
        "env_id": "ALE/Breakout-v5", "total_steps": 10_000_000, "num_envs": 8, "rollout_steps": 128,
        "num_minibatches": 4, "epochs": 4, "learning_rate": 2.5e-4, "lr_schedule": "linear",
        "gamma": 0.99, "gae_lambda": 0.95, "clip_coef": 0.1, "clip_schedule": "constant",
        "value_clip_coef": 0.1, "entropy_coef": 0.01, "value_coef": 0.5, "max_grad_norm": 0.5,
        "normalize_advantages": True, "vector_mode": "async", "eval_every": 100_000, "eval_episodes": 5,
        "eval_deterministic": False,  # rl-baselines3-zoo evaluates Atari with sampled actions
    },
})

# Where each preset comes from (for `proxrl train --help` and the docs).
PRESET_SOURCES: dict[str, str] = {
    "CartPole-v1": "rl-baselines3-zoo hyperparams/ppo.yml",
    "Acrobot-v1": "rl-baselines3-zoo hyperparams/ppo.yml",
    "Pendulum-v1": "tuned here for a plain Gaussian (the zoo's uses gSDE)",
    "HalfCheetah-v5": "rl-baselines3-zoo hyperparams/ppo.yml (HalfCheetah-v4, tuned)",
    "Hopper-v5": "rl-baselines3-zoo hyperparams/ppo.yml (Hopper-v4, tuned)",
    "Walker2d-v5": "rl-baselines3-zoo hyperparams/ppo.yml (Walker2d-v4, tuned)",
    "Ant-v5": "rl-baselines3-zoo hyperparams/ppo.yml (Ant-v4: SB3 PPO defaults + normalize)",
    "ALE/Breakout-v5": "CleanRL ppo_atari.py",
}
