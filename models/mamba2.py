"""Mamba2: the selective state-space block of "Transformers are SSMs" (Dao & Gu, 2024), in pure PyTorch.

The module mirrors `mamba_ssm.modules.mamba2.Mamba2`: same constructor arguments, same parameter names
and shapes (in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj), same in_proj split order
[z0, x0, z, xBC, dt] and the same initialisation of dt_bias / A_log / D, so a state dict saved by one
loads into the other. The inference API is the same too: `allocate_inference_cache` returns
`(conv_state [B, conv_dim, d_conv], ssm_state [B, nheads, headdim, d_state])` and `step` advances one token.

The work is done by a chunked SSD scan (`ssd_chunked`): inside a chunk of `chunk_size` tokens the SSM is
computed as a masked, decay-weighted attention-like matrix product; between chunks only the
[nheads, headdim, d_state] states are passed on. `ssd_sequential` is the plain token-by-token recurrence,
kept as the reference for tests and benchmarks. When `mamba_ssm` is importable and CUDA is present, its
fused Triton scan is used instead (`backend="mamba_ssm"`); the choice is logged at construction and a
forced backend that cannot run is an error, never a silent fallback.

Notation (per head h, token t):  dt_t = softplus(dt_raw_t + dt_bias),  a_t = dt_t * A  (A = -exp(A_log) < 0)
    state_t = exp(a_t) * state_{t-1} + dt_t * x_t B_t^T          [headdim, d_state]
    y_t     = state_t C_t + D * x_t                               [headdim]
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "mamba_ssm", "torch", "torch_ssd")


def _load_mamba_ssm_scan():
    """mamba_ssm's fused chunked scan, or (None, reason) when it cannot be used here."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # ImportError, or a broken CUDA/Triton install raising at import time
        return None, f"mamba_ssm not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return None, "mamba_ssm is installed but CUDA is not available"
    return mamba_chunk_scan_combined, "mamba_ssm fused Triton kernels"


def _global_rng_untouched(active: bool, device):
    if not active:
        return contextlib.nullcontext()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


# ----------------------------------------------------------------------------------------------------
# SSD scans (pure PyTorch). Shapes: x [b, l, h, p], dt [b, l, h] (already positive), A [h] (negative),
# B, C [b, l, g, n] with h divisible by g (head i reads group i // (h // g)), D [h] or [h, p].
# ----------------------------------------------------------------------------------------------------

def _skip(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    if D is None:
        return y
    D = D.to(x.dtype)
    return y + x * (D[:, None] if D.dim() == 1 else D)


def ssd_chunked(x, dt, A, B, C, chunk_size: int, D=None, initial_state=None, return_final_state: bool = False):
    """Chunked SSD scan. Returns y [b, l, h, p] (and the final state [b, h, p, n] if asked).

    Lengths that are not a multiple of `chunk_size` are zero-padded at the end: a padded step has dt = 0,
    i.e. decay exp(0) = 1 and no input, so outputs and the final state are exactly those of the real tokens.
    Shapes inside: c chunks of s positions; the h heads are split as (g groups, r = h // g heads per group).
    Cost: 2 * l * s * h * p FLOPs for the chunk-local part plus 4 * l * h * p * n for writing and reading
    the chunk states, all in matmuls; the states dominate once s < 2n, and on CPU chunk sizes 16-32 are
    fastest (mamba_ssm's 256 is tuned for GPUs). Results do not depend on chunk_size beyond rounding.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    pad = (-l) % chunk_size
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c, s = (l + pad) // chunk_size, chunk_size
    # When autograd is not recording, buffers are filled with out= and updated in place (10-15% faster on
    # CPU); autograd cannot record out= and needs values that in-place updates would overwrite.
    in_place = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, initial_state)))

    a_cum = (dt * A.to(dt.dtype)).view(b, c, s, h).cumsum(dim=2)                       # [b, c, s, h]
    # small head-major copies: the [h, b, c, s, s] products below come out contiguous, one block per head
    a_h = a_cum.permute(3, 0, 1, 2).contiguous()                                        # [h, b, c, s]
    dt_h = dt.view(b, c, s, h).permute(3, 0, 1, 2).contiguous()                         # [h, b, c, s]
    Bg = B.reshape(b, c, s, g, n).transpose(2, 3)                                       # [b, c, g, s, n]
    Cg = C.reshape(b, c, s, g, n).transpose(2, 3)

    # 1) within each chunk: y_l = sum_{j<=l} (C_l . B_j) exp(a_{j+1} + ... + a_l) dt_j x_j  (+ D x_l).
    # The decay is a difference of cumulative sums, as in mamba_ssm's kernels. Entries above the diagonal
    # are set to 0 BEFORE exp (so neither they nor their gradients can overflow) and zeroed afterwards
    # through C.B, which is [s, s] per group instead of per head; exp(-inf) would take exp's slow path.
    # dt_j and a scalar-per-head D (on the diagonal) go into the score matrix so x is read as it is.
    above = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
    seg = (a_h.unsqueeze(-1) - a_h.unsqueeze(-2)).masked_fill_(above, 0.0)              # [h, b, c, l, s]
    CB = (Cg @ Bg.transpose(-1, -2)).masked_fill_(above, 0.0)                           # [b, c, g, l, s]
    CB = CB.permute(2, 0, 1, 3, 4).unsqueeze(1)                                         # [g, 1, b, c, l, s]
    if in_place:
        scores = seg.exp_().view(g, r, b, c, s, s).mul_(CB).view(h, b, c, s, s).mul_(dt_h.unsqueeze(-2))
    else:
        scores = (seg.exp().view(g, r, b, c, s, s) * CB).view(h, b, c, s, s) * dt_h.unsqueeze(-2)
    D_in_scores = D is not None and D.dim() == 1
    if D_in_scores:
        scores.diagonal(dim1=-2, dim2=-1).add_(D.to(x.dtype)[:, None, None, None])
    x_c = x.view(b, c, s, h, p)
    if in_place:  # head by head, x is read in place (rows h*p apart) instead of copied head-major
        y_diag = torch.empty(h, b * c, s, p, dtype=x.dtype, device=x.device)
        for i in range(h):
            torch.bmm(scores[i].view(b * c, s, s), x_c[:, :, :, i].reshape(b * c, s, p), out=y_diag[i])
    else:
        y_diag = scores @ x_c.permute(3, 0, 1, 2, 4)
    y_diag = y_diag.view(h, b, c, s, p)                                                 # [h, b, c, l, p]

    # 2) what chunk k adds to the state at its end is B_k^T (w x_k), weighting each token and head by
    # w = exp(a_{j+1..end}) dt_j; the weighting happens inside the loop below, on one chunk at a time
    w_end = dt.view(b, c, s, h) * torch.exp(a_cum[:, :, -1:] - a_cum)                  # [b, c, s, h]
    B_end = Bg.permute(1, 0, 2, 4, 3).reshape(c, b * g, n, s)                           # [c, b*g, n, s]
    C_in = Cg.transpose(0, 1).reshape(c, b * g, s, n)                                   # [c, b*g, s, n]
    chunk_decay = torch.exp(a_cum[:, :, -1]).transpose(0, 1).reshape(c, b, g, 1, r, 1)  # [c, b, g, 1, r, 1]

    # 3) one pass over the chunks: read out the state entering chunk k, y_off_k = C_k S_k, then pass it on,
    # S_{k+1} = exp(sum of a over chunk k) S_k + B_k^T (w x_k). States are [n, r*p] per group (transposed),
    # so a group's heads share each matmul. They are never stored for all chunks at once (for s = 32 that
    # would be twice the size of x), and each chunk's data is used while it is in cache: on CPU this
    # memory traffic, not the FLOPs, is what the chunked scan's time beyond its matmuls goes to.
    if initial_state is None:
        state = torch.zeros(b * g, n, r * p, dtype=x.dtype, device=x.device)
    else:  # [b, h, p, n] -> [b*g, n, r*p]
        state = initial_state.to(x.dtype).reshape(b, g, r, p, n).permute(0, 1, 4, 2, 3).reshape(b * g, n, r * p)
    if in_place:
        # with one group, chunk k's read-out [b, s, h*p] is already a slice of the output's layout
        y_off = torch.empty(b, c, s, h * p, dtype=x.dtype, device=x.device) if g == 1 else \
            torch.empty(c, b * g, s, r * p, dtype=x.dtype, device=x.device)
        y_off_k = y_off.unbind(1) if g == 1 else y_off.unbind(0)
        xw = torch.empty(b, g, s, r, p, dtype=x.dtype, device=x.device)  # w x_k, reused for every chunk
        state = state.clone() if initial_state is not None else state  # the caller's tensor is left alone
        state_heads = state.view(b, g, n, r, p)
    else:
        y_off = []
    chunks = zip(C_in.unbind(0), B_end.unbind(0), x.view(b, c, s, g, r, p).unbind(1),
                 w_end.view(b, c, s, g, r, 1).unbind(1), chunk_decay.unbind(0))  # unbind: one dispatch, not c
    for k, (C_k, B_k, x_k, w_k, d_k) in enumerate(chunks):
        last = k == c - 1 and not return_final_state   # the last update only feeds the final state
        if in_place:
            if k == 0 and initial_state is None:
                y_off_k[0].zero_()
            else:
                torch.bmm(C_k, state, out=y_off_k[k])
            if not last:
                torch.mul(x_k, w_k, out=xw.transpose(1, 2))
                state_heads.mul_(d_k)
                state.baddbmm_(B_k, xw.view(b * g, s, r * p))
        else:  # autograd records every step
            y_off.append(C_k @ state)
            if not last:
                xw = (x_k * w_k).transpose(1, 2).reshape(b * g, s, r * p)
                state = torch.baddbmm((state.view(b, g, n, r, p) * d_k).view(b * g, n, r * p), B_k, xw)
    if not in_place:
        y_off = torch.stack(y_off)
    final_state = state.view(b, g, n, r, p).permute(0, 1, 3, 4, 2).reshape(b, h, p, n)

    # 4) the entering state's read-out, decayed to each position, plus the chunk-local part
    if in_place and g == 1:
        y_off = y_off.view(b, c, s, h, p)                                               # [b, c, s, h, p]
    else:
        y_off = y_off.view(c, b, g, s, r * p).transpose(2, 3).reshape(c, b, s, h, p).transpose(0, 1)
    args = (y_diag.permute(1, 2, 3, 0, 4), y_off, torch.exp(a_cum).unsqueeze(-1))
    if in_place:  # out= keeps y token-major (contiguous) whatever layout the inputs have
        y = torch.addcmul(*args, out=y_off if g == 1 else torch.empty(b, c, s, h, p, dtype=x.dtype, device=x.device))
    else:
        y = torch.addcmul(*args)
    y = y.reshape(b, c * s, h, p)[:, :l]
    if not D_in_scores:
        y = _skip(y, x[:, :l], D)
    if return_final_state:
        return y, final_state
    return y


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None, return_final_state: bool = False):
    """Token-by-token recurrence (the definition). Same arguments and results as `ssd_chunked`."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    state = (torch.zeros(b, h, p, n, dtype=x.dtype, device=x.device) if initial_state is None
             else initial_state.to(x.dtype)).reshape(b, g, r, p, n)
    A = A.to(dt.dtype).reshape(g, r)
    ys = []
    for t in range(l):
        dt_t = dt[:, t].reshape(b, g, r)
        x_t = x[:, t].reshape(b, g, r, p)
        dA = torch.exp(dt_t * A)[..., None, None]
        state = state * dA + torch.einsum("bgr,bgrp,bgn->bgrpn", dt_t, x_t, B[:, t])
        ys.append(torch.einsum("bgrpn,bgn->bgrp", state, C[:, t]).reshape(b, h, p))
    y = _skip(torch.stack(ys, dim=1), x, D)
    if return_final_state:
        return y, state.reshape(b, h, p, n)
    return y


# ----------------------------------------------------------------------------------------------------
# Gated RMSNorm (mamba_ssm.ops.triton.layernorm_gated.RMSNorm, norm_before_gate=False by default)
# ----------------------------------------------------------------------------------------------------

class RMSNormGated(nn.Module):
    """rmsnorm(x * silu(z)) * weight, normalised over groups of `group_size` channels (one per B/C group)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 group_size: int | None = None, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = hidden_size if group_size is None else group_size
        if hidden_size % self.group_size:
            raise ValueError(f"RMSNormGated: hidden_size {hidden_size} is not a multiple of group_size {self.group_size}")
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32  # statistics never in 16 bit
        x = x.to(compute)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.to(compute))
        xg = x.unflatten(-1, (-1, self.group_size))
        x = (xg * torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + self.eps)).flatten(-2)
        x = x * self.weight.to(compute)
        if z is not None and self.norm_before_gate:
            x = x * F.silu(z.to(compute))
        return x.to(dtype)


# ----------------------------------------------------------------------------------------------------
# The block
# ----------------------------------------------------------------------------------------------------

class Mamba2(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,          # SSM on this many channels; the rest of d_inner is a gated MLP
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        use_mem_eff_path: bool = True,     # accepted for signature compatibility; the scan here is unfused
        layer_idx: int | None = None,
        process_group=None,
        sequence_parallel: bool = True,
        backend: str = "auto",             # "auto" | "mamba_ssm" | "torch" ("torch_ssd" accepted)
        generator: torch.Generator | None = None,  # draws every initial weight; None = the global RNG
        device=None,
        dtype=None,
    ):
        super().__init__()
        if process_group is not None:
            raise ValueError("Mamba2: tensor parallelism (process_group) is not supported by this implementation")
        if backend not in BACKENDS:
            raise ValueError(f"Mamba2: backend must be one of {BACKENDS}, got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.conv_init = conv_init
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        if self.d_ssm % headdim:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} (expand*d_model unless given) is not a multiple of headdim={headdim}")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: nheads={self.nheads} is not a multiple of ngroups={ngroups}")
        if chunk_size < 1:
            raise ValueError(f"Mamba2: chunk_size must be >= 1, got {chunk_size}")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx

        # in_proj output order: [z0, x0 (gated MLP, d_mlp each), z (d_ssm), xBC (d_ssm + 2 g n), dt (nheads)]
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        # nn.Linear/Conv1d draw a default init from the global RNG; with a generator that draw is thrown away
        # (reset_parameters redoes it), so it must not advance the caller's global RNG either
        with _global_rng_untouched(generator is not None, device):
            self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
            self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                                    bias=conv_bias, **factory)
            out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)  # registered after norm, as in mamba_ssm
        self.act = nn.SiLU()
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.A_init_range = tuple(A_init_range)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **factory))
        self.dt_bias._no_weight_decay = True
        self.A_log = nn.Parameter(torch.empty(self.nheads, **factory))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))  # "skip"
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory)
        self.out_proj = out_proj
        self.reset_parameters(generator)

        self._fused_scan = None
        if backend in ("auto", "mamba_ssm"):
            self._fused_scan, reason = _load_mamba_ssm_scan()
            if self._fused_scan is None and backend == "mamba_ssm":
                raise RuntimeError(f"Mamba2: backend='mamba_ssm' requested but {reason}; use backend='torch'")
        else:
            reason = "forced by backend='torch'"
        self.backend = "mamba_ssm" if self._fused_scan is not None else "torch_ssd"
        why = reason if self.backend == "mamba_ssm" or backend != "auto" else f"pure-PyTorch chunked SSD; {reason}"
        log.info("Mamba2%s backend=%s (%s)", "" if layer_idx is None else f"[layer {layer_idx}]", self.backend, why)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """mamba_ssm's initialisation, every draw taken from `generator`: in_proj/out_proj/conv1d as PyTorch's
        default Linear/Conv1d init (uniform +-1/sqrt(fan_in)) or conv_init; dt_bias = softplus^-1(dt) with dt
        log-uniform in [dt_min, dt_max] (floored at dt_init_floor); A_log = log U(A_init_range); D = 1."""
        for lin in (self.in_proj, self.out_proj, self.conv1d):
            fan_in = lin.weight[0].numel()  # Conv1d depthwise: 1 * d_conv
            bound = 1.0 / math.sqrt(fan_in)
            if lin is self.conv1d and self.conv_init is not None:
                nn.init.uniform_(lin.weight, -self.conv_init, self.conv_init, generator=generator)
            else:
                nn.init.uniform_(lin.weight, -bound, bound, generator=generator)
            if lin.bias is not None:
                nn.init.uniform_(lin.bias, -bound, bound, generator=generator)
        dev = self.dt_bias.device
        u = torch.rand(self.nheads, generator=generator, device=generator.device if generator is not None else dev)
        dt = torch.exp(u.to(dev) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = torch.clamp(dt, min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        lo, hi = self.A_init_range
        A = torch.empty(self.nheads, dtype=torch.float32, device=dev)
        nn.init.uniform_(A, lo, hi, generator=generator)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        if self.rmsnorm:
            self.norm.weight.fill_(1.0)

    # -- helpers -------------------------------------------------------------------------------------
    def _split_in_proj(self, zxbcdt: torch.Tensor):
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * self.ngroups * self.d_state - self.nheads) // 2
        return torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state,
                                    self.nheads], dim=-1)

    def _dt(self, dt_raw: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt_raw + self.dt_bias.to(dt_raw.dtype))
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        return dt

    def _D(self) -> torch.Tensor:
        return self.D.reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _finish(self, y, z, z0, x0):
        """Gate/normalise the SSM output, prepend the gated-MLP part, project back to d_model."""
        if self.rmsnorm:
            y = self.norm(y, z)
        else:
            y = y * self.act(z)
        if z0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    # -- full sequence ---------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor, return_final_states: bool = False):
        """u [B, L, d_model] -> [B, L, d_model]. With return_final_states=True also returns the
        (conv_state, ssm_state) after the last token, ready for `step` (prefill for generation)."""
        batch, seqlen, _ = u.shape
        z0, x0, z, xBC, dt_raw = self._split_in_proj(self.in_proj(u))
        xBC_in = xBC
        xBC = self.act(self.conv1d(xBC.transpose(1, 2))[..., :seqlen].transpose(1, 2))  # causal depthwise conv
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B = B.unflatten(-1, (self.ngroups, self.d_state))
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        A = -torch.exp(self.A_log.float())  # float: a 16-bit A_log could overflow to -inf

        if self._fused_scan is not None:
            if not u.is_cuda:
                raise RuntimeError("Mamba2: backend 'mamba_ssm' needs CUDA tensors; construct with backend='torch' for CPU")
            kw = {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}
            res = self._fused_scan(x, dt_raw, A, B, C, chunk_size=self.chunk_size, D=self._D(), z=None,
                                   dt_bias=self.dt_bias, dt_softplus=True, return_final_states=return_final_states, **kw)
            y, final_state = (res[0], res[1]) if return_final_states else (res, None)
        else:
            # 16-bit inputs are scanned in float32 (the decays are products of many factors)
            compute = torch.float64 if u.dtype == torch.float64 else torch.float32
            dt = self._dt(dt_raw.to(compute))
            res = ssd_chunked(x.to(compute), dt, A, B.to(compute), C.to(compute), self.chunk_size, D=self._D(),
                              return_final_state=return_final_states)
            y, final_state = (res[0], res[1]) if return_final_states else (res, None)
            y = y.to(u.dtype)

        out = self._finish(y.flatten(-2), z, z0, x0)
        if not return_final_states:
            return out
        # conv_state holds the last d_conv conv inputs (zero-padded on the left for short prompts)
        conv_state = F.pad(xBC_in.transpose(1, 2), (self.d_conv - seqlen, 0)) if seqlen < self.d_conv \
            else xBC_in.transpose(1, 2)[..., -self.d_conv:]
        cache_conv, cache_ssm = self.allocate_inference_cache(batch, seqlen)
        cache_conv.copy_(conv_state)
        cache_ssm.copy_(final_state)
        return out, cache_conv, cache_ssm

    # -- one token -----------------------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """(conv_state [B, conv_dim, d_conv], ssm_state [B, nheads, headdim, d_state]), zero. conv_state is a
        transposed view of a [B, d_conv, conv_dim] buffer, the memory layout mamba_ssm's kernels expect."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv1d.weight.shape[0], device=device,
                                 dtype=conv_dtype).transpose(1, 2)
        ssm_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, u_t: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """u_t [B, 1, d_model] -> (out [B, 1, d_model], conv_state, ssm_state); both states are updated in place.

        dt is clamped to `dt_limit` here exactly as in `forward`, so decoding continues the model that was
        trained. mamba_ssm's `Mamba2.step` and transformers' Mamba2 cache path skip that clamp; for a
        non-default `dt_limit` their decoding therefore differs from their own full-sequence forward, and
        from ours. We deliberately keep step == forward (tests/test_mamba2.py checks it with a clamped dt)."""
        if u_t.dim() != 3 or u_t.shape[1] != 1:
            raise ValueError(f"Mamba2.step: expected u_t of shape [B, 1, {self.d_model}], got {list(u_t.shape)}")
        dtype = u_t.dtype
        z0, x0, z, xBC, dt_raw = self._split_in_proj(self.in_proj(u_t.squeeze(1)))

        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xBC
        xBC = (conv_state * self.conv1d.weight.squeeze(1)).sum(dim=-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = self.act(xBC).to(dtype)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)

        g, r = self.ngroups, self.nheads // self.ngroups
        compute = ssm_state.dtype if ssm_state.dtype in (torch.float32, torch.float64) else torch.float32
        A = -torch.exp(self.A_log.float()).to(compute)
        dt = self._dt(dt_raw.to(compute))                                   # [B, h]
        xh = x.to(compute).reshape(-1, g, r, self.headdim)
        Bg, Cg = B.to(compute).reshape(-1, g, self.d_state), C.to(compute).reshape(-1, g, self.d_state)
        dA = torch.exp(dt * A).reshape(-1, g, r, 1, 1)
        state = ssm_state.to(compute).reshape(-1, g, r, self.headdim, self.d_state)
        state = state * dA + torch.einsum("bgr,bgrp,bgn->bgrpn", dt.reshape(-1, g, r), xh, Bg)
        ssm_state.copy_(state.reshape(ssm_state.shape))
        y = torch.einsum("bgrpn,bgn->bgrp", state, Cg).reshape(-1, self.nheads, self.headdim)
        y = _skip(y, xh.reshape(-1, self.nheads, self.headdim), self._D()).to(dtype)
        out = self._finish(y.flatten(-2), z, z0, x0)
        return out.unsqueeze(1), conv_state, ssm_state
