"""AdamATan2 must follow the adam-atan2 0.0.3 update exactly (checked against float64 by hand)."""
import math

import pytest
import torch

from utils.adam_atan2 import AdamATan2, make_adam_atan2


def reference_adam_atan2(p0, grads, lr, betas, wd):
    """The 0.0.3 formula in float64, one step per grad."""
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = m + (1 - b1) * (g - m)
        v = v + (1 - b2) * (g * g - v)
        p = p - (lr / (1 - b1 ** t)) * torch.atan2(m, v.sqrt() / math.sqrt(1 - b2 ** t))
    return p


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_float64_formula_over_steps(wd):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (2, 3, 4)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(s, generator=g) * (0.1 + k) for k in range(6)] for s in shapes]
    grads[1][2] = torch.zeros(13)  # a zero gradient mid-run (m != 0, v != 0)
    lr, betas = 3e-3, (0.9, 0.95)
    opt = AdamATan2(params, lr=lr, betas=betas, weight_decay=wd)
    for step in range(6):
        for p, gs in zip(params, grads):
            p.grad = gs[step].clone()
        opt.step()
    for p, p0, gs in zip(params, start, grads):
        ref = reference_adam_atan2(p0, gs, lr, betas, wd)
        assert torch.allclose(p.detach().double(), ref, atol=1e-6, rtol=1e-6)
    # Step 1: m = (1-b1) g and sqrt(v)/sqrt(1-b2) = |g|, so the move is lr/(1-b1) * atan(1-b1) * sign(g)
    # = 0.997 lr: the bias correction sits outside the atan2 (the 0.0.3 behaviour, not 0.0.2's pi/4 lr).
    q = torch.nn.Parameter(torch.zeros(4))
    q.grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    AdamATan2([q], lr=0.1).step()
    assert torch.allclose(q.detach(), torch.tensor([-1.0, 1.0, -1.0, 0.0]) * 0.1 * math.atan(0.1) / 0.1, atol=1e-7)


def test_zero_lr_and_params_without_grad_untouched():
    p = torch.nn.Parameter(torch.ones(3))
    skip = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = AdamATan2([p, skip], lr=0.0, weight_decay=1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and torch.equal(skip.detach(), torch.ones(3))
    assert skip not in opt.state
    # lr is read each step (the trainer schedules it in place)
    opt.param_groups[0]["lr"] = 0.1
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(3))


def test_state_dict_roundtrip_continues_identically():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    grads = [torch.randn(5, generator=g) for _ in range(4)]
    oa = AdamATan2([a], lr=1e-2, weight_decay=0.1)
    ob = AdamATan2([b], lr=1e-2, weight_decay=0.1)
    for gr in grads[:2]:
        a.grad, b.grad = gr.clone(), gr.clone()
        oa.step(); ob.step()
    ob2 = AdamATan2([b], lr=1e-2, weight_decay=0.1)
    ob2.load_state_dict(ob.state_dict())
    for gr in grads[2:]:
        a.grad, b.grad = gr.clone(), gr.clone()
        oa.step(); ob2.step()
    assert torch.equal(a.detach(), b.detach())


def test_factory_picks_torch_backend_on_cpu(caplog):
    p = torch.nn.Parameter(torch.ones(2))
    with caplog.at_level("INFO"):
        opt = make_adam_atan2([p], backend="auto", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    assert isinstance(opt, AdamATan2)
    assert "AdamATan2 backend: torch" in caplog.text
    assert isinstance(make_adam_atan2([p], backend="torch", lr=1e-3), AdamATan2)
    with pytest.raises(ValueError):
        make_adam_atan2([p], backend="fast")
