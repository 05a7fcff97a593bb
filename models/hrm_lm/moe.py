"""Mixture-of-experts SwiGLU feed-forward with capacity-limited top-k routing (Switch Transformer style).

Experts are batched: routed tokens are scattered into a capacity-shaped buffer [E, C, D] and every expert
runs as one slice of a batched matmul against stacked weights [E, D, 2F] / [E, F, D]. There is no Python
loop over tokens or experts, and no host sync (dropped tokens go to a spare "overflow" row instead of
being filtered with nonzero()).

Routing, per token n with router probabilities p_n = softmax(W_r x_n):
  * top-k experts by p_n; combine weights = the top-k probabilities, renormalised to sum 1 when k > 1
    (k = 1 keeps the raw probability, as Switch does, so the router receives gradient from the output).
  * capacity C = ceil(capacity_factor * N * k / E), N = tokens in the batch (padding included, so C is a
    shape-only quantity). Slots are filled choice-rank first (all tokens' 1st choices, then 2nd choices),
    in token order inside a rank. An assignment past C is dropped: it contributes nothing, and if all of
    a token's assignments drop only the caller's residual path carries it.
  * load-balance loss (Switch, eq. 4): aux = E * sum_e f_e * P_e with f_e = share of the valid tokens'
    top-k assignments that chose expert e (before capacity drops; hard counts, no gradient) and
    P_e = mean router probability of expert e over valid tokens. aux = 1 for a perfectly uniform router.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, capacity_factor: float = 1.25,
                 ff_multiplier: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dropout = dropout
        # SwiGLU width: ff_multiplier*D scaled by 2/3 (SwiGLU has 3 matrices), rounded up to a multiple of 8.
        ff = int(math.ceil(ff_multiplier * d_model * 2 / 3 / 8) * 8)
        self.ff_dim = ff
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, 2 * ff))
        self.w_out = nn.Parameter(torch.empty(num_experts, ff, d_model))
        self.reset_parameters(torch.Generator().manual_seed(0))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Truncated LeCun normal for router and experts, every draw from `generator`."""
        for w, fan_in in ((self.router.weight, self.router.in_features), (self.w_in, self.w_in.shape[1]),
                          (self.w_out, self.w_out.shape[1])):
            std = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=generator)

    def capacity(self, num_tokens: int) -> int:
        return max(1, int(math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)))

    def route(self, tokens: torch.Tensor, valid: torch.Tensor):
        """tokens [N, D], valid [N] bool -> routing decisions (all tensors, no host sync).

        Returns probs [N, E], top_e [N, k], weights [N, k], slot [k*N] (row of the [E*C + 1] buffer; E*C =
        overflow), keep [k*N] bool, capacity C."""
        N, E, k = tokens.shape[0], self.num_experts, self.top_k
        probs = torch.softmax(self.router(tokens).float(), dim=-1)  # [N, E]
        top_p, top_e = probs.topk(k, dim=-1)  # [N, k]
        weights = top_p / top_p.sum(-1, keepdim=True) if k > 1 else top_p
        C = self.capacity(N)
        e_flat = top_e.t().reshape(-1)  # [k*N], choice-rank major: rank 0 of every token first
        valid_flat = valid.repeat(k)
        onehot = F.one_hot(e_flat, E) * valid_flat.unsqueeze(-1)  # [k*N, E]
        pos = (onehot.cumsum(0) - 1).gather(1, e_flat.unsqueeze(-1)).squeeze(-1)  # position inside its expert
        keep = valid_flat & (pos < C)
        slot = torch.where(keep, e_flat * C + pos, torch.full_like(e_flat, E * C))
        return probs, top_e, weights, slot, keep, C

    def aux_loss(self, probs: torch.Tensor, top_e: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        v = valid.to(probs.dtype)
        n_valid = v.sum().clamp_min(1.0)
        counts = (F.one_hot(top_e, E).to(probs.dtype) * v[:, None, None]).sum((0, 1))  # [E]
        f = counts / (n_valid * self.top_k)
        P = (probs * v[:, None]).sum(0) / n_valid
        return E * (f * P).sum()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """x [B, L, D], mask [B, L] bool (True = real token) -> (y [B, L, D], aux_loss 0-d, drop_frac 0-d)."""
        B, L, D = x.shape
        E, k = self.num_experts, self.top_k
        tokens = x.reshape(B * L, D)
        N = tokens.shape[0]
        valid = torch.ones(N, dtype=torch.bool, device=x.device) if mask is None else mask.reshape(N)
        probs, top_e, weights, slot, keep, C = self.route(tokens, valid)

        buf = tokens.new_zeros(E * C + 1, D).index_copy(0, slot, tokens.repeat(k, 1))
        h = torch.bmm(buf[: E * C].view(E, C, D), self.w_in.to(x.dtype))  # [E, C, 2F]
        a, b = h.chunk(2, dim=-1)
        h = F.silu(a) * b
        if self.training and self.dropout > 0:
            # Explicit generator: dropout must not draw from the global RNG.
            keep_mask = torch.rand(h.shape, generator=generator, device=h.device) >= self.dropout
            h = h * keep_mask / (1.0 - self.dropout)
        out = torch.bmm(h, self.w_out.to(x.dtype)).reshape(E * C, D)
        out = torch.cat([out, out.new_zeros(1, D)], dim=0)  # overflow row reads zeros
        combine = (weights.t().reshape(-1) * keep).to(x.dtype)  # [k*N]
        y = (out[slot] * combine[:, None]).view(k, N, D).sum(0)

        n_assign = (valid.sum() * k).clamp_min(1)
        drop_frac = 1.0 - keep.sum() / n_assign
        return y.view(B, L, D), self.aux_loss(probs, top_e, valid), drop_frac
