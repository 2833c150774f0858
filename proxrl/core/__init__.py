"""proxrl.core: the PPO maths as pure functions of tensors (imports only torch, numpy and the stdlib).

See docs/theory.md for every equation next to the function that computes it and the test that checks it.
"""
from .advantages import gae, group_advantages, masked_mean, masked_var, normalize, rloo_advantages
from .kl import AdaptiveKLController, FixedKLController, kl_estimate
from .losses import entropy_from_logits, explained_variance, kl_early_stop, policy_loss, value_loss
from .schedules import constant_schedule, linear_schedule

__all__ = [
    "gae",
    "normalize",
    "masked_mean",
    "masked_var",
    "group_advantages",
    "rloo_advantages",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "kl_estimate",
    "explained_variance",
    "kl_early_stop",
    "FixedKLController",
    "AdaptiveKLController",
    "constant_schedule",
    "linear_schedule",
]
