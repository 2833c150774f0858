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


def test_one_env_reward_scaler_equals_the_array_path_bit_for_bit():
    """RewardScaler's one-env path (Python floats) gives the bits of its numpy path (``_scale``): scaled rewards,
    returns and statistics, over steps with episode ends, reset (invalid) steps, clipping at both ends, and NaN."""
    rng = np.random.default_rng(0)
    fast, ref = RewardScaler(1, 0.98, True, clip=2.0), RewardScaler(1, 0.98, True, clip=2.0)
    clipped = set()
    for t in range(400):
        r = rng.standard_normal() * (30.0 if t % 37 == 0 else 1.0)  # large rewards clip at +-2
        step = (np.array([r]), np.array([rng.random() < 0.05]), np.array([rng.random() > 0.03]))
        got, want = fast(*step), ref._scale(*step)
        clipped.update(float(v) for v in want if abs(v) == 2.0)
        assert got.dtype == want.dtype == np.float64 and got.shape == (1,)
        assert got.tobytes() == want.tobytes(), t
        assert fast.returns.tobytes() == ref.returns.tobytes() and fast.rms.count == ref.rms.count
        assert np.asarray(fast.rms.mean).tobytes() == np.asarray(ref.rms.mean).tobytes()
        assert np.asarray(fast.rms.var).tobytes() == np.asarray(ref.rms.var).tobytes()
    assert clipped == {-2.0, 2.0}  # both clip bounds were exercised
    nan_step = (np.array([np.nan]), np.array([False]), np.array([True]))
    assert np.isnan(fast(*nan_step)[0]) and np.isnan(ref._scale(*nan_step)[0])
