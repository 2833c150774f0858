"""KL-divergence estimators and KL-penalty coefficient controllers.

* :func:`kl_estimate` — per-sample estimators k1 / k2 / k3 from John Schulman's note "Approximating KL
  Divergence" (2020, http://joschu.net/blog/kl-approx.html).
* :class:`FixedKLController` and :class:`AdaptiveKLController` — the coefficient beta of the KL penalty
  ``r_t - beta * KL`` used in RLHF (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences", Sec. 2.2).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .advantages import _check_same_shape

__all__ = ["kl_estimate", "FixedKLController", "AdaptiveKLController"]

_KINDS = ("k1", "k2", "k3")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-sample estimate of KL(pi || ref) from samples x ~ pi (Schulman, "Approximating KL Divergence").

    With ``log r = log ref(x) - log pi(x)``:

    .. math::
        k_1 = -\\log r, \\qquad k_2 = \\tfrac12 (\\log r)^2, \\qquad k_3 = (r - 1) - \\log r

    * k1 is unbiased but has high variance and can be negative per sample.
    * k2 is biased (exact to second order when the distributions are close), always >= 0, low variance.
    * k3 is unbiased (since E_pi[r] = 1) and always >= 0 (because log r <= r - 1), low variance.

    Default ``"k1"``: the per-token reward penalty of Ziegler et al. 2019 / Stiennon et al. 2020.
    GRPO (Shao et al. 2024, eq. 4) uses k3 as a loss term. Note k3 contains ``exp(log r)``; it is not
    clamped here (OpenRLHF clamps ``log r`` to [-10, 10]).

    Args:
        logprobs: (*S) ``log pi(x)`` of the sampled x.
        ref_logprobs: (*S) ``log ref(x)`` of the same x.
        kind: "k1", "k2" or "k3".

    Returns:
        (*S) per-sample estimates; their mean over samples estimates KL(pi || ref).
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator kind={kind!r}; use one of {', '.join(_KINDS)}")


class FixedKLController:
    """Constant KL-penalty coefficient beta (Ziegler et al. 2019, "fixed" variant).

    Args:
        coef: beta >= 0.
    """

    def __init__(self, coef: float) -> None:
        if not coef >= 0:
            raise ValueError(f"KL coef must be >= 0, got {coef}")
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, Sec. 2.2), a proportional controller.

    .. math::
        e_t = \\mathrm{clip}\\Big(\\frac{\\mathrm{KL}_t - \\mathrm{KL}_{target}}{\\mathrm{KL}_{target}},
              -0.2, 0.2\\Big), \\qquad \\beta_{t+1} = \\beta_t (1 + K_\\beta e_t)

    with ``K_beta = n_steps / horizon`` (the paper uses K_beta = 0.1; the "horizon" form is from the authors'
    lm-human-preferences code and TRL, whose defaults are init_coef=0.2, target=6, horizon=10000).

    Args:
        init_coef: beta_0 >= 0.
        target: target KL (nats, summed per sequence in the RLHF setting) > 0.
        horizon: number of samples over which a full correction is applied, > 0.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if not init_coef >= 0:
            raise ValueError(f"init_coef must be >= 0, got {init_coef}")
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiply coef by ``1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``.

        Args:
            current_kl: the measured KL of the latest batch (float).
            n_steps: number of samples (e.g. sequences) in that batch.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
