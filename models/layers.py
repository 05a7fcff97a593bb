"""Building blocks of HRM, numerically matching the original sapientinc/HRM `models/layers.py`.

Conventions kept from the original (and relied on by released checkpoints):
- weights live in fp32 ("master" copies) and are cast to the activation dtype at use;
- init is the JAX-style truncated normal whose *final* std equals the requested std;
- RMSNorm has no gain; SwiGLU's width is round(expansion * D * 2/3) rounded up to a multiple of 256
  (`multiple_of`; the hybrid LM keeps its own 32 so that its checkpoints keep their shapes);
- RoPE uses the half-split rotation and is applied in fp32.

The hybrid LM (models/hrm_lm) uses the same blocks with what HRM never needs: key padding masks, causal
self-attention with a KV cache, cross-attention to a memory, RoPE at arbitrary positions.

Attention backends (config `attn_backend`, logged once per process): `flash` = flash-attn 3 or 2
(CUDA, 16-bit), `sdpa` = `torch.nn.functional.scaled_dot_product_attention`, `math` = explicit
softmax(QK^T/sqrt(d))V with fp32 scores. `auto` picks flash on CUDA when importable, math on CPU for
short sequences (much faster backward there), SDPA otherwise.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.common import trunc_normal_init_
from utils.config import CHOICES
from utils.cpu import cpuinfo_field
from utils.schema import ConfigError

log = logging.getLogger(__name__)

CosSin = tuple[torch.Tensor, torch.Tensor]


def _find_multiple(a: int, b: int) -> int:
    return (-(a // -b)) * b


def swiglu_intermediate_size(hidden_size: int, expansion: float, multiple_of: int = 256) -> int:
    """The original's rule: 512 -> 1536, 128 -> 512, 256 -> 768 at expansion 4 (multiple_of 256).
    The LM's multiple_of=32 gives 256 -> 704, as its own rule ceil(expansion * D * 2/3 / 32) * 32 did
    (the two agree for every hidden size at expansions 1.5, 2, 3 and 4; tests check sizes up to 4096)."""
    return _find_multiple(round(expansion * hidden_size * 2 / 3), multiple_of)


# ----------------------------------------------------------------------------------------------
# casted layers


class CastedLinear(nn.Module):
    """Linear with an fp32 weight [out, in] cast to the input's dtype at forward time."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        # Truncated LeCun normal, as in the original.
        self.weight = nn.Parameter(trunc_normal_init_(torch.empty((out_features, in_features)),
                                                      std=1.0 / math.sqrt(in_features), generator=generator))
        self.bias = nn.Parameter(torch.zeros((out_features,))) if bias else None

    # "torch" (F.linear) or "onednn" (onednn_linear below); set per model by utils/modeling.set_linear_backend
    backend = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        if self.backend == "onednn" and b is None and x.dtype == torch.float32 and x.device.type == "cpu" \
                and not torch.is_autocast_enabled("cpu"):
            return onednn_linear(x, w)
        return F.linear(x, w, b)


# ----------------------------------------------------------------------------------------------
# the oneDNN linear (config `linear_backend`)
#
# torch's CPU `mm` is MKL's GEMM. On AVX-512 CPUs oneDNN's fp32 GEMM, reachable through torch's own
# `mkldnn::_linear_pointwise` op, is faster at this project's shapes (bench/bench_linear.py; numbers in
# docs/benchmarks.md, "linear backend"). It is wrapped as a custom op so that torch.compile calls it as one
# opaque kernel (inductor's own lowering of that op expects prepacked inference weights). Its sums run in
# another order than MKL's, so results differ in the last bits and training trajectories drift apart: the
# default stays `torch`, the original's numerics, and `auto`/`onednn` are opt-in, like `compile`.

LINEAR_BACKENDS = CHOICES["linear_backend"]


@torch.library.custom_op("hrm::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T -> [..., out]; fp32 CPU tensors, through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), None, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _onednn_linear_backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t().contiguous())  # [..., out] @ W[out, in]; W^T is a small copy
    if ctx.needs_input_grad[1]:
        # MKL keeps g^T x: oneDNN would want both operands transposed, and copying them costs more than it saves
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return grad_x, grad_w


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def resolve_linear_backend(requested: str, device: torch.device | str, cpuinfo: str = "/proc/cpuinfo"
                           ) -> tuple[str, str]:
    """(backend, why) for config `linear_backend`. auto = onednn on an AMD CPU whose torch kernels use AVX-512,
    else torch. Measured with bench/bench_linear.py (docs/benchmarks.md, "Linear backend"): on an AMD EPYC
    (Zen 4) oneDNN was 1.04-1.10x per tiny-shape step; on an Intel Xeon (Emerald Rapids) MKL was faster
    (oneDNN 0.91-0.92x per step); with AVX2 only, 1.03x, within noise. CUDA always uses torch: cuBLAS."""
    if requested not in LINEAR_BACKENDS:
        raise ConfigError(f"config key 'linear_backend' expects one of {', '.join(LINEAR_BACKENDS)}, got {requested!r}")
    on_cpu = torch.device(device).type == "cpu"
    if requested == "torch":
        return "torch", "linear_backend=torch"
    if requested == "onednn":
        if not (on_cpu and onednn_available()):
            raise ConfigError("config key 'linear_backend' is 'onednn', which needs device=cpu and a torch built "
                              f"with oneDNN (device {device}, oneDNN available: {onednn_available()}); use auto or torch")
        return "onednn", "linear_backend=onednn"
    if not on_cpu:
        return "torch", f"linear_backend=auto: torch on {torch.device(device).type}"
    if not onednn_available():
        return "torch", "linear_backend=auto: torch (this torch has no oneDNN)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return "torch", f"linear_backend=auto: torch (CPU capability {capability}, not AVX512)"
    vendor = cpuinfo_field("vendor_id", cpuinfo)
    if vendor != "AuthenticAMD":
        return "torch", f"linear_backend=auto: torch (CPU vendor {vendor or 'unknown'}: oneDNN measured faster on AMD only)"
    return "onednn", "linear_backend=auto: oneDNN's GEMM (AMD CPU, capability AVX512)"


class CastedEmbedding(nn.Module):
    """Embedding table in fp32 (named `embedding_weight` as in the original), cast to `cast_to` at lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, cast_to: torch.dtype,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cast_to = cast_to
        self.embedding_weight = nn.Parameter(
            trunc_normal_init_(torch.empty((num_embeddings, embedding_dim)), std=init_std, generator=generator))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Gather in fp32 then cast only the gathered rows: the same values as casting the whole
        # table first (a cast is elementwise) at a fraction of the cost.
        return F.embedding(ids, self.embedding_weight).to(self.cast_to)


CONTEXT_EMB_MODES = ("none", "role", "role_grid")


def context_positions(tokens: torch.Tensor, marks: dict[str, int], max_index: int = 31
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roles and in-grid (row, col) of every position of context-format rows (dataset/context.py), from the
    tokens alone. role: 0 padding/other, 1 demo input, 2 demo output, 3 query input, 4 answer region (the
    segment after the last IN's OUT); row/col count ROW separators and cells since the segment's marker,
    clamped to max_index. `marks`: token ids of PAD, ROW, END, IN, OUT. [B, L] int64 each, no host sync."""
    B, L = tokens.shape
    pos = torch.arange(L, device=tokens.device).expand(B, L)
    neg = torch.full_like(pos, -1)
    is_in, is_out, is_row = tokens == marks["IN"], tokens == marks["OUT"], tokens == marks["ROW"]
    is_marker = is_in | is_out
    last_marker = torch.where(is_marker, pos, neg).cummax(dim=1).values
    seg_is_out = torch.gather(is_out, 1, last_marker.clamp(min=0)) & (last_marker >= 0)
    n_in = is_in.long().cumsum(1)
    in_query = n_in == n_in[:, -1:]
    role = torch.where(in_query, torch.where(seg_is_out, 4, 3), torch.where(seg_is_out, 2, 1))
    role = torch.where((last_marker < 0) | (tokens == marks["PAD"]), 0, role)
    rows_before = is_row.long().cumsum(1) - is_row.long()
    row = rows_before - torch.gather(rows_before, 1, last_marker.clamp(min=0))
    is_break = is_marker | is_row | (tokens == marks["END"])
    last_break = torch.where(is_break, pos, neg).cummax(dim=1).values
    prev_break = torch.cat([neg[:, :1], last_break[:, :-1]], dim=1)
    col = pos - prev_break - 1
    zero = role == 0
    return role, torch.where(zero, 0, row.clamp(0, max_index)), torch.where(zero, 0, col.clamp(0, max_index))


class ContextEmbedding(nn.Module):
    """Added to the token embeddings of context-format rows: a learned role vector (demo input / demo output /
    query / answer) and, in mode "role_grid", learned row and column vectors of the cell inside its grid
    (so flat rows keep the 2-D layout). Tables in fp32 like CastedEmbedding; state-dict names role_emb.*,
    row_emb.*, col_emb.*."""

    def __init__(self, mode: str, hidden_size: int, marks: dict[str, int], init_std: float, cast_to: torch.dtype,
                 generator: Optional[torch.Generator] = None, max_index: int = 31):
        super().__init__()
        self.marks, self.max_index, self.grid = dict(marks), max_index, mode == "role_grid"
        self.role_emb = CastedEmbedding(5, hidden_size, init_std, cast_to, generator=generator)
        if self.grid:
            self.row_emb = CastedEmbedding(max_index + 1, hidden_size, init_std, cast_to, generator=generator)
            self.col_emb = CastedEmbedding(max_index + 1, hidden_size, init_std, cast_to, generator=generator)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        role, row, col = context_positions(tokens, self.marks, self.max_index)
        out = self.role_emb(role)
        if self.grid:
            out = out + self.row_emb(row) + self.col_emb(col)
        return out  # [B, L, D]


# ----------------------------------------------------------------------------------------------
# norm, positions, MLP


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without gain over the last axis: x * rsqrt(mean(x^2) + eps), accumulated in fp32.

    torch's fused kernel (one pass over x, no fp32 copy of a bf16 input) gives bit-identical results to
    the original's `x.float()`, square, mean, rsqrt, multiply, cast back (tests/test_model_layers.py), which
    cost five kernels and two full-size temporaries per call."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_fp32(x32: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x32 [B, S, n, d] fp32 rotated by +angle (inverse=False: x*cos + rotate_half(x)*sin) or by -angle
    (the transpose, for the gradient), written half by half into one new tensor: no rotated copy of x.
    Each element is one product plus one product-sum with the same rounding as the original's formula
    (a - b equals a + (-b) exactly), hence bit-identical."""
    half = x32.shape[-1] // 2
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [S, 1, d]: broadcast over heads
    x1, x2 = x32[..., :half], x32[..., half:]
    out = x32 * cos
    if inverse:  # d(out1)/dx2 = -sin1 and d(out2)/dx1 = sin2, transposed
        out[..., :half] += x2 * sin[..., half:]
        out[..., half:] -= x1 * sin[..., :half]
    else:  # out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2
        out[..., :half] -= x2 * sin[..., :half]
        out[..., half:] += x1 * sin[..., half:]
    return out


class _Rotary(torch.autograd.Function):
    """RoPE with a hand-written backward (the inverse rotation of the gradient): autograd of the in-place
    half updates would record slice copies that cost more than they save."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotary_fp32(x.float(), cos, sin, inverse=False).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotary_fp32(grad.float(), cos, sin, inverse=True).to(grad.dtype), None, None


def _rotary_formula(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The original's formula on one tensor x [B, S, n, d]: x*cos + rotate_half(x)*sin in fp32, back to x's dtype."""
    x32 = x.float()
    return (x32 * cos.unsqueeze(-2) + rotate_half(x32) * sin.unsqueeze(-2)).to(x.dtype)  # [S, 1, d] over heads


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, n, d] -> x*cos + rotate_half(x)*sin, in fp32, returned in x's dtype; cos, sin [S, d] (not
    differentiated). Eager: bit-identical to the original's formula in value and gradient
    (tests/test_model_layers.py), at about half its element-wise passes: no rotated copy, no table negation
    per call. Compiled: the original's formula itself, which inductor fuses with the head transposes around it
    into one vectorised pass; the in-place halves of the eager version make it materialise a copy and gather
    element by element instead (measured at the tiny shape: backward 7.0 -> 3.0 ms, forward 1.8 -> 1.1 ms
    per block, same values as the compiled in-place version)."""
    if torch.compiler.is_compiling():
        return _rotary_formula(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: [B, S, H, d]; cos, sin: [S, d] fp32. The original's formula, kept as the reference."""
    return _rotary_formula(q, cos, sin), _rotary_formula(k, cos, sin)


def _rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    freqs = torch.outer(positions.float(), inv_freq)  # [S, d/2]
    return torch.cat((freqs, freqs), dim=-1)  # [S, d]


class RotaryEmbedding(nn.Module):
    """RoPE tables [S, d] for positions 0..max_position_embeddings-1, precomputed (fp32, non-persistent:
    never in a state dict); `forward(positions)` computes the rows of any positions (the LM's decoder
    during generation), equal to the table's rows where both exist."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        angles = _rotary_angles(torch.arange(max_position_embeddings, dtype=torch.float32), inv_freq)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)

    def forward(self, positions: Optional[torch.Tensor] = None) -> CosSin:
        if positions is None:
            return self.cos_cached, self.sin_cached
        angles = _rotary_angles(positions, self.inv_freq)
        return angles.cos(), angles.sin()


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, expansion: float, generator: Optional[torch.Generator] = None,
                 multiple_of: int = 256):
        super().__init__()
        inter = swiglu_intermediate_size(hidden_size, expansion, multiple_of)
        self.gate_up_proj = CastedLinear(hidden_size, inter * 2, bias=False, generator=generator)
        self.down_proj = CastedLinear(inter, hidden_size, bias=False, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------
# attention

ATTN_BACKENDS = ("auto", "flash", "sdpa", "math")

# "math" materialises [B, H, S, S] fp32 scores; beyond this many bytes "auto" uses SDPA instead.
MATH_ATTN_MAX_BYTES = 256 * 2 ** 20


def _import_flash_attn():
    """flash_attn_func from FA3 (`flash_attn_interface`) or FA2 (`flash_attn`), or None."""
    try:
        from flash_attn_interface import flash_attn_func  # type: ignore
        return flash_attn_func, "flash_attn_3"
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # type: ignore
        return flash_attn_func, "flash_attn_2"
    except ImportError:
        return None, None


_FLASH_ATTN_FUNC, _FLASH_ATTN_NAME = _import_flash_attn()  # resolved once: forward stays free of imports
_logged_backends: set[str] = set()


def resolve_attn_backend(requested: str, device: torch.device | str | None = None) -> str:
    """Map the configured backend to the one used on `device`:
    'auto' -> 'flash' on CUDA when flash-attn imports, 'math' on CPU (short sequences, see Attention),
    'sdpa' elsewhere. 'flash' without flash-attn is an error, never a silent fallback."""
    if requested not in ATTN_BACKENDS:
        raise ConfigError(f"config key 'arch.attn_backend' expects one of {', '.join(ATTN_BACKENDS)}, got {requested!r}")
    dev_type = torch.device(device).type if device is not None else "cpu"
    if requested == "flash":
        if _FLASH_ATTN_FUNC is None:
            raise ConfigError("config key 'arch.attn_backend' is 'flash' but neither flash_attn_interface (FA3) nor "
                              "flash_attn (FA2) is importable; use 'auto' or 'sdpa'")
        return "flash"
    if requested in ("sdpa", "math"):
        return requested
    if dev_type == "cuda" and _FLASH_ATTN_FUNC is not None:
        return "flash"
    # On CPU the SDPA flash kernel's backward is slow at HRM's short sequences (~10x in bf16).
    return "math" if dev_type == "cpu" else "sdpa"


def log_attn_backend_choice(requested: str) -> None:
    """Say once per process what `requested` resolves to on each kind of device."""
    if requested in _logged_backends:
        return
    _logged_backends.add(requested)
    flash = _FLASH_ATTN_NAME or "not importable"
    if requested == "auto":
        log.info("attention backend auto: CUDA -> %s, CPU -> math (explicit fp32-score softmax; SDPA beyond %d MiB "
                 "of scores), other devices -> sdpa; flash-attn: %s",
                 "flash" if _FLASH_ATTN_FUNC is not None else "sdpa", MATH_ATTN_MAX_BYTES >> 20, flash)
    else:
        log.info("attention backend %s (as configured); flash-attn: %s", requested, flash)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, H, S, d], k, v [B, H, T, d] -> [B, H, S, d]. Numerics follow flash-attn's: scores and softmax
    in fp32 from the (possibly bf16) q, k; probabilities cast to v's dtype for the PV product.
    key_mask [B, T] bool, True = attend; causal needs S == T."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, S, T] fp32
    if causal:
        S = scores.shape[-1]
        mask = torch.ones(S, S, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


class _AttentionBase(nn.Module):
    """Heads, backend choice and the attention itself; subclasses own the projections."""

    def __init__(self, head_dim: int, num_heads: int, num_key_value_heads: int, causal: bool, backend: str):
        super().__init__()
        resolve_attn_backend(backend)  # validates; 'flash' without flash-attn fails here, not at the first step
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.causal = causal
        self.backend = backend  # resolved per call from the tensors' device (a pure function: compile-friendly)
        log_attn_backend_choice(backend)

    def _backend_for(self, q: torch.Tensor, num_keys: int, masked: bool) -> str:
        chosen = resolve_attn_backend(self.backend, q.device)
        if chosen == "flash" and (q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16)):
            if self.backend == "flash":
                raise RuntimeError(f"attn_backend='flash' needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}")
            chosen = "sdpa"  # auto + fp32: flash-attn has no fp32 kernel
        if chosen == "flash" and masked:
            if self.backend == "flash":
                raise RuntimeError("attn_backend='flash' takes no key padding mask (the LM pads its prompts); "
                                   "use 'auto' or 'sdpa'")
            chosen = "sdpa"
        if chosen == "math" and self.backend == "auto":
            B, S = q.shape[:2]
            if B * self.num_heads * S * num_keys * 4 > MATH_ATTN_MAX_BYTES:
                chosen = "sdpa"
        return chosen

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [B, S, H, d], k, v [B, T, Hkv, d], key_mask [B, T] bool (True = attend) -> [B, S, H*d]."""
        B, S = q.shape[:2]
        H = self.num_heads
        backend = self._backend_for(q, k.shape[1], key_mask is not None)
        if backend == "flash":
            out = _FLASH_ATTN_FUNC(q, k, v, causal=causal)
            if isinstance(out, tuple):  # FA3 returns (out, lse)
                out = out[0]
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, d]
            if self.num_key_value_heads != H:
                k = k.repeat_interleave(H // self.num_key_value_heads, dim=1)
                v = v.repeat_interleave(H // self.num_key_value_heads, dim=1)
            if backend == "math":
                out = math_attention(q, k, v, causal=causal, key_mask=key_mask)
            elif key_mask is None:  # same default scale 1/sqrt(d) as flash-attn
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            else:
                mask = key_mask[:, None, None, :]
                if causal:
                    mask = mask & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.transpose(1, 2)
        return out.reshape(B, S, H * self.head_dim)


class Attention(_AttentionBase):
    """Multi-head self-attention (non-causal in HRM) with a fused qkv projection, layout
    [q heads | k heads | v heads]. The LM adds key padding masks and, in its causal decoder, a KV cache."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_key_value_heads: int,
                 causal: bool = False, backend: str = "auto", generator: Optional[torch.Generator] = None):
        super().__init__(head_dim, num_heads, num_key_value_heads, causal, backend)
        self.hidden_size = hidden_size
        self.qkv_proj = CastedLinear(hidden_size, (num_heads + 2 * num_key_value_heads) * head_dim, bias=False,
                                     generator=generator)
        self.o_proj = CastedLinear(num_heads * head_dim, hidden_size, bias=False, generator=generator)

    def forward(self, hidden_states: torch.Tensor, cos_sin: Optional[CosSin] = None,
                key_mask: Optional[torch.Tensor] = None, cache: Optional[dict] = None) -> torch.Tensor:
        """hidden_states [B, S, D]; cos_sin [S, d] for these S positions; key_mask [B, S] (True = attend);
        cache {"k", "v"} [B, T, Hkv, d] of earlier positions, extended in place (generation feeds one new
        position at a time, which then attends to every cached one)."""
        B, S, _ = hidden_states.shape
        H, Hkv = self.num_heads, self.num_key_value_heads
        qkv = self.qkv_proj(hidden_states).view(B, S, H + 2 * Hkv, self.head_dim)
        qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]
        if cos_sin is not None:
            qk = apply_rotary(qk, *cos_sin)  # q and k rotated in one pass
        q, k = qk[:, :, :H], qk[:, :, H:]
        if cache is not None:
            if "k" in cache:
                k = torch.cat((cache["k"], k), dim=1)
                v = torch.cat((cache["v"], v), dim=1)
            cache["k"], cache["v"] = k, v
            if S != 1 and k.shape[1] != S:
                raise ValueError("cached attention takes one new position at a time after the first call")
        return self.o_proj(self.attend(q, k, v, causal=self.causal and S > 1, key_mask=key_mask))


class CrossAttention(_AttentionBase):
    """Queries from the hidden states, keys and values from a memory [B, M, D] (no RoPE, never causal).
    Projections q_proj, kv_proj ([k heads | v heads]), o_proj; the memory's k, v are computed once
    (`project_memory`) and reused for every decoded position."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_key_value_heads: int,
                 backend: str = "auto", generator: Optional[torch.Generator] = None):
        super().__init__(head_dim, num_heads, num_key_value_heads, False, backend)
        self.q_proj = CastedLinear(hidden_size, num_heads * head_dim, bias=False, generator=generator)
        self.kv_proj = CastedLinear(hidden_size, 2 * num_key_value_heads * head_dim, bias=False, generator=generator)
        self.o_proj = CastedLinear(num_heads * head_dim, hidden_size, bias=False, generator=generator)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [B, M, D] -> k, v [B, M, Hkv, d]."""
        B, M, _ = memory.shape
        kv = self.kv_proj(memory).view(B, M, 2 * self.num_key_value_heads, self.head_dim)
        return kv[:, :, :self.num_key_value_heads], kv[:, :, self.num_key_value_heads:]

    def forward(self, hidden_states: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor],
                memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, S, self.num_heads, self.head_dim)
        return self.o_proj(self.attend(q, *memory_kv, causal=False, key_mask=memory_mask))


# ----------------------------------------------------------------------------------------------
# the recurrent reasoning block (HRM, TRM)


class PostNormBlock(nn.Module):
    """Post-norm block of HRM and TRM: h = rms(h + mixer(h)); h = rms(h + SwiGLU(h)).

    The token mixer is non-causal self-attention (`self_attn`), or, with `mlp_t_len` = L > 0, TRM's mlp_t
    (`mlp_t`): a SwiGLU of width L applied across the positions of [B, L, D] (same weights for every
    channel and row). As in the original, its residual RMS norm is taken before transposing back, i.e.
    over the sequence axis, not over channels. State-dict names and init order (mixer, then `mlp`) are
    the originals'."""

    def __init__(self, hidden_size: int, num_heads: int, expansion: float, norm_eps: float,
                 attn_backend: str = "auto", mlp_t_len: int = 0, generator: Optional[torch.Generator] = None,
                 swiglu_multiple_of: int = 256):
        super().__init__()
        self.use_mlp_t = mlp_t_len > 0
        if self.use_mlp_t:
            self.mlp_t = SwiGLU(mlp_t_len, expansion, generator=generator, multiple_of=swiglu_multiple_of)
        else:
            self.self_attn = Attention(hidden_size, hidden_size // num_heads, num_heads, num_heads, causal=False,
                                       backend=attn_backend, generator=generator)
        self.mlp = SwiGLU(hidden_size, expansion, generator=generator, multiple_of=swiglu_multiple_of)
        self.norm_eps = norm_eps

    def mix_tokens(self, hidden_states: torch.Tensor, cos_sin: Optional[CosSin] = None,
                   key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The first half of the block: h = rms(h + mixer(h)) over [B, S, D]. key_mask [B, S] (True =
        attend): the LM's padded prompts; mlp_t, which mixes fixed positions, takes none."""
        if self.use_mlp_t:  # cos_sin is unused: positions are baked into the mlp_t weights
            if key_mask is not None:
                raise ValueError("the mlp_t mixer takes no key padding mask")
            h = hidden_states.transpose(1, 2)  # [B, D, S]
            return rms_norm(h + self.mlp_t(h), self.norm_eps).transpose(1, 2)
        return rms_norm(hidden_states + self.self_attn(hidden_states, cos_sin=cos_sin, key_mask=key_mask),
                        self.norm_eps)

    def forward(self, hidden_states: torch.Tensor, cos_sin: Optional[CosSin] = None,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden_states = self.mix_tokens(hidden_states, cos_sin, key_mask)
        return rms_norm(hidden_states + self.mlp(hidden_states), self.norm_eps)
