"""What the shared blocks do for the hybrid LM and HRM never uses: SwiGLU width multiple, RoPE at any
positions, key padding masks, causal attention with a KV cache, cross-attention."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.layers import (Attention, CrossAttention, RotaryEmbedding, SwiGLU, apply_rotary_pos_emb,
                           swiglu_intermediate_size)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_swiglu_multiple_of_32_reproduces_the_lm_width_rule():
    # The LM's own rule before it moved onto the shared SwiGLU; its checkpoints depend on it.
    for expansion in [x / 2 for x in range(3, 17)]:
        for D in range(2, 4097, 2):
            assert swiglu_intermediate_size(D, expansion, 32) == int(math.ceil(expansion * D * 2 / 3 / 32) * 32)
    assert swiglu_intermediate_size(256, 4, 32) == 704 and swiglu_intermediate_size(256, 4) == 768
    mlp = SwiGLU(256, 4, multiple_of=32)
    assert mlp.gate_up_proj.weight.shape == (2 * 704, 256) and mlp.down_proj.weight.shape == (256, 704)


def test_rotary_at_positions_equals_table_rows_beyond_too():
    rope = RotaryEmbedding(8, 10, 10000.0)
    cos, sin = rope()
    c, s = rope(torch.arange(3, 7))
    assert torch.equal(c, cos[3:7]) and torch.equal(s, sin[3:7])
    c, s = rope(torch.tensor([50]))
    assert torch.allclose(c[0, :4], torch.cos(50 * rope.inv_freq))
    assert "inv_freq" not in rope.state_dict()


def _reference(q, k, v, mask):
    """q [B,S,H,d], k, v [B,T,H,d], mask [B,S,T] bool -> [B,S,H*d] by an explicit softmax."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).flatten(2)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_with_key_mask_and_causality(backend, causal):
    g = torch.Generator().manual_seed(0)
    attn = Attention(32, 8, 4, 4, causal=causal, backend=backend, generator=g)
    x = torch.randn(2, 6, 32, generator=g)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[0, 4:] = False
    cos_sin = RotaryEmbedding(8, 6, 10000.0)()
    out = attn(x, cos_sin, key_mask=key_mask)
    q, k, v = F.linear(x, attn.qkv_proj.weight).view(2, 6, 12, 8).split(4, dim=2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    mask = key_mask[:, None, :].expand(2, 6, 6)
    if causal:
        mask = mask & torch.ones(6, 6, dtype=torch.bool).tril()
    ref = F.linear(_reference(q, k, v, mask), attn.o_proj.weight)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # masked keys do not matter
    x2 = x.clone()
    x2[0, 4:] += 3.0
    torch.testing.assert_close(attn(x2, cos_sin, key_mask=key_mask)[0, :4], out[0, :4], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_kv_cache_one_position_at_a_time_equals_causal_forward(backend):
    g = torch.Generator().manual_seed(0)
    attn = Attention(32, 8, 4, 2, causal=True, backend=backend, generator=g)  # grouped kv heads
    x = torch.randn(2, 7, 32, generator=g)
    rope = RotaryEmbedding(8, 0, 10000.0)  # no table: positions computed on demand
    full = attn(x, rope(torch.arange(7)))
    cache = {}
    steps = [attn(x[:, i:i + 1], rope(torch.arange(i, i + 1)), cache=cache) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache["k"].shape == (2, 7, 2, 8)
    with pytest.raises(ValueError, match="one new position"):
        attn(x[:, :2], rope(torch.arange(7, 9)), cache=cache)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_cross_attention_matches_reference_and_ignores_masked_memory(backend):
    g = torch.Generator().manual_seed(0)
    xa = CrossAttention(32, 8, 4, 4, backend=backend, generator=g)
    x, memory = torch.randn(2, 5, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    mem_mask = torch.ones(2, 9, dtype=torch.bool)
    mem_mask[1, 6:] = False
    out = xa(x, xa.project_memory(memory), mem_mask)
    q = F.linear(x, xa.q_proj.weight).view(2, 5, 4, 8)
    k, v = F.linear(memory, xa.kv_proj.weight).view(2, 9, 8, 8).split(4, dim=2)
    ref = F.linear(_reference(q, k, v, mem_mask[:, None, :].expand(2, 5, 9)), xa.o_proj.weight)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert list(dict(xa.named_parameters())) == ["q_proj.weight", "kv_proj.weight", "o_proj.weight"]
