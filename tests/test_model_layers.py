"""Building blocks: init statistics, widths, norm, RoPE, attention against a plain softmax reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.common import trunc_normal_init_
from utils.schema import ConfigError
from models.layers import (Attention, CastedEmbedding, CastedLinear, RotaryEmbedding, SwiGLU, apply_rotary,
                           apply_rotary_pos_emb, resolve_attn_backend, rms_norm, swiglu_intermediate_size)


def test_trunc_normal_has_requested_std_and_jax_clip():
    g = torch.Generator().manual_seed(0)
    x = trunc_normal_init_(torch.empty(400_000), std=0.5, generator=g)
    assert abs(x.std().item() - 0.5) < 0.003
    assert abs(x.mean().item()) < 0.003
    # Truncation at +-2 sd of the underlying normal, rescaled by 1/0.8796 -> about +-2.274*std.
    assert x.abs().max().item() <= 2.0 * 0.5 / 0.87962566 + 1e-6
    assert x.abs().max().item() > 2.2 * 0.5
    assert torch.all(trunc_normal_init_(torch.ones(10), std=0) == 0)


def test_trunc_normal_same_seed_same_values_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = trunc_normal_init_(torch.empty(100), std=1, generator=torch.Generator().manual_seed(7))
    after = torch.rand(3)
    b = trunc_normal_init_(torch.empty(100), std=1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(before, after)


@pytest.mark.parametrize("hidden,expected", [(512, 1536), (128, 512), (256, 768)])
def test_swiglu_width_rule(hidden, expected):
    assert swiglu_intermediate_size(hidden, 4) == expected
    mlp = SwiGLU(hidden, 4)
    assert mlp.gate_up_proj.weight.shape == (2 * expected, hidden)
    assert mlp.down_proj.weight.shape == (hidden, expected)


def test_casted_linear_init_and_cast():
    g = torch.Generator().manual_seed(0)
    lin = CastedLinear(256, 512, bias=True, generator=g)
    assert lin.weight.dtype == torch.float32
    assert abs(lin.weight.std().item() - 1 / 16) < 0.002  # LeCun: 1/sqrt(fan_in)
    assert torch.all(lin.bias == 0)
    x = torch.randn(4, 256, generator=g).bfloat16()
    y = lin(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x, lin.weight.bfloat16(), lin.bias.bfloat16())
    assert torch.equal(y, ref)
    emb = CastedEmbedding(11, 8, init_std=0.1, cast_to=torch.bfloat16, generator=g)
    ids = torch.tensor([[0, 3, 10]])
    assert torch.equal(emb(ids), emb.embedding_weight.bfloat16()[ids])


def test_rms_norm_without_gain():
    x = torch.tensor([[3.0, 4.0]])
    y = rms_norm(x, eps=0.0)
    assert torch.allclose(y, x / math.sqrt(12.5))
    yb = rms_norm(x.bfloat16(), eps=1e-5)
    assert yb.dtype == torch.bfloat16


def _original_rms_norm(x, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_rms_norm_is_bit_identical_to_the_originals(dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 37, 64, generator=g)).to(dtype)
    assert torch.equal(rms_norm(x, 1e-5), _original_rms_norm(x, 1e-5))
    # mlp_t's norm runs over a transposed (non-contiguous) view
    assert torch.equal(rms_norm(x.transpose(1, 2), 1e-5), _original_rms_norm(x.transpose(1, 2), 1e-5))
    x = x.float().requires_grad_()
    up = torch.randn(4, 37, 64, generator=g)
    (ours,) = torch.autograd.grad((rms_norm(x, 1e-5) * up).sum(), x)
    (orig,) = torch.autograd.grad((_original_rms_norm(x, 1e-5) * up).sum(), x)
    torch.testing.assert_close(ours, orig, rtol=1e-5, atol=1e-6)


def test_rope_tables_and_relative_positions():
    rope = RotaryEmbedding(dim=8, max_position_embeddings=10, base=10000.0)
    cos, sin = rope()
    assert cos.shape == (10, 8) and cos.dtype == torch.float32
    assert "cos_cached" not in rope.state_dict()  # not persistent
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.allclose(cos[3, :4], torch.cos(3 * inv)) and torch.allclose(cos[3, 4:], torch.cos(3 * inv))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 8, generator=g).expand(1, 10, 1, 8)
    k = torch.randn(1, 1, 1, 8, generator=g).expand(1, 10, 1, 8)
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    # Rotation keeps norms, and q_i . k_j depends only on i - j.
    assert torch.allclose(qr.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    dots = torch.einsum("bihd,bjhd->ij", qr, kr)
    assert torch.allclose(dots[2, 0], dots[7, 5], atol=1e-5)
    assert torch.allclose(dots[1, 4], dots[5, 8], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_rotary_is_bit_identical_to_original_formula(dtype):
    g = torch.Generator().manual_seed(0)
    cos, sin = RotaryEmbedding(16, 12, 10000.0)()
    q = torch.randn(3, 12, 4, 16, generator=g).to(dtype)
    k = torch.randn(3, 12, 4, 16, generator=g).to(dtype)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    qk = apply_rotary(torch.cat((q, k), dim=2), cos, sin)
    assert torch.equal(qk[:, :, :4], q_ref) and torch.equal(qk[:, :, 4:], k_ref)
    # the hand-written backward: the original formula's autograd gradient, bit for bit, also through a
    # strided view (the attention rotates q and k inside its qkv output) and for rows of arbitrary positions
    qkv = torch.randn(3, 12, 10, 16, generator=g).to(dtype).requires_grad_()
    up = torch.randn(3, 12, 8, 16, generator=g).to(dtype)
    cos_p, sin_p = RotaryEmbedding(16, 12, 10000.0)(torch.tensor([5, 1, 9, 0, 2, 3, 4, 6, 7, 8, 10, 11]))
    for c, s_ in ((cos, sin), (cos_p, sin_p)):
        (ours,) = torch.autograd.grad((apply_rotary(qkv[:, :, :8], c, s_) * up).sum(), qkv)
        ref = torch.cat(apply_rotary_pos_emb(qkv[:, :, :4], qkv[:, :, 4:8], c, s_), dim=2)
        (orig,) = torch.autograd.grad((ref * up).sum(), qkv)
        assert torch.equal(ours, orig)


def test_compiled_rotary_matches_eager_in_value_and_gradient():
    # under torch.compile apply_rotary traces the original's formula (models/layers.py says why); inductor
    # may contract a*b + c*d into an FMA, so the comparison allows the last bit of fp32
    g = torch.Generator().manual_seed(1)
    cos, sin = RotaryEmbedding(16, 12, 10000.0)()
    qkv = torch.randn(3, 12, 10, 16, generator=g, requires_grad=True)
    up = torch.randn(3, 12, 8, 16, generator=g)
    compiled = torch.compile(lambda t: apply_rotary(t[:, :, :8], cos, sin), dynamic=False, fullgraph=True)
    eager_out = apply_rotary(qkv[:, :, :8], cos, sin)
    (eager_grad,) = torch.autograd.grad((eager_out * up).sum(), qkv)
    out = compiled(qkv)
    (grad,) = torch.autograd.grad((out * up).sum(), qkv)
    torch.testing.assert_close(out, eager_out, rtol=2e-7, atol=5e-7)
    torch.testing.assert_close(grad, eager_grad, rtol=2e-7, atol=5e-7)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_matches_plain_softmax_reference(backend):
    g = torch.Generator().manual_seed(0)
    attn = Attention(hidden_size=32, head_dim=8, num_heads=4, num_key_value_heads=4, backend=backend, generator=g)
    x = torch.randn(2, 6, 32, generator=g)
    cos, sin = RotaryEmbedding(8, 6, 10000.0)()
    out = attn(x, cos_sin=(cos, sin))

    qkv = F.linear(x, attn.qkv_proj.weight).view(2, 6, 12, 8)
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:8], qkv[:, :, 8:]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8)  # non-causal: every position sees all
    ref = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(2, 6, 32)
    ref = F.linear(ref, attn.o_proj.weight)
    assert torch.allclose(out, ref, atol=1e-5)


def test_math_and_sdpa_backends_agree_in_bf16_with_gradients():
    g = torch.Generator().manual_seed(0)
    a_math = Attention(64, 32, 2, 2, backend="math", generator=g)
    a_sdpa = Attention(64, 32, 2, 2, backend="sdpa")
    a_sdpa.load_state_dict(a_math.state_dict())
    cos_sin = RotaryEmbedding(32, 20, 10000.0)()
    x = torch.randn(4, 20, 64, generator=g).bfloat16()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    o1, o2 = a_math(x1, cos_sin), a_sdpa(x2, cos_sin)
    assert torch.allclose(o1.float(), o2.float(), atol=3e-2, rtol=2e-2)
    w = torch.randn(o1.shape, generator=g)
    (o1.float() * w).sum().backward()
    (o2.float() * w).sum().backward()
    rel = (x1.grad.float() - x2.grad.float()).norm() / x2.grad.float().norm()
    assert rel < 0.02
    rel_w = (a_math.qkv_proj.weight.grad - a_sdpa.qkv_proj.weight.grad).norm() / a_sdpa.qkv_proj.weight.grad.norm()
    assert rel_w < 0.02


def test_attention_backend_choice_is_explicit():
    assert resolve_attn_backend("sdpa", "cpu") == "sdpa"
    assert resolve_attn_backend("auto", "cpu") == "math"
    assert resolve_attn_backend("math", "cpu") == "math"
    with pytest.raises(ConfigError, match="attn_backend"):
        resolve_attn_backend("xformers", "cpu")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="flash"):
            Attention(64, 32, 2, 2, backend="flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_and_sdpa_agree_on_gpu():
    g = torch.Generator().manual_seed(0)
    attn = Attention(64, 32, 2, 2, backend="auto", generator=g).cuda()
    x = torch.randn(4, 20, 64, generator=g).cuda().bfloat16()
    cos, sin = RotaryEmbedding(32, 20, 10000.0).cuda()()
    out_auto = attn(x, cos_sin=(cos, sin))
    for backend in ("sdpa", "math"):
        other = Attention(64, 32, 2, 2, backend=backend).cuda()
        other.load_state_dict(attn.state_dict())
        out = other(x, cos_sin=(cos, sin))
        assert torch.allclose(out_auto.float(), out.float(), atol=2e-2), backend
