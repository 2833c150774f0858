"""Tests for proxrl.core.advantages: GAE, masked statistics, GRPO / RLOO advantages."""
import math

import pytest
import torch

from proxrl.core import gae, group_advantages, masked_mean, masked_var, normalize, rloo_advantages

torch.set_num_threads(1)


def reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Slow scalar reference: one env (a python list per argument), straight from the GAE equations (docs/theory.md, Section 4)."""
    T = len(rewards)
    adv = [0.0] * T
    next_adv = 0.0
    for t in reversed(range(T)):
        not_term = 0.0 if terminated[t] else 1.0
        not_done = 0.0 if (terminated[t] or truncated[t]) else 1.0
        delta = rewards[t] + gamma * not_term * next_values[t] - values[t]
        next_adv = delta + gamma * lam * not_done * next_adv
        adv[t] = next_adv
    return adv, [a + v for a, v in zip(adv, values)]


def _t(xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


# ---------------------------------------------------------------- GAE: hand-computed cases


def test_gae_hand_no_dones():
    # gamma = 0.9, lam = 0.5 -> gamma * lam = 0.45
    # delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4
    # delta_1 = 2 + 0.9 * 1.5 - 1.0 = 2.35
    # delta_2 = 3 + 0.9 * 2.0 - 1.5 = 3.3
    # A_2 = 3.3 ; A_1 = 2.35 + 0.45 * 3.3 = 3.835 ; A_0 = 1.4 + 0.45 * 3.835 = 3.12575
    # returns = A + V = [3.62575, 4.835, 4.8]
    z = _t([0, 0, 0])
    adv, ret = gae(_t([1, 2, 3]), _t([0.5, 1.0, 1.5]), _t([1.0, 1.5, 2.0]), z, z, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, _t([3.12575, 3.835, 3.3]))
    torch.testing.assert_close(ret, _t([3.62575, 4.835, 4.8]))


# Episode layout used below (gamma = 0.5, lam = 1):
#   t:            0    1        2         3
#   truncated:    0    1        0         0      (time limit after t=1, next_values[1] = V(final obs) = 4)
#   terminated:   0    0        1         0      (true terminal after t=2, next_values[2] = 8 must be ignored)
# delta_0 = 1 + 0.5*2 - 2 = 0 ; delta_1 = 1 + 0.5*4 - 2 = 1 (bootstraps) ; delta_2 = 1 + 0 - 2 = -1 ;
# delta_3 = 1 + 0.5*2 - 2 = 0
# A_3 = 0 ; A_2 = -1 (cut: terminated) ; A_1 = 1 (cut: truncated, A_2 not added) ; A_0 = 0 + 0.5 * 1 = 0.5
# returns = A + 2 = [2.5, 3, 1, 2]
TRUNC_CASE = dict(
    rewards=[1.0, 1.0, 1.0, 1.0],
    values=[2.0, 2.0, 2.0, 2.0],
    next_values=[2.0, 4.0, 8.0, 2.0],
    terminated=[False, False, True, False],
    truncated=[False, True, False, False],
)


def _trunc_case(**override):
    case = {**TRUNC_CASE, **override}
    return (
        _t(case["rewards"]),
        _t(case["values"]),
        _t(case["next_values"]),
        torch.tensor(case["terminated"]),
        torch.tensor(case["truncated"]),
    )


def test_gae_hand_truncated_and_terminated():
    adv, ret = gae(*_trunc_case(), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, _t([0.5, 1.0, -1.0, 0.0]))
    torch.testing.assert_close(ret, _t([2.5, 3.0, 1.0, 2.0]))


def test_gae_truncation_bootstraps_termination_does_not():
    base, _ = gae(*_trunc_case(), gamma=0.5, lam=1.0)
    # terminated step: its next value is never used
    adv, _ = gae(*_trunc_case(next_values=[2.0, 4.0, -100.0, 2.0]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, base)
    # truncated step: its next value IS used (delta_1 = 1 + 0.5 * 10 - 2 = 4, A_0 = 0 + 0.5 * 4 = 2)
    adv, _ = gae(*_trunc_case(next_values=[2.0, 10.0, 8.0, 2.0]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, _t([2.0, 4.0, -1.0, 0.0]))


def test_gae_recursion_cut_at_truncation_and_termination():
    base, _ = gae(*_trunc_case(), gamma=0.5, lam=1.0)
    # a reward after the truncation must not leak into steps 0-1
    adv, _ = gae(*_trunc_case(rewards=[1.0, 1.0, 50.0, 1.0]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv[:2], base[:2])
    assert adv[2] != base[2]
    # a reward after the termination must not leak into step 2
    adv, _ = gae(*_trunc_case(rewards=[1.0, 1.0, 1.0, 50.0]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv[:3], base[:3])
    # treating the truncation as a termination (a common bug) changes the result
    wrong, _ = gae(*_trunc_case(terminated=[False, True, True, False]), gamma=0.5, lam=1.0)
    assert not torch.allclose(wrong, base)


def test_gae_batched_matches_columns_and_float_flags():
    r, v, nv, term, trunc = _trunc_case()
    # column 0 = the truncation case, column 1 = the no-dones case reversed in time
    r2 = torch.stack([r, _t([3, 2, 1, 0])], dim=1)
    v2 = torch.stack([v, _t([1, 1, 1, 1])], dim=1)
    nv2 = torch.stack([nv, _t([1, 1, 1, 1])], dim=1)
    term2 = torch.stack([term, torch.zeros(4, dtype=torch.bool)], dim=1).double()  # float flags work too
    trunc2 = torch.stack([trunc, torch.zeros(4, dtype=torch.bool)], dim=1).double()
    adv, ret = gae(r2, v2, nv2, term2, trunc2, gamma=0.5, lam=1.0)
    assert adv.shape == (4, 2)
    torch.testing.assert_close(adv[:, 0], _t([0.5, 1.0, -1.0, 0.0]))
    ref_adv, ref_ret = reference_gae([3, 2, 1, 0], [1] * 4, [1] * 4, [0] * 4, [0] * 4, 0.5, 1.0)
    torch.testing.assert_close(adv[:, 1], _t(ref_adv))
    torch.testing.assert_close(ret[:, 1], _t(ref_ret))


@pytest.mark.parametrize("shape", [(7,), (50, 3), (33, 2, 4)])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_reference_on_random_inputs(shape, gamma, lam):
    g = torch.Generator().manual_seed(hash((shape, gamma, lam)) % 2**31)
    rewards = torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    next_values = torch.randn(shape, generator=g, dtype=torch.float64)
    terminated = torch.rand(shape, generator=g) < 0.15
    truncated = (torch.rand(shape, generator=g) < 0.15) & ~terminated
    adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma, lam)
    T = shape[0]
    flat = [x.reshape(T, -1) for x in (rewards, values, next_values, terminated, truncated)]
    for j in range(flat[0].shape[1]):
        cols = [x[:, j].tolist() for x in flat]
        ref_adv, ref_ret = reference_gae(*cols, gamma, lam)
        torch.testing.assert_close(adv.reshape(T, -1)[:, j], _t(ref_adv))
        torch.testing.assert_close(ret.reshape(T, -1)[:, j], _t(ref_ret))


def test_gae_no_grad_and_float32():
    v = torch.randn(5, 2, requires_grad=True)
    z = torch.zeros(5, 2)
    adv, ret = gae(torch.randn(5, 2), v, torch.randn(5, 2), z, z, 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad
    assert adv.dtype == torch.float32
    # T = 1: A = delta = r + gamma * (1 - terminated) * V' - V -> [1 + 0.5*4 - 1, 1 + 0 - 1] = [2, 0]
    adv, _ = gae(_t([[1, 1]]), _t([[1, 1]]), _t([[4, 4]]), _t([[0, 1]]), _t([[0, 0]]), 0.5, 0.9)
    torch.testing.assert_close(adv, _t([[2, 0]]))


def test_gae_shape_mismatch_names_shapes():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=r"next_values\(4,\)"):
        gae(z, z, torch.zeros(4), z, z, 0.99, 0.95)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_masked_nan():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    m = torch.tensor([[1, 1], [1, 0]])
    # (1 + 2 + 3) / 3 = 2 ; per row: [1.5, 3]
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, m.bool(), dim=1), torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(masked_mean(torch.tensor([1.0, 3.0])), torch.tensor(2.0))


def test_masked_mean_broadcast_mask_and_bad_mask():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    # (B, 1) mask keeps whole rows: row 1 only -> (3 + 5) / 2 = 4
    assert masked_mean(x, torch.tensor([[0.0], [1.0]])).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r"mask\(2,\)"):
        masked_mean(x, torch.tensor([1.0, 1.0]))  # (T,) against (B, T): refused, not silently broadcast


def test_masked_var():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # valid [1, 2, 3]: mean 2, squared deviations 1 + 0 + 1 = 2 -> biased 2/3, unbiased 2/2 = 1
    assert masked_var(x, m).item() == pytest.approx(1.0)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    assert masked_var(x).item() == pytest.approx(x.var().item())


def test_normalize_with_mask():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([True, True, True, False])
    # valid mean 2, unbiased std 1 -> [-1, 0, 1]; masked entry -> 0
    torch.testing.assert_close(normalize(x, m), torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(normalize(x, m, shift_mean=False), torch.tensor([1.0, 2.0, 3.0, 0.0]))
    torch.testing.assert_close(normalize(x), (x - x.mean()) / (x.std() + 1e-8))
    y = normalize(torch.randn(64, 8), torch.ones(64, 1))
    assert y.mean().abs() < 1e-5 and (y.std() - 1).abs() < 1e-4
    assert normalize(torch.tensor([5.0])).item() == 0.0  # single entry: std taken as 0, no NaN


# ---------------------------------------------------------------- GRPO / RLOO


def test_group_advantages_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    # group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> [-1, 0, 1]; group 2 all equal -> 0
    torch.testing.assert_close(
        group_advantages(scores, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-6)
    )
    torch.testing.assert_close(
        group_advantages(scores, 3, normalize_std=False), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    )
    # [0, 1]: mean 0.5, std sqrt(0.5) -> -/+ 0.5 / 0.70711 = -/+ 0.70711
    torch.testing.assert_close(
        group_advantages(torch.tensor([0.0, 1.0]), 2, eps=0.0), torch.tensor([-math.sqrt(0.5), math.sqrt(0.5)])
    )


def test_rloo_advantages_hand():
    # [1, 2, 3]: 1 - (2 + 3)/2 = -1.5 ; 2 - (1 + 3)/2 = 0 ; 3 - (1 + 2)/2 = 1.5
    # [4, 0, 0, 0]: 4 - 0 = 4 ; 0 - 4/3 = -1.3333
    scores = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5]))
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([4.0, 0.0, 0.0, 0.0]), 4), torch.tensor([4.0, -4 / 3, -4 / 3, -4 / 3])
    )
    x = torch.randn(12)
    g = x.reshape(-1, 4)
    torch.testing.assert_close(rloo_advantages(x, 4), (4 / 3 * (g - g.mean(1, keepdim=True))).reshape(-1))


def test_group_errors():
    with pytest.raises(ValueError, match=r"scores\(5,\)"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"scores\(2, 2\)"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(4), 1)
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 4.0]), 1), torch.zeros(2))


def test_python_random_reference_sanity():
    # the reference itself, on a hand case (guards against a wrong reference making the random test vacuous)
    adv, _ = reference_gae(**TRUNC_CASE, gamma=0.5, lam=1.0)
    assert adv == [0.5, 1.0, -1.0, 0.0]
