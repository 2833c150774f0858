"""Tests for proxrl.core.kl (k1/k2/k3 estimators, KL controllers) and proxrl.core.schedules."""
import math

import pytest
import torch

from proxrl.core import (
    AdaptiveKLController,
    FixedKLController,
    constant_schedule,
    kl_estimate,
    linear_schedule,
)

torch.set_num_threads(1)


def test_kl_estimate_hand():
    # log p = log 0.5, log q = log 0.25 -> log r = log q - log p = -log 2 = -0.693147, r = 0.5
    # k1 = 0.693147 ; k2 = 0.5 * 0.480453 = 0.240227 ; k3 = (0.5 - 1) + 0.693147 = 0.193147
    lp = torch.tensor([math.log(0.5)], dtype=torch.float64)
    lq = torch.tensor([math.log(0.25)], dtype=torch.float64)
    assert kl_estimate(lp, lq).item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_estimate(lp, lq, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_estimate(lp, lq, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    # identical distributions: every estimator is 0
    for kind in ("k1", "k2", "k3"):
        assert kl_estimate(lp, lp, kind).item() == 0.0


def test_k3_nonnegative_k1_can_be_negative():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(10_000, generator=g) * 3
    lq = torch.randn(10_000, generator=g) * 3
    assert (kl_estimate(lp, lq, "k3") >= 0).all()
    assert (kl_estimate(lp, lq, "k2") >= 0).all()
    assert (kl_estimate(lp, lq, "k1") < 0).any()


def test_k1_k3_unbiased_on_categoricals():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()  # = 0.23283
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    k1, k3 = kl_estimate(lp, lq, "k1"), kl_estimate(lp, lq, "k3")
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.std() < k1.std()  # the point of k3: lower variance


def test_kl_estimate_errors():
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match=r"ref_logprobs\(3,\)"):
        kl_estimate(torch.zeros(2), torch.zeros(3))


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.coef == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.coef == 0.05


def test_adaptive_kl_controller_sequence():
    # init 0.2, target 6, horizon 10000; multiplier = 1 + clip(kl/6 - 1, -0.2, 0.2) * n / 10000
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(9.0, 1000)  # e = 0.5 -> clipped 0.2 ; x (1 + 0.2 * 0.1) = 1.02 -> 0.204
    assert c.coef == pytest.approx(0.204)
    c.update(6.6, 1000)  # e = 0.1 ; x 1.01 -> 0.20604
    assert c.coef == pytest.approx(0.20604)
    c.update(0.0, 1000)  # e = -1 -> clipped -0.2 ; x 0.98 -> 0.2019192
    assert c.coef == pytest.approx(0.2019192)
    c.update(5.7, 2000)  # e = -0.05 ; x (1 - 0.05 * 0.2) = 0.99 -> 0.199900008
    assert c.coef == pytest.approx(0.199900008)
    c.update(6.0, 5000)  # on target: unchanged
    assert c.coef == pytest.approx(0.199900008)
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(c.state_dict())
    assert (restored.coef, restored.target, restored.horizon) == (c.coef, 6.0, 10000.0)


def test_adaptive_kl_controller_clip_bounds():
    hi, lo = AdaptiveKLController(1.0, 1.0, 1.0), AdaptiveKLController(1.0, 1.0, 1.0)
    hi.update(1e9, 1)
    lo.update(0.0, 1)
    assert hi.coef == pytest.approx(1.2) and lo.coef == pytest.approx(0.8)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 100)


def test_schedules():
    assert constant_schedule(3e-4)(0.0) == 3e-4 and constant_schedule(3e-4)(1.0) == 3e-4
    lin = linear_schedule(1.0)
    # fraction DONE: 1 at the start, 0.75 after a quarter, 0 at the end; outside [0, 1] clamped
    assert [lin(p) for p in (0.0, 0.25, 1.0, 1.5, -1.0)] == [1.0, 0.75, 0.0, 0.0, 1.0]
    assert linear_schedule(3e-4, 1e-4)(0.5) == pytest.approx(2e-4)
