"""Tests for proxrl.core.losses: clipped surrogate, value loss, entropy, explained variance."""
import math

import pytest
import torch

from proxrl.core import entropy_from_logits, explained_variance, policy_loss, value_loss

torch.set_num_threads(1)

# ratios r = exp(logprobs - old_logprobs) and advantages, clip eps = 0.2:
#   r=1.5, A=+1: min(1.5, 1.2) = 1.2    clipped   -> zero gradient
#   r=0.5, A=+1: min(0.5, 0.8) = 0.5    unclipped -> d/dlogp = A * r = 0.5
#   r=1.5, A=-1: min(-1.5, -1.2) = -1.5 unclipped -> d/dlogp = -1.5
#   r=0.5, A=-1: min(-0.5, -0.8) = -0.8 clipped   -> zero gradient
#   r=1.1, A=+2: min(2.2, 2.2) = 2.2    inside    -> d/dlogp = 2.2
# L^CLIP = (1.2 + 0.5 - 1.5 - 0.8 + 2.2) / 5 = 0.32 -> loss = -0.32
# d loss / d logprobs = -(1/5) * [0, 0.5, -1.5, 0, 2.2] = [0, -0.1, 0.3, 0, -0.44]
# clipfrac = 4/5 (|r - 1| > 0.2 for all but r = 1.1); ratio_mean = 5.1 / 5 = 1.02
# approx_kl = mean((r - 1) - log r) = (2*0.0945349 + 2*0.1931472 + 0.0046898) / 5 = 0.1160108
RATIOS = [1.5, 0.5, 1.5, 0.5, 1.1]
ADVS = [1.0, 1.0, -1.0, -1.0, 2.0]


def _hand_inputs():
    logprobs = torch.tensor([math.log(r) for r in RATIOS], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(5, dtype=torch.float64)
    return logprobs, old, torch.tensor(ADVS, dtype=torch.float64)


def test_policy_loss_hand_case_and_gradients():
    logprobs, old, adv = _hand_inputs()
    loss, info = policy_loss(logprobs, old, adv, clip_coef=0.2)
    assert loss.item() == pytest.approx(-0.32)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([0.0, -0.1, 0.3, 0.0, -0.44], dtype=torch.float64))
    # zero exactly where clipped (ratio beyond 1+eps with A>0, below 1-eps with A<0)
    assert logprobs.grad[0] == 0.0 and logprobs.grad[3] == 0.0
    assert info["clipfrac"].item() == pytest.approx(0.8)
    assert info["ratio_mean"].item() == pytest.approx(1.02)
    assert info["approx_kl"].item() == pytest.approx(0.1160108, abs=1e-6)
    for v in info.values():
        assert v.dim() == 0 and not v.requires_grad


def test_policy_loss_mask():
    logprobs, old, adv = _hand_inputs()
    mask = torch.tensor([1, 1, 1, 1, 0])
    # (1.2 + 0.5 - 1.5 - 0.8) / 4 = -0.15 -> loss 0.15 ; all 4 valid entries clipped-range -> clipfrac 1
    loss, info = policy_loss(logprobs, old, adv, 0.2, mask=mask)
    assert loss.item() == pytest.approx(0.15)
    assert info["clipfrac"].item() == pytest.approx(1.0)
    loss.backward()
    assert logprobs.grad[4] == 0.0


def test_policy_loss_equals_vanilla_pg_at_ratio_one():
    # at theta = theta_old, grad of L^CLIP = grad of E[log pi * A] (the policy gradient theorem's estimator)
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 0, 1, 2])
    adv = torch.randn(6, dtype=torch.float64)
    logp = torch.log_softmax(logits, -1)[torch.arange(6), actions]
    loss, info = policy_loss(logp, logp.detach(), adv, 0.2)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(-(logp * adv).mean(), logits)
    torch.testing.assert_close(g1, g2)
    assert info["approx_kl"].item() == 0.0 and info["clipfrac"].item() == 0.0


def test_policy_loss_sequence_advantages_broadcast_and_shape_errors():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0], [-1.0]])  # (B, 1) against (B, T): fine
    loss, _ = policy_loss(logp, logp, adv, 0.2)
    assert loss.item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        policy_loss(logp, logp, torch.ones(2), 0.2)  # (B,) against (B, T): ambiguous, refused
    with pytest.raises(ValueError, match=r"old_logprobs\(3,\)"):
        policy_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), 0.2)


# value loss, clip c = 0.2:
#   V=1.0, V_old=0.5, R=2: unclipped (1-2)^2 = 1 ; V_clip = 0.5+0.2 = 0.7, (0.7-2)^2 = 1.69 -> 1.69 (clipped term)
#   V=2.0, V_old=2.5, R=1: unclipped 1 ; V_clip = 2.5-0.2 = 2.3, (2.3-1)^2 = 1.69 -> 1.69 (clipped term)
#   V=0.0, V_old=0.0, R=1: both 1 -> 1
#   V=1.0, V_old=0.0, R=0.5: unclipped 0.25 ; V_clip = 0.2, (0.2-0.5)^2 = 0.09 -> 0.25 (unclipped term)
# clipped loss = 0.5 * (1.69 + 1.69 + 1 + 0.25) / 4 = 0.57875 ; unclipped = 0.5 * 3.25 / 4 = 0.40625
def test_value_loss_clipped_vs_unclipped_hand():
    values = torch.tensor([1.0, 2.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.5, 2.5, 0.0, 0.0], dtype=torch.float64)
    ret = torch.tensor([2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    assert value_loss(values, old, ret).item() == pytest.approx(0.40625)
    loss = value_loss(values, old, ret, clip_coef=0.2)
    assert loss.item() == pytest.approx(0.57875)
    loss.backward()
    # clipped entries get no gradient; entry 3: 0.5 * 2 * (1 - 0.5) / 4 = 0.125
    assert values.grad[0] == 0.0 and values.grad[1] == 0.0
    assert values.grad[3].item() == pytest.approx(0.125)
    # mask out entries 0 and 1 -> 0.5 * (1 + 0.25) / 2 = 0.3125
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert value_loss(values, old, ret, 0.2, mask=mask).item() == pytest.approx(0.3125)
    with pytest.raises(ValueError, match=r"returns\(3,\)"):
        value_loss(values, old, ret[:3])


def test_entropy_from_logits():
    # uniform over 4 actions: log 4 ; a distribution with masked (-inf) actions: only the live ones count
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))
    logits = torch.tensor([0.0, 0.0, float("-inf")], requires_grad=True)
    h = entropy_from_logits(logits)
    assert h.item() == pytest.approx(math.log(2))
    h.backward()
    assert torch.isfinite(logits.grad).all()
    x = torch.randn(3, 5, 7)
    torch.testing.assert_close(entropy_from_logits(x), torch.distributions.Categorical(logits=x).entropy())


def test_explained_variance():
    # R = [1, 2, 3, 4], V = [1, 2, 3, 3]: R - V = [0, 0, 0, 1], Var = 0.25 - 0.0625 = 0.1875 ;
    # Var[R] = 1.25 -> 1 - 0.1875 / 1.25 = 0.85
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(torch.tensor([1.0, 2.0, 3.0, 3.0]), r) == pytest.approx(0.85)
    assert explained_variance(r, r) == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), r) == pytest.approx(0.0)
    assert math.isnan(explained_variance(r, torch.ones(4)))
    # mask drops a wildly wrong prediction
    v = torch.tensor([1.0, 2.0, 3.0, 3.0, 1000.0])
    r5 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    assert explained_variance(v, r5, mask=torch.tensor([1, 1, 1, 1, 0])) == pytest.approx(0.85)
    assert isinstance(explained_variance(v, r5), float)


def test_kl_early_stop_threshold_without_factor():
    from proxrl.core.losses import kl_early_stop

    assert kl_early_stop(0.011, 0.01) is True
    assert kl_early_stop(0.010, 0.01) is False  # strictly above the threshold
    assert kl_early_stop(0.014, 0.01) is True  # SB3's 1.5x rule would not stop here
    assert kl_early_stop(1e9, None) is False
    with pytest.raises(ValueError, match="target_kl"):
        kl_early_stop(0.1, 0.0)
