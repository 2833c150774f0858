"""FlatAdam / clip_grad_norm match torch.optim.Adam / clip_grad_norm_; flat parameters keep gradients intact."""
from __future__ import annotations

import math

import pytest
import torch

from proxrl.control.adam import FlatAdam, clip_coefficient, clip_grad_norm, grad_norm
from proxrl.control.flat_params import flatten_parameters
from proxrl.control.policy import ActorCritic

torch.set_num_threads(1)


def _adam_run(lr_at, steps=200):
    """FlatAdam and torch.optim.Adam from the same start on the same gradients, with lr_at(i) set before step i."""
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(300))
    p = torch.nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.Adam([p_ref], lr=lr_at(0), eps=1e-5)
    ours = FlatAdam(p, lr=lr_at(0), eps=1e-5)
    for i in range(steps):
        g = torch.randn(300) * (1 + i % 7)
        p_ref.grad, p.grad = g.clone(), g.clone()
        ours.lr = lr_at(i)  # what the trainer does for the learning-rate schedule
        for group in ref.param_groups:
            group["lr"] = lr_at(i)
        ref.step()
        ours.step()
    return p.detach(), p_ref.detach(), ours


def test_flat_adam_matches_torch_adam_under_a_changing_learning_rate():
    decaying = lambda i: 3e-3 * (1 - i / 200)  # noqa: E731
    p, p_ref, ours = _adam_run(decaying)
    assert torch.allclose(p, p_ref, atol=1e-5, rtol=1e-5)
    assert ours.step_count == 200
    # the schedule is really followed: with a constant rate both sides end elsewhere
    p_const, _, _ = _adam_run(lambda i: 3e-3)
    assert (p_const - p).abs().max() > 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_clipped_adam_step_matches_torch_clip_then_adam(fused):
    """step(clip_coefficient(norm, c)) == torch's clip_grad_norm_ then Adam, on both code paths (the fused kernel
    and the plain tensor ops), with clipping on some steps and not on others."""
    torch.manual_seed(2)
    p_ref = torch.nn.Parameter(torch.randn(500))
    p = torch.nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.Adam([p_ref], lr=1e-2, eps=1e-5)
    ours = FlatAdam(p, lr=1e-2, eps=1e-5)
    if not fused:
        ours.fused = False
    elif not ours.fused:
        pytest.skip("this torch build has no fused Adam kernel for CPU float32")
    clipped = 0
    for i in range(60):
        g = torch.randn(500) * (0.001 if i % 3 == 0 else 1.0)  # norm ~0.02 (not clipped) or ~22 (clipped)
        p_ref.grad, p.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_([p_ref], 0.8)
        coef = clip_coefficient(grad_norm(p.grad), 0.8)
        clipped += coef < 1.0
        ours.step(coef)
        ref.step()
        assert torch.allclose(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7)  # the gradient is left clipped, as torch's
    assert clipped == 40
    assert torch.allclose(p, p_ref, atol=1e-5, rtol=1e-5)


def test_clip_coefficient():
    assert clip_coefficient(2.0, 0.5) == pytest.approx(0.5 / (2.0 + 1e-6))
    assert clip_coefficient(0.4, 0.5) == 1.0
    assert clip_coefficient(2.0, None) == 1.0
    assert clip_coefficient(float("nan"), 0.5) == 1.0 and clip_coefficient(float("inf"), 0.5) == 1.0


def test_clip_grad_norm_matches_torch():
    g = torch.randn(1000) * 3
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_([p], 0.5)
    ours = g.clone()
    norm = clip_grad_norm(ours, 0.5)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6) and torch.allclose(ours, p.grad)
    assert grad_norm(g) == pytest.approx(norm, rel=1e-12)
    small = torch.full((4,), 0.01)
    assert clip_grad_norm(small, 0.5) == pytest.approx(0.02)
    assert torch.equal(small, torch.full((4,), 0.01))
    # a non-finite norm is reported and leaves the gradient as it is (the trainer names the bad entry)
    bad = torch.tensor([1.0, float("inf"), 2.0])
    assert math.isinf(clip_grad_norm(bad, 0.5)) and bad.tolist() == [1.0, float("inf"), 2.0]


def test_flat_parameters_share_values_and_gradients():
    torch.manual_seed(1)
    a = ActorCritic(3, 2, True)
    b = ActorCritic(3, 2, True)
    b.load_state_dict(a.state_dict())
    flat = flatten_parameters(b)
    x = torch.randn(16, 3)
    for model in (a, b):
        lp, ent, v = model.evaluate(x, torch.zeros(16, dtype=torch.long))
        (lp.sum() + v.square().sum()).backward()
    assert torch.equal(flat.detach(), torch.cat([p.detach().reshape(-1) for p in a.parameters()]))
    assert torch.allclose(flat.grad, torch.cat([p.grad.reshape(-1) for p in a.parameters()]))
    with torch.no_grad():
        flat.add_(1.0)  # writes through to the module's parameters
    assert torch.allclose(b.critic[0].bias, a.critic[0].bias + 1.0)
