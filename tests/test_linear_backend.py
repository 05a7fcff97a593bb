"""linear_backend (models/layers.py): oneDNN's GEMM equals F.linear within fp32 rounding, forward and both
gradients, eager and compiled (no graph break, no recompile train -> eval -> train); whole HRM/TRM steps on
it stay within the compile tolerance of the torch path; auto's rule; bad settings fail in one line."""
import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from models import layers
from models.layers import CastedLinear, onednn_available, onednn_linear, resolve_linear_backend
from test_compile import B, LOSS_RTOL, close, eval_logits, make_batch, make_head, train_steps
from trainer_helpers import compose
from utils.config import preflight_overrides
from utils.modeling import compile_blocks, set_linear_backend
from utils.schema import ConfigError

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
# oneDNN and MKL sum the K products in another order: fp32 results differ by a few ulp of the sum's scale.
GEMM_RTOL = 1e-5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@needs_onednn
@pytest.mark.parametrize("shape, k, n", [((7, 5, 64), 64, 512), ((2624, 128), 128, 384), ((3, 1, 9), 9, 2)])
def test_onednn_linear_equals_f_linear_forward_and_both_gradients(shape, k, n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape[:-1], k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g).mul_(k ** -0.5).requires_grad_()
    grad_out = torch.randn(*shape[:-1], n, generator=g)
    y = onednn_linear(x, w)
    y_ref = F.linear(x, w)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert _rel_err(y, y_ref) <= GEMM_RTOL
    gx, gw = torch.autograd.grad(y, (x, w), grad_out)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), grad_out)
    assert _rel_err(gx, gx_ref) <= GEMM_RTOL
    assert _rel_err(gw, gw_ref) <= GEMM_RTOL
    # under no_grad the op runs alone (nothing saved) and gives the same values
    with torch.no_grad():
        assert torch.equal(onednn_linear(x, w), y.detach())


@needs_onednn
def test_casted_linear_falls_back_where_onednn_does_not_apply():
    lin = CastedLinear(16, 8, bias=False, generator=torch.Generator().manual_seed(0))
    lin.backend = "onednn"
    x = torch.randn(4, 16)
    calls = []
    saved = layers.onednn_linear
    layers.onednn_linear = lambda *a: calls.append(1) or saved(*a)
    try:
        lin(x)
        assert calls == [1]  # fp32 CPU, no bias: oneDNN
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lin(x).dtype == torch.bfloat16  # autocast keeps its bf16 matmul
        assert lin(x.double()).dtype == torch.float64  # another dtype: F.linear
        biased = CastedLinear(16, 8, bias=True, generator=torch.Generator().manual_seed(0))
        biased.backend = "onednn"
        biased(x)
        assert calls == [1]
    finally:
        layers.onednn_linear = saved


@needs_onednn
@pytest.mark.parametrize("arch", ["hrm", "trm"])
def test_steps_on_onednn_match_torch_and_compile_once(arch):
    """3 optimizer steps: losses, gradients and eval logits within the compile tolerance (tests/test_compile.py)
    of the torch path, eager and compiled; compiled, a train -> eval -> train cycle compiles nothing new."""
    torch._dynamo.reset()
    counters.clear()
    ref = make_head(arch)
    heads = {"eager": copy.deepcopy(ref), "compiled": copy.deepcopy(ref)}
    for h in heads.values():
        assert set_linear_backend(h, "onednn", "cpu") == ("onednn", "linear_backend=onednn")
    assert compile_blocks(heads["compiled"]) == 2
    c_r, losses_r, grads_r = train_steps(ref, ref.initial_carry(make_batch(B, 0)), 3)
    for name, h in heads.items():
        c_h, losses_h, grads_h = train_steps(h, h.initial_carry(make_batch(B, 0)), 3)
        for lr_, lh in zip(losses_r, losses_h):
            assert abs(lr_.item() - lh.item()) <= LOSS_RTOL * abs(lr_.item()), name
        assert grads_h.keys() == grads_r.keys()
        for k in grads_r:
            assert close(grads_h[k], grads_r[k]), (name, k)
        assert close(eval_logits(h, 5), eval_logits(ref, 5)), name
    assert not counters["graph_break"]  # the custom op is one opaque kernel to inductor
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        c_c, _, _ = train_steps(heads["compiled"], c_h, 1)
        eval_logits(heads["compiled"], 3)
        train_steps(heads["compiled"], c_c, 1)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]


def test_auto_rule(monkeypatch, tmp_path, fake_cpuinfo):
    amd, intel = fake_cpuinfo("AuthenticAMD", "avx512f"), fake_cpuinfo("GenuineIntel", "avx512f")
    monkeypatch.setattr(layers, "onednn_available", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_linear_backend("auto", "cpu", cpuinfo=amd)[0] == "onednn"
    # MKL measured faster on an Intel Xeon, and an unknown vendor (no /proc) keeps the default too
    backend, why = resolve_linear_backend("auto", "cpu", cpuinfo=intel)
    assert backend == "torch" and "GenuineIntel" in why
    assert resolve_linear_backend("auto", "cpu", cpuinfo=str(tmp_path / "missing"))[0] == "torch"
    assert resolve_linear_backend("auto", "cuda") == ("torch", "linear_backend=auto: torch on cuda")
    assert resolve_linear_backend("torch", "cpu") == ("torch", "linear_backend=torch")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    backend, why = resolve_linear_backend("auto", "cpu", cpuinfo=amd)
    assert backend == "torch" and "AVX2" in why
    monkeypatch.setattr(layers, "onednn_available", lambda: False)
    assert resolve_linear_backend("auto", "cpu", cpuinfo=amd)[0] == "torch"
    with pytest.raises(ConfigError, match="needs device=cpu"):
        resolve_linear_backend("onednn", "cpu")


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError) as e:
        resolve_linear_backend("onednn", "cuda")
    assert "linear_backend" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        compose(["linear_backend=mkl"])
    assert str(e.value) == "config key 'linear_backend' must be one of torch, auto, onednn; got 'mkl'"
    with pytest.raises(ConfigError) as e:
        preflight_overrides(["linear_backnd=auto"])
    assert str(e.value) == "unknown config key 'linear_backnd' did you mean 'linear_backend'?"


def test_set_linear_backend_reaches_every_casted_linear():
    head = make_head("hrm")
    n = sum(isinstance(m, CastedLinear) for m in head.modules())
    assert n >= 6
    set_linear_backend(head, "torch", "cpu")
    assert all(m.backend == "torch" for m in head.modules() if isinstance(m, CastedLinear))
    if onednn_available():
        set_linear_backend(head, "onednn", "cpu")
        assert all(m.backend == "onednn" for m in head.modules() if isinstance(m, CastedLinear))
