"""FlatAdam / clip_grad_norm match torch.optim.Adam / clip_grad_norm_; flat parameters keep gradients intact."""
from __future__ import annotations

import torch

from proxrl.control.adam import FlatAdam, clip_grad_norm
from proxrl.control.flat_params import flatten_parameters
from proxrl.control.policy import ActorCritic

torch.set_num_threads(1)


def test_flat_adam_matches_torch_adam():
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(300))
    p = torch.nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.Adam([p_ref], lr=3e-3, eps=1e-5)
    ours = FlatAdam(p, lr=3e-3, eps=1e-5)
    for i in range(200):
        g = torch.randn(300) * (1 + i % 7)
        p_ref.grad, p.grad = g.clone(), g.clone()
        ref.lr = ours.lr = 3e-3 * (1 - i / 200)
        for group in ref.param_groups:
            group["lr"] = ours.lr
        ref.step()
        ours.step()
    assert torch.allclose(p, p_ref, atol=1e-5, rtol=1e-5)
    assert ours.step_count == 200


def test_clip_grad_norm_matches_torch():
    g = torch.randn(1000) * 3
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_([p], 0.5)
    ours = g.clone()
    norm = clip_grad_norm(ours, 0.5)
    assert torch.allclose(norm, ref_norm) and torch.allclose(ours, p.grad)
    small = torch.full((4,), 0.01)
    clip_grad_norm(small, 0.5)
    assert torch.equal(small, torch.full((4,), 0.01))


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
