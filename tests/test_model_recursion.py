"""The shared recursion core (models/recursion.py): schedule, gradient paths of HRM and TRM, the step hook."""
import torch

from models.recursion import ReasoningModule, Step, hrm_recursion, trm_recursion

D = 5


def _nets(seed=0):
    g = torch.Generator().manual_seed(seed)
    W_L = (torch.randn(D, D, generator=g) / D ** 0.5).requires_grad_()
    W_H = (torch.randn(D, D, generator=g) / D ** 0.5).requires_grad_()
    L_step = lambda z_L, z_H, x: torch.tanh((z_L + (z_H + x)) @ W_L)  # noqa: E731
    H_step = lambda z_H, z_L: torch.tanh((z_H + z_L) @ W_H)  # noqa: E731
    return W_L, W_H, L_step, H_step


def _states(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, D, generator=g) for _ in range(3)]  # z_H, z_L, x


def _unrolled(z_H, z_L, x, L_step, H_step, H_cycles, L_cycles, keep):
    """The schedule written out; `keep(h, l)` says whether an update stays in the graph (else detached)."""
    for h in range(H_cycles):
        for l in range(L_cycles):
            z_L = L_step(z_L, z_H, x)
            z_L = z_L if keep(h, l) else z_L.detach()
        z_H = H_step(z_H, z_L)
        z_H = z_H if keep(h, None) else z_H.detach()
    return z_H, z_L


def _grad(out, params):
    return torch.autograd.grad(out.square().sum(), params)


def test_hook_sees_every_update_in_schedule_order_and_can_replace_the_state():
    _, _, L_step, H_step = _nets()
    z_H, z_L, x = _states()
    for fn, diff in ((hrm_recursion, {("L", 2, 2), ("H", 2, None)}),
                     (trm_recursion, {("L", 2, 0), ("L", 2, 1), ("L", 2, 2), ("H", 2, None)})):
        seen = []

        def hook(step: Step, state):
            seen.append(step)
            assert state.requires_grad == step.differentiated
            return state

        fn(z_H, z_L, x, L_step, H_step, 3, 3, hook=hook)
        expected = []
        for h in range(3):
            expected += [("L", h, l) for l in range(3)] + [("H", h, None)]
        assert [s[:3] for s in seen] == expected
        assert {s[:3] for s in seen if s.differentiated} == diff
    # A hook's return value replaces the state: zeroing z_H after the last H update zeroes the output.
    out, _ = trm_recursion(z_H, z_L, x, L_step, H_step, 2, 2,
                           hook=lambda s, v: torch.zeros_like(v) if s.level == "H" and s.h == 1 else v)
    assert torch.all(out == 0)


def test_hrm_is_one_step_gradient_and_trm_is_last_cycle_gradient():
    W_L, W_H, L_step, H_step = _nets()
    z_H, z_L, x = _states()
    x = x.requires_grad_()
    params = (W_L, W_H, x)
    H, L = 3, 4
    hrm = _grad(hrm_recursion(z_H, z_L, x, L_step, H_step, H, L)[0], params)
    trm = _grad(trm_recursion(z_H, z_L, x, L_step, H_step, H, L)[0], params)
    ref_hrm = _grad(_unrolled(z_H, z_L, x, L_step, H_step, H, L,
                              keep=lambda h, l: h == H - 1 and l in (L - 1, None))[0], params)
    ref_trm = _grad(_unrolled(z_H, z_L, x, L_step, H_step, H, L, keep=lambda h, l: h == H - 1)[0], params)
    for a, b in zip(hrm, ref_hrm):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(trm, ref_trm):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(hrm[0], trm[0], atol=1e-4)  # the two rules are told apart
    # Forward values do not depend on the gradient rule.
    torch.testing.assert_close(hrm_recursion(z_H, z_L, x, L_step, H_step, H, L)[0],
                               trm_recursion(z_H, z_L, x, L_step, H_step, H, L)[0], rtol=0, atol=0)


def test_outer_no_grad_differentiates_nothing():
    W_L, W_H, L_step, H_step = _nets()
    z_H, z_L, x = _states()
    with torch.no_grad():
        for fn in (hrm_recursion, trm_recursion):
            out_H, out_L = fn(z_H, z_L, x, L_step, H_step, 2, 2)
            assert not out_H.requires_grad and not out_L.requires_grad


def test_reasoning_module_adds_injection_then_runs_blocks_with_kwargs():
    calls = []

    class Block(torch.nn.Module):
        def forward(self, h, scale=1.0):
            calls.append(scale)
            return h * scale

    mod = ReasoningModule([Block(), Block()])
    out = mod(torch.ones(2), torch.full((2,), 2.0), scale=3.0)
    assert torch.equal(out, torch.full((2,), 27.0)) and calls == [3.0, 3.0]
    assert list(dict(mod.named_modules())) == ["", "layers", "layers.0", "layers.1"]
