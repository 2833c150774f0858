"""Running mean/variance (SB3's VecNormalize statistics): batches of any size, one row at a time included, give
the mean and population variance of everything seen, pooled with the prior (mean 0, variance 1, count 1e-4)."""
from __future__ import annotations

import numpy as np
import pytest

from proxrl.control.running_stats import ObsNormalizer, RewardScaler, RunningMeanStd


@pytest.mark.parametrize("batch_sizes", [[1] * 300, [7, 1, 50, 1, 1, 241], [300]])
def test_running_mean_var_equal_numpy_over_all_rows(batch_sizes):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((sum(batch_sizes), 5)) * [1, 2, 3, 0.1, 10] + [0, 1, -2, 5, 100]).astype(np.float32)
    rms = RunningMeanStd((5,))
    start = 0
    for n in batch_sizes:
        rms.update(data[start: start + n])
        start += n
    x = data.astype(np.float64)
    n, m, v, c = len(x), x.mean(axis=0), x.var(axis=0), 1e-4
    # all rows pooled with the prior pseudo-sample (mean 0, var 1, count 1e-4)
    np.testing.assert_allclose(rms.mean, n * m / (c + n), rtol=1e-12)
    np.testing.assert_allclose(rms.var, (c * 1.0 + n * v + c * n / (c + n) * m * m) / (c + n), rtol=1e-10)
    assert rms.count == pytest.approx(n + 1e-4)
    assert rms.mean.dtype == rms.var.dtype == np.float64


def test_one_row_at_a_time_by_hand():
    """Two scalar updates, by hand: count 1e-4 -> 1.0001 -> 2.0001."""
    rms = RunningMeanStd(())
    rms.update(np.array([2.0]))
    c = 1e-4
    t1 = c + 1
    mean1 = 2.0 / t1
    var1 = (1.0 * c + 4.0 * (c / t1)) / t1
    assert rms.mean == pytest.approx(mean1, rel=1e-15) and rms.var == pytest.approx(var1, rel=1e-15)
    rms.update(np.array([-1.0]))
    t2 = t1 + 1
    d = -1.0 - mean1
    assert rms.mean == pytest.approx(mean1 + d / t2, rel=1e-15)
    assert rms.var == pytest.approx((var1 * t1 + d * d * (t1 / t2)) / t2, rel=1e-15)


def test_obs_normalizer_and_reward_scaler_use_the_statistics():
    norm = ObsNormalizer(2, True, clip=5.0)
    rng = np.random.default_rng(1)
    out = np.empty((1, 2), np.float32)
    for _ in range(200):
        norm(rng.normal([3.0, -1.0], [2.0, 0.5], (1, 2)).astype(np.float32), out, update=True)
    obs = np.array([[3.0, 100.0]], np.float32)
    norm(obs, out, update=False)
    expect = (obs[0] - norm.rms.mean) / np.sqrt(norm.rms.var + 1e-8)
    np.testing.assert_allclose(out[0], np.minimum(expect, 5.0), rtol=1e-6)
    assert out[0, 1] == 5.0  # clipped
    scaler = RewardScaler(1, 0.5, True)
    r1 = scaler(np.array([1.0]), np.array([False]), np.array([True]))
    r2 = scaler(np.array([1.0]), np.array([True]), np.array([True]))
    # discounted returns 1.0 then 1.5; the second reward is divided by the std of the returns seen so far
    assert r2[0] == pytest.approx(1.0 / np.sqrt(scaler.rms.var + 1e-8)) and r1[0] > 0
    assert scaler.returns[0] == 0.0  # episode ended: the discounted return restarts
