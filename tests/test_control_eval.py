"""Evaluation with greedy or sampled actions (``eval_deterministic``), checked on an env whose return counts
the policy's choices: reward 1 for action 1, 0 for action 0, 100 steps per episode."""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from proxrl.control import PRESETS, ControlConfig
from proxrl.control.evaluate import Evaluator
from proxrl.control.policy import ActorCritic
from proxrl.control.running_stats import ObsNormalizer

STEPS = 100


class CountOnes(gym.Env):
    observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(2, np.float32), float(action == 1), False, self.t >= STEPS, {}


def _policy_with_p1(p1: float) -> ActorCritic:
    """An MLP policy whose action probabilities are (1 - p1, p1) for every observation."""
    policy = ActorCritic(2, 2, True, (4,), "tanh", 0.0)
    last = policy.actor[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, math.log(p1 / (1 - p1))]))
    return policy


def _evaluate(deterministic: bool, seed: int, episodes: int = 8) -> list[float]:
    ev = Evaluator("count-ones", episodes, "sync", env_fn=CountOnes, deterministic=deterministic)
    try:
        return ev.evaluate(_policy_with_p1(0.75), ObsNormalizer(2, enabled=False), seed)["returns"]
    finally:
        ev.close()


def test_greedy_evaluation_takes_the_mode():
    assert _evaluate(True, 0) == [float(STEPS)] * 8


def test_sampled_evaluation_draws_from_the_policy_reproducibly():
    returns = _evaluate(False, 0)
    # each return ~ Binomial(100, 0.75): mean 75, sd 4.33; the mean of 8 has sd 1.53
    assert abs(np.mean(returns) - 75.0) < 6 * 1.53
    assert len(set(returns)) > 1 and max(returns) < STEPS
    assert _evaluate(False, 0) == returns  # same seed, same samples
    assert _evaluate(False, 1) != returns


def test_atari_preset_evaluates_with_sampled_actions_and_the_option_is_resumable():
    assert PRESETS["ALE/Breakout-v5"]["eval_deterministic"] is False
    assert ControlConfig().eval_deterministic is True
    assert "eval_deterministic" in ControlConfig.resumable_fields
