"""Hyper-parameter schedules as functions of the fraction of training done.

The argument is ``progress`` = fraction of training DONE, in [0, 1] (0 at the start, 1 at the end).
Stable-Baselines3 schedules instead receive ``progress_remaining`` going from 1 to 0, and CleanRL computes
``frac = 1 - (update - 1) / num_updates``; mind the direction when porting hyper-parameters.
The PPO paper's Atari settings (Table 5) anneal Adam's step size and the clip range linearly to 0
(``alpha`` goes from 1 to 0 and multiplies both).
"""
from __future__ import annotations

from typing import Callable

__all__ = ["constant_schedule", "linear_schedule"]


def constant_schedule(value: float) -> Callable[[float], float]:
    """``f(progress) = value`` for every progress."""
    value = float(value)

    def schedule(progress: float) -> float:
        return value

    return schedule


def linear_schedule(initial: float, final: float = 0.0) -> Callable[[float], float]:
    """``f(progress) = initial + (final - initial) * progress``, progress clamped to [0, 1].

    Default final = 0.0: linear annealing to zero, as in the PPO paper's Atari settings.
    """
    initial, final = float(initial), float(final)

    def schedule(progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        return initial + (final - initial) * p

    return schedule
