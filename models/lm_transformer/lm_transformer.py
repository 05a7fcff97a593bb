"""A plain decoder-only Transformer LM: the baseline the hybrid HRM LM (models/hrm_lm) is compared against.

It reads the same batches as the hybrid (lm_dataset.py: a prompt, and BOS + target as decoder inputs), trains
with the same loss head (models/hrm_lm/losses.py) and generates through the same loop (models/lm_generation.py),
built from the shared blocks of models/layers.py (Attention with its KV cache, SwiGLU, RotaryEmbedding,
CastedLinear/CastedEmbedding). What it lacks is exactly what the ablation asks about: no prompt encoder, no
HRM core, no gated memory, no cross-attention - one causal stack over prompt and answer together.

Data flow for one batch (B = batch, Lp = prompt length, Lt = decoder length, T = Lp + Lt, D = hidden size):

    row b = [prompt_b (its n_b real tokens) ; BOS, t0, t1, ... ; padding]   tokens [B, T]
            (the right-padded prompt is closed up so the decoder inputs follow the prompt's last real token:
             causal attention then never sees a padding position from a real one, and no mask is needed)
    h = embed(tokens); n_layers x pre-norm blocks: h += attn(norm(h)) (causal, RoPE at 0..T-1); h += mlp(norm(h))
    logits [B, Lt, V] = lm_head(norm(h at positions n_b + t)), t = 0..Lt-1   (decoder positions only)

So decoder position t sees the whole prompt and decoder inputs <= t, like the hybrid's decoder; the loss covers
the targets only (the prompt is context, as it is for the hybrid's encoder).

Sizing against an hrm_lm config (models/lm_transformer/sizing.py, `python -m models.lm_transformer.sizing`):
keep hidden_size, num_heads, expansion and the vocabulary, and choose n_layers so that either the parameter
count (match=params) or the estimated training FLOPs per step (match=flops) is nearest the hybrid's. Both cannot
hold at once: a plain stack spends 6 FLOPs per parameter per token, the hybrid re-applies its core
H_cycles x L_cycles times per segment, so at equal parameters it does more compute per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.layers import ATTN_BACKENDS, Attention, CastedEmbedding, CastedLinear, RotaryEmbedding, SwiGLU
from models.lm_generation import LMGeneration
from utils.schema import ConfigError, from_dict

# The hybrid LM's SwiGLU width rule (models/hrm_lm/hrm_lm_v1.py), so equal hidden_size/expansion give equal MLPs.
SWIGLU_MULTIPLE_OF = 32


# ---------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm causal block: h + attn(norm(h)), then + SwiGLU(norm(h))."""

    def __init__(self, cfg: "LMTransformerConfig", generator: torch.Generator):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.norm1 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.attn = Attention(D, D // H, H, H, causal=True, backend=cfg.attn_backend, generator=generator)
        self.norm2 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(D, cfg.expansion, generator=generator, multiple_of=SWIGLU_MULTIPLE_OF)

    def forward(self, h, rope, key_mask=None, cache=None):
        h = h + self.attn(self.norm1(h), rope, key_mask=key_mask, cache=cache)
        return h + self.mlp(self.norm2(h))


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

@dataclass
class LMTransformerConfig:
    vocab_size: int
    # Injected by the trainer from the dataset metadata.
    seq_len: int = 0  # max(prompt, decoder) length of the training split: the prompt limit and the FLOPs estimate
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    max_prompt_len: int = 0  # generation: longest prompt accepted (0 = seq_len, -1 = no limit)

    n_layers: int = 4  # causal blocks (the hybrid's encoder + core + decoder all become these)
    hidden_size: int = 256
    num_heads: int = 4  # head_dim = hidden_size / num_heads (even, for RoPE)
    expansion: float = 4.0  # SwiGLU width ~ expansion * hidden_size * 2/3, rounded up to a multiple of 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attn_backend: str = "auto"  # auto | sdpa | math | flash (models/layers.py)
    seed: int = 0  # weight init when no generator is passed in


def validate_config(c: LMTransformerConfig) -> None:
    def bad(key, msg):
        raise ConfigError(f"config key 'arch.{key}' {msg}")

    if c.vocab_size <= 0:
        bad("vocab_size", f"must be > 0, got {c.vocab_size}")
    if c.n_layers < 1:
        bad("n_layers", f"must be >= 1, got {c.n_layers}")
    if c.hidden_size < 1 or c.num_heads < 1:
        bad("hidden_size" if c.hidden_size < 1 else "num_heads", "must be >= 1")
    if c.hidden_size % c.num_heads or (c.hidden_size // c.num_heads) % 2:
        bad("num_heads", f"must divide hidden_size={c.hidden_size} into an even head size, got {c.num_heads}")
    if c.expansion <= 0:
        bad("expansion", f"must be > 0, got {c.expansion}")
    if c.attn_backend not in ATTN_BACKENDS:
        bad("attn_backend", f"must be one of {', '.join(ATTN_BACKENDS)}, got {c.attn_backend!r}")
    if c.max_prompt_len < -1:
        bad("max_prompt_len", f"must be -1 (no limit), 0 (seq_len) or > 0, got {c.max_prompt_len}")


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------

class LMTransformer(LMGeneration, nn.Module):
    config_class = LMTransformerConfig

    def __init__(self, config_dict: dict, generator: torch.Generator | None = None):
        super().__init__()
        self.config = cfg = from_dict(LMTransformerConfig, dict(config_dict), where="arch")
        validate_config(cfg)
        D = cfg.hidden_size
        # Every initial weight is drawn from this generator, in construction order (truncated normal,
        # std 1/sqrt(fan_in) for linears, 1/sqrt(D) for the embedding, which is scaled by sqrt(D) at lookup).
        generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        self.embed_scale = math.sqrt(D)
        self.embed_tokens = CastedEmbedding(cfg.vocab_size, D, 1.0 / math.sqrt(D), torch.float32, generator=generator)
        self.rotary = RotaryEmbedding(D // cfg.num_heads, 0, cfg.rope_theta)  # rows computed per call
        self.layers = nn.ModuleList(Block(cfg, generator) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.lm_head = CastedLinear(D, cfg.vocab_size, bias=False, generator=generator)

    @property
    def prompt_limit(self) -> int:
        """Longest prompt generation accepts (0 = unlimited)."""
        c = self.config
        return max(c.max_prompt_len, 0) if c.max_prompt_len != 0 else max(c.seq_len, 0)

    # ---- training / evaluation ------------------------------------------------------------------
    def forward(self, encoder_ids, encoder_mask, decoder_input_ids, decoder_mask=None, **_unused) -> dict:
        """encoder_ids, encoder_mask [B, Lp] (right-padded prompt), decoder_input_ids [B, Lt] (BOS + target)
        -> dict(logits [B, Lt, V] float32) for the decoder positions (models/hrm_lm/losses.py)."""
        B, Lp = encoder_ids.shape
        Lt = decoder_input_ids.shape[1]
        n = encoder_mask.sum(-1, keepdim=True)  # [B, 1] real prompt tokens (a prefix of each row)
        j = torch.arange(Lp + Lt, device=encoder_ids.device)
        # Row b's token j: prompt j while j < n_b, then decoder input j - n_b; past the decoder inputs the
        # clamp repeats the last one (after every real position, so causal attention never reads it).
        src = torch.where(j < n, j, (Lp + j - n).clamp(max=Lp + Lt - 1))
        tokens = torch.cat([encoder_ids, decoder_input_ids], 1).gather(1, src)  # [B, T]
        h = self.embed_tokens(tokens) * self.embed_scale
        rope = self.rotary(j)
        for layer in self.layers:
            h = layer(h, rope)
        dec_pos = n + torch.arange(Lt, device=h.device)  # [B, Lt]
        h = h.gather(1, dec_pos.unsqueeze(-1).expand(B, Lt, h.shape[-1]))
        return dict(logits=self.lm_head(self.norm(h)).float())

    # ---- generation (models/lm_generation.py) ---------------------------------------------------
    @torch.no_grad()
    def prepare_generation(self, encoder_ids: torch.Tensor, encoder_mask: torch.Tensor) -> dict:
        """Run the prompt once into per-layer KV caches. Padding positions are cached too (computed causally,
        after the real tokens, so they change nothing) and masked out for every decoded token; each row's
        decoder inputs take RoPE positions n_b, n_b + 1, ... as in training."""
        mask = encoder_mask.bool()
        caches = [{} for _ in self.layers]
        h = self.embed_tokens(encoder_ids) * self.embed_scale
        rope = self.rotary(torch.arange(encoder_ids.shape[1], device=encoder_ids.device))
        for layer, cache in zip(self.layers, caches):
            h = layer(h, rope, cache=cache)
        return dict(caches=caches, key_mask=mask, pos=mask.sum(-1), encoder_ids=encoder_ids, encoder_mask=mask)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: dict) -> torch.Tensor:
        """tokens [B] (the newest decoder input) -> next-token logits [B, V]; extends the KV caches."""
        B = tokens.shape[0]
        state["key_mask"] = torch.cat([state["key_mask"], state["key_mask"].new_ones(B, 1)], 1)
        cos, sin = self.rotary(state["pos"])  # [B, d]: one position per row
        h = self.embed_tokens(tokens[:, None]) * self.embed_scale
        for layer, cache in zip(self.layers, state["caches"]):
            h = layer(h, (cos[:, None], sin[:, None]), key_mask=state["key_mask"], cache=cache)
        state["pos"] = state["pos"] + 1
        return self.lm_head(self.norm(h[:, -1])).float()

    @torch.no_grad()
    def decode_prefix(self, decoder_input_ids: torch.Tensor, state: dict) -> torch.Tensor:
        """decoder_input_ids [B, t] (BOS first) -> the last position's next-token logits [B, V], recomputing
        prompt and decoder inputs from scratch (no cache)."""
        return self(state["encoder_ids"], state["encoder_mask"], decoder_input_ids)["logits"][:, -1]

    # ---- accounting -----------------------------------------------------------------------------
    def estimate_flops(self, batch_size: int) -> float:
        """Rough FLOPs of one training step, in the convention of HRMLanguageModel.estimate_flops (so the two
        compare): 6 FLOPs per parameter per token (forward + backward), attention scores ignored, seq_len
        tokens for the prompt and seq_len for the decoder inputs: the blocks (and the embedding, counted
        like a matmul as the hybrid counts it) see both, the lm_head only the decoder positions."""
        L = max(self.config.seq_len, 1)

        def params(m):
            return sum(p.numel() for p in m.parameters())

        trunk = params(self.embed_tokens) + params(self.layers) + params(self.norm)
        return float((6 * trunk * 2 * L + 6 * params(self.lm_head) * L) * batch_size)
