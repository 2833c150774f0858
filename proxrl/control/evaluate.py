"""Deterministic evaluation: greedy actions (argmax of the logits / Gaussian mean), frozen obs-norm stats.

Each evaluation runs ``episodes`` episodes on a separate vector env with ``min(episodes, 32)`` sub-envs,
counting only the **first** episode of each sub-env per round (so short episodes are not over-represented),
reset with a seed derived from ``seed`` and the round number: the same policy and seed give the same
returns every time. Rewards are the env's raw rewards (never scaled).
"""
from __future__ import annotations

import numpy as np
import torch

from proxrl.control.envs import EnvFactory, SpaceInfo, derive_seed, make_vector_env
from proxrl.control.policy import ActorCritic
from proxrl.control.running_stats import ObsNormalizer
from proxrl.errors import UserError

__all__ = ["Evaluator"]

MAX_EVAL_ENVS = 32
MAX_EPISODE_STEPS = 100_000  # guard against envs without a time limit


class Evaluator:
    """Holds an evaluation vector env open across evaluations."""

    def __init__(self, env_id: str, episodes: int, vector_mode: str = "auto", env_fn: EnvFactory | None = None) -> None:
        self.episodes = episodes
        self.num_envs = min(episodes, MAX_EVAL_ENVS)
        self.venv, self.info = make_vector_env(env_id, self.num_envs, vector_mode, env_fn)
        self._obs = np.zeros((self.num_envs, self.info.obs_dim), np.float32)

    def close(self) -> None:
        self.venv.close()

    def evaluate(
        self, policy: ActorCritic, obs_norm: ObsNormalizer, seed: int, record: list[np.ndarray] | None = None
    ) -> dict:
        """``{"mean_return", "std_return", "returns", "lengths"}`` over ``self.episodes`` greedy episodes.

        ``record``: if a list, the raw observations ``(k, obs_dim)`` of the counted episodes are appended to it.
        """
        returns: list[float] = []
        lengths: list[int] = []
        info: SpaceInfo = self.info
        n = self.num_envs
        round_ = 0
        while len(returns) < self.episodes:
            need = min(n, self.episodes - len(returns))
            obs, _ = self.venv.reset(seed=derive_seed(seed, round_))
            ep_ret = np.zeros(n, np.float64)
            ep_len = np.zeros(n, np.int64)
            finished = np.zeros(n, dtype=bool)
            steps = 0
            while not finished[:need].all():
                if record is not None:
                    record.append(obs[:need][~finished[:need]].copy())
                obs_norm(obs, self._obs, update=False)
                action = policy.deterministic_action(torch.from_numpy(self._obs)).numpy()
                if info.action_low is not None:
                    action = np.clip(action, info.action_low, info.action_high)
                obs, reward, terminated, truncated, _ = self.venv.step(action)
                running = ~finished
                ep_ret += np.where(running, reward, 0.0)
                ep_len += running
                finished |= terminated | truncated
                steps += 1
                if steps > MAX_EPISODE_STEPS:
                    raise UserError(
                        f"evaluation episode did not end within {MAX_EPISODE_STEPS} steps; "
                        "wrap the env in gymnasium.wrappers.TimeLimit"
                    )
            returns.extend(ep_ret[:need].tolist())
            lengths.extend(ep_len[:need].tolist())
            round_ += 1
        arr = np.asarray(returns)
        return {
            "mean_return": float(arr.mean()),
            "std_return": float(arr.std()),
            "returns": returns,
            "lengths": lengths,
        }
