"""HRM language model: a prompt encoder (Mamba2 or Transformer), an HRM (or TRM) core that reasons over
the encoder's token states, a gated bridge, and a causal Transformer decoder with cross-attention.

Data flow for one example (B = batch, Lp = prompt length, Lt = target length, D = hidden size):

    encoder_ids [B,Lp] --embed, encoder--> e [B,Lp,D]                        (sees the prompt only)
    x = W_in e; z_H, z_L [B,Lp,D] <- H_init, L_init
    for segment s = 1..halt_max_steps:                                   (models/recursion.py, arch.core)
        H_cycles x (L_cycles updates z_L <- f_L(z_L, z_H + x), then z_H <- f_H(z_H, z_L))
          core=hrm: f_L, f_H two modules; only the last f_L and f_H update is differentiated (1-step grad)
          core=trm: f_L = f_H one network (L_level; TRM's y = z_H, z = z_L); the whole last outer cycle
                    is differentiated, earlier cycles run without grad
        the carry is detached between segments; halting probability p_s = sigmoid(w . mean_valid(z_H))
    g = gate_scale * sigmoid(W_g z_H)          [B,Lp,1] (per token) or [B,Lp,D] (per channel)
    memory = [null ; e ; g * h + (1 - g) * m_null],  h = m_null + W_m z_H     [B, 1 + 2Lp, D]
             (= m_null + g * W_m z_H: the HRM states are projected with the null memory as their bias)
    decoder_input_ids [B,Lt] --causal self-attn + cross-attn to memory--> logits [B,Lt,V]

No leak: the encoder and the HRM core see only encoder_ids; decoder position t sees decoder inputs <= t,
which are BOS + targets < t. gate_scale is a buffer the loss head sets from the optimizer step
(hrm_gate_warmup_steps hold it at exactly 0, then an optional linear ramp), so during warmup the memory's
HRM half is the learned null vector and the decoder output does not depend on the HRM core at all.
gate_mode=off is that state for good: the gate is 0, the core never runs (the ablation "core removed",
same encoder, memory layout and decoder). A training-only gate floor (gate_floor, decaying to 0 over
gate_floor_steps once the gate opens) can force the decoder to read the HRM memory early on.

Training runs every segment (deep supervision: the loss head puts a decoder loss on each segment's
memory). Eval / generation halt per sequence once its halting criterion is met (p_s >= halt_threshold,
or for halt_objective=sum_target the running sum of p_s); halted rows leave the batch, and the segment
loop stops when every row has halted.
"""
from __future__ import annotations

import logging
import dataclasses
import math
from dataclasses import dataclass
import torch
from torch import nn

from models.hrm_lm.moe import MoEFeedForward
from models.layers import (ATTN_BACKENDS, Attention, CastedLinear, CrossAttention, PostNormBlock, RotaryEmbedding,
                           SwiGLU)
from models.lm_generation import LMGeneration, sample_next  # noqa: F401 - sample_next: its old home
from models.recursion import RECURSIONS, ReasoningModule
from utils.schema import ConfigError, from_dict

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Blocks: the shared ones (models/layers.py) with the LM's choices; the HRM/TRM core is models/recursion.py
# ---------------------------------------------------------------------------------------------------

# The LM rounds its SwiGLU width up to a multiple of 32 (the puzzle HRM: 256); its checkpoints' shapes depend on it.
SWIGLU_MULTIPLE_OF = 32


def lecun_normal_(w: torch.Tensor, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """Truncated (+-2 std) normal with std 1/sqrt(fan_in), not rescaled after truncation (torch's
    trunc_normal_; the puzzle HRM's trunc_normal_init_ rescales): the LM's init since its first version."""
    std = 1.0 / math.sqrt(fan_in)
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=generator)


def self_attention(cfg: "HRMLanguageModelConfig", causal: bool) -> Attention:
    D, H = cfg.hidden_size, cfg.num_heads
    return Attention(D, D // H, H, H, causal=causal, backend=cfg.attn_backend)


class FeedForward(nn.Module):
    """The encoder's FFN sublayer: dense SwiGLU or MoE; always returns (y, aux_loss, drop_frac)."""

    def __init__(self, cfg: "HRMLanguageModelConfig"):
        super().__init__()
        D = cfg.hidden_size
        if cfg.encoder_ffn == "moe":
            self.ffn = MoEFeedForward(D, cfg.moe_num_experts, cfg.moe_top_k, cfg.moe_capacity_factor,
                                      cfg.moe_ff_multiplier, cfg.moe_dropout)
        else:
            self.ffn = SwiGLU(D, cfg.expansion, multiple_of=SWIGLU_MULTIPLE_OF)

    def forward(self, x, mask, generator=None):
        if isinstance(self.ffn, MoEFeedForward):
            return self.ffn(x, mask, generator)
        zero = x.new_zeros((), dtype=torch.float32)
        return self.ffn(x), zero, zero


class TransformerEncoderBlock(nn.Module):
    """Pre-norm bidirectional block over the prompt."""

    def __init__(self, cfg: "HRMLanguageModelConfig"):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.attn = self_attention(cfg, causal=False)
        self.norm2 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, mask, rope, generator=None):
        x = x + self.attn(self.norm1(x), rope, key_mask=mask)
        y, aux, drop = self.ffn(self.norm2(x), mask, generator)
        return x + y, aux, drop


class MambaEncoderBlock(nn.Module):
    """Pre-norm Mamba2 mixer with residual, then an optional FFN sublayer (dense or MoE)."""

    def __init__(self, cfg: "HRMLanguageModelConfig", mamba_cls):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.mixer = mamba_cls(d_model=D, d_state=cfg.mamba_d_state, d_conv=cfg.mamba_d_conv,
                               expand=cfg.mamba_expand, headdim=cfg.mamba_headdim, ngroups=cfg.mamba_ngroups,
                               chunk_size=cfg.mamba_chunk_size)
        self.has_ffn = cfg.encoder_ffn != "none"
        if self.has_ffn:
            self.norm2 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
            self.ffn = FeedForward(cfg)

    def forward(self, x, mask, rope, generator=None):
        # Prompts are right-padded and the scan is causal, so padding never reaches a real position;
        # zeroing it keeps padded states at exactly 0 regardless.
        keep = mask.unsqueeze(-1).to(x.dtype)
        x = x + self.mixer(self.norm1(x)) * keep
        if not self.has_ffn:
            zero = x.new_zeros((), dtype=torch.float32)
            return x, zero, zero
        y, aux, drop = self.ffn(self.norm2(x), mask, generator)
        return x + y * keep, aux, drop


class PromptEncoder(nn.Module):
    """Encoder stack over the prompt tokens. `backend` names what really runs; it is logged, never guessed."""

    def __init__(self, cfg: "HRMLanguageModelConfig"):
        super().__init__()
        if cfg.encoder == "mamba2":
            try:
                from models.mamba2 import Mamba2
            except ImportError as e:
                raise ConfigError(f"arch.encoder=mamba2 but models.mamba2.Mamba2 cannot be imported ({e}); "
                                  "use arch.encoder=transformer") from None
            self.layers = nn.ModuleList(MambaEncoderBlock(cfg, Mamba2) for _ in range(cfg.encoder_layers))
            scan = getattr(self.layers[0].mixer, "backend", "unknown") if cfg.encoder_layers else "none"
            self.backend = f"mamba2[{scan}]"
            self.rotary = None
        else:
            self.layers = nn.ModuleList(TransformerEncoderBlock(cfg) for _ in range(cfg.encoder_layers))
            self.backend = "transformer"
            self.rotary = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, 0, cfg.rope_theta)
        if cfg.encoder_ffn == "moe":
            self.backend += f"+moe(E={cfg.moe_num_experts},k={cfg.moe_top_k})"
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, generator=None):
        """x [B, Lp, D] embedded prompt, mask [B, Lp] -> (states [B, Lp, D], moe aux mean, moe drop mean)."""
        rope = self.rotary(torch.arange(x.shape[1], device=x.device)) if self.rotary is not None else None
        aux_total = x.new_zeros((), dtype=torch.float32)
        drop_total = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, aux, drop = layer(x, mask, rope, generator)
            aux_total = aux_total + aux
            drop_total = drop_total + drop
        n = max(len(self.layers), 1)
        return self.norm(x) * mask.unsqueeze(-1).to(x.dtype), aux_total / n, drop_total / n


def reasoning_module(cfg: "HRMLanguageModelConfig", num_layers: int) -> ReasoningModule:
    """The puzzle HRM's post-norm blocks (bidirectional attention over the prompt's token states)."""
    return ReasoningModule([PostNormBlock(cfg.hidden_size, cfg.num_heads, cfg.expansion, cfg.rms_norm_eps,
                                          attn_backend=cfg.attn_backend, swiglu_multiple_of=SWIGLU_MULTIPLE_OF)
                            for _ in range(num_layers)])


class DecoderBlock(nn.Module):
    def __init__(self, cfg: "HRMLanguageModelConfig"):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_heads
        self.norm1 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.self_attn = self_attention(cfg, causal=True)
        self.norm2 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(D, D // H, H, H, backend=cfg.attn_backend)
        self.norm3 = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
        self.mlp = SwiGLU(D, cfg.expansion, multiple_of=SWIGLU_MULTIPLE_OF)

    def forward(self, x, rope, memory_kv, memory_mask, cache=None):
        x = x + self.self_attn(self.norm1(x), rope, cache=cache)
        x = x + self.cross_attn(self.norm2(x), memory_kv, memory_mask)
        return x + self.mlp(self.norm3(x))

# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

@dataclass
class HRMLanguageModelConfig:
    vocab_size: int
    # Injected by the trainer from the dataset metadata; seq_len/batch_size are informational here.
    batch_size: int = 0
    seq_len: int = 0
    num_puzzle_identifiers: int = 0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    # Longest prompt accepted at generation: 0 = seq_len (the training length the trainer injects), -1 = no limit.
    max_prompt_len: int = 0

    hidden_size: int = 256
    num_heads: int = 4
    expansion: float = 4.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attn_backend: str = "auto"  # auto | sdpa | math (models/layers.py)

    # Encoder over the prompt
    encoder: str = "mamba2"  # mamba2 | transformer
    encoder_layers: int = 2
    encoder_ffn: str = "swiglu"  # swiglu | moe | none (none: Mamba2 only)
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_headdim: int = 32
    mamba_ngroups: int = 1
    mamba_chunk_size: int = 64
    moe_num_experts: int = 4
    moe_top_k: int = 1
    moe_capacity_factor: float = 1.25
    moe_ff_multiplier: float = 4.0
    moe_dropout: float = 0.0
    moe_aux_loss_weight: float = 0.01

    # Reasoning core: hrm = two modules (L_level, H_level), 1-step gradient; trm = one network (L_level,
    # L_layers blocks; H_layers unused), last outer cycle fully backpropagated.
    core: str = "hrm"
    H_layers: int = 2
    L_layers: int = 2
    H_cycles: int = 2
    L_cycles: int = 2
    halt_max_steps: int = 2
    # Halting. "improvement": p_s is trained (BCE) toward 1 where one more segment would lower the row's
    # decoder CE by less than halt_tolerance nats, and a row halts at the first p_s >= halt_threshold (an
    # LM analogue of HRM's q_halt). "sum_target": the seed's regularizer (sum_s p_s - halting_target)^2, and
    # a row halts once its running sum of p_s reaches halt_threshold.
    halt_objective: str = "improvement"
    halt_threshold: float = 0.5
    halt_tolerance: float = 0.01

    # Gated bridge
    # token: one gate per prompt token | channel: one per token and channel | off: gate held at 0 and the
    # core not run (the "core removed" ablation: same encoder, memory layout and decoder)
    gate_mode: str = "token"
    gate_init_bias: float = 0.0
    hrm_gate_warmup_steps: int = 0  # optimizer steps with the gate held at exactly 0
    hrm_gate_ramp_steps: int = 0  # then a linear ramp of gate_scale from 0 to 1 over this many steps
    # Training-only minimum gate g = floor + (1 - floor) sigmoid(.), from the end of the warmup; the floor
    # decays linearly to 0 over gate_floor_steps (0 = held for the whole run). Eval uses the learned gate.
    gate_floor: float = 0.0
    gate_floor_steps: int = 0

    # Decoder
    decoder_layers: int = 2

    # Training objectives (read by the loss head)
    ds_weight: float = 0.1  # weight of each earlier segment's decoder loss; the final segment has weight 1
    # Per-segment deep-supervision weights [w_1 .. w_S] (S = halt_max_steps; w_S weighs the final segment);
    # empty = [ds_weight] * (S - 1) + [1].
    ds_segment_weights: list = dataclasses.field(default_factory=list)
    halting_weight: float = 0.01
    halting_target: float = 1.0  # sum_target objective: target of sum_s p_s
    seed: int = 0  # seeds the MoE dropout generator


GATE_MODES = ("token", "channel", "off")


def validate_config(c: HRMLanguageModelConfig) -> None:
    def bad(key, msg):
        raise ConfigError(f"config key 'arch.{key}' {msg}")

    if c.vocab_size <= 0:
        bad("vocab_size", f"must be > 0, got {c.vocab_size}")
    if c.hidden_size % c.num_heads or (c.hidden_size // c.num_heads) % 2:
        bad("num_heads", f"must divide hidden_size={c.hidden_size} into an even head size, got {c.num_heads}")
    if c.encoder not in ("mamba2", "transformer"):
        bad("encoder", f"must be 'mamba2' or 'transformer', got {c.encoder!r}")
    if c.encoder_ffn not in ("swiglu", "moe", "none"):
        bad("encoder_ffn", f"must be 'swiglu', 'moe' or 'none', got {c.encoder_ffn!r}")
    if c.encoder_ffn == "none" and c.encoder != "mamba2":
        bad("encoder_ffn", "'none' is only allowed with encoder=mamba2")
    if c.encoder_ffn == "moe" and not 1 <= c.moe_top_k <= c.moe_num_experts:
        bad("moe_top_k", f"must be in [1, moe_num_experts={c.moe_num_experts}], got {c.moe_top_k}")
    if c.halt_objective not in ("improvement", "sum_target"):
        bad("halt_objective", f"must be 'improvement' or 'sum_target', got {c.halt_objective!r}")
    if c.core not in RECURSIONS:
        bad("core", f"must be one of {', '.join(RECURSIONS)}, got {c.core!r}")
    if c.attn_backend not in ATTN_BACKENDS or c.attn_backend == "flash":
        # flash-attn takes no key padding mask and the prompts are padded; auto still uses it for the
        # decoder's (unpadded, causal) self-attention on CUDA.
        allowed = ", ".join(b for b in ATTN_BACKENDS if b != "flash")
        bad("attn_backend", f"must be one of {allowed} (flash-attn takes no padding mask; 'auto' uses it where "
            f"no mask is needed), got {c.attn_backend!r}")
    if c.gate_mode not in GATE_MODES:
        bad("gate_mode", f"must be one of {', '.join(GATE_MODES)}, got {c.gate_mode!r}")
    if not 0.0 <= c.gate_floor < 1.0:
        bad("gate_floor", f"must be in [0, 1), got {c.gate_floor}")
    for key in ("gate_floor_steps", "hrm_gate_warmup_steps", "hrm_gate_ramp_steps"):
        if getattr(c, key) < 0:
            bad(key, f"must be >= 0, got {getattr(c, key)}")
    if c.ds_weight < 0:
        bad("ds_weight", f"must be >= 0, got {c.ds_weight}")
    w = c.ds_segment_weights
    if w and (len(w) != c.halt_max_steps or not all(isinstance(x, (int, float)) and x >= 0 for x in w) or w[-1] <= 0):
        bad("ds_segment_weights", f"must be empty or {c.halt_max_steps} numbers >= 0 (one per segment, "
            f"halt_max_steps={c.halt_max_steps}) with the final one > 0, got {list(w)}")
    for key in ("halting_weight", "halt_tolerance"):
        if getattr(c, key) < 0:
            bad(key, f"must be >= 0, got {getattr(c, key)}")
    for key in ("H_cycles", "L_cycles", "halt_max_steps", "H_layers", "L_layers", "decoder_layers"):
        if getattr(c, key) < 1:
            bad(key, f"must be >= 1, got {getattr(c, key)}")
    if not 0.0 <= c.moe_dropout < 1.0:
        bad("moe_dropout", f"must be in [0, 1), got {c.moe_dropout}")


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------

class HRMLanguageModel(LMGeneration, nn.Module):
    config_class = HRMLanguageModelConfig
    # Checkpoints written before the LM moved onto the shared blocks (models/layers.py, 2026-12) name the
    # same tensors attn.qkv/o, cross_attn.q/kv/o, mlp.gate_up/down and, in the core, layers.<i>.attn;
    # models.common.rename_legacy_keys maps them to today's names when a checkpoint loads.
    legacy_key_renames = ((r"^((?:L|H)_level\.layers\.\d+\.)attn\.", r"\1self_attn."),
                          (r"\.(qkv|o|q|kv|gate_up|down)\.weight$", r".\1_proj.weight"))

    def __init__(self, config_dict: dict, generator: torch.Generator | None = None):
        super().__init__()
        self.config = cfg = from_dict(HRMLanguageModelConfig, dict(config_dict), where="arch")
        validate_config(cfg)
        D = cfg.hidden_size
        self.embed_scale = math.sqrt(D)
        # Every initial weight comes from this generator (default: seeded by arch.seed); the modules' own
        # default inits run inside fork_rng so that building the model leaves the global RNG untouched.
        generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            # Shared by encoder and decoder (one vocabulary).
            self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
            self.encoder = PromptEncoder(cfg)

            # HRM / TRM core (RoPE tables computed for the positions asked for: prompts have no fixed length)
            self.rotary = RotaryEmbedding(D // cfg.num_heads, 0, cfg.rope_theta)
            self.hrm_in = CastedLinear(D, D, bias=False)
            self.L_level = reasoning_module(cfg, cfg.L_layers)
            if cfg.core == "hrm":
                self.H_level = reasoning_module(cfg, cfg.H_layers)
            # Fixed (untrained) initial states, persistent so a checkpoint reproduces the same trajectory.
            self.register_buffer("H_init", torch.empty(D))
            self.register_buffer("L_init", torch.empty(D))
            self.halt_head = CastedLinear(D, 1, bias=True)

            # Gated bridge
            # gate_mode=off keeps the token gate's (unused) shape, so that every other weight draws the same
            # init from the seed as in the gated model: the ablation arms start from identical encoder/decoder.
            self.gate_proj = CastedLinear(D, D if cfg.gate_mode == "channel" else 1, bias=True)
            self.hrm_out = CastedLinear(D, D, bias=False)
            self.hrm_null = nn.Parameter(torch.empty(D))  # what a closed gate passes on
            self.memory_null = nn.Parameter(torch.empty(D))  # always-valid memory slot
            opened = cfg.hrm_gate_warmup_steps == 0 and cfg.gate_mode != "off"
            self.register_buffer("gate_scale", torch.tensor(1.0 if opened else 0.0))
            # A schedule value like gate_scale, but training-only, so not part of a checkpoint.
            self.register_buffer("gate_floor_now", torch.tensor(self.gate_floor_at(0)), persistent=False)

            # Decoder
            self.decoder_layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
            self.decoder_norm = nn.RMSNorm(D, eps=cfg.rms_norm_eps)
            self.lm_head = CastedLinear(D, cfg.vocab_size, bias=False)
        self.reset_parameters(generator)
        log.info("HRMLanguageModel encoder backend: %s", self.encoder.backend)

        self._dropout_generator: torch.Generator | None = None
        self.num_segment_calls = 0  # segments run on at least one row (Python int; tests count compute)
        self.num_segment_rows = 0  # sum over segment calls of the rows they processed

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Draw every weight from `generator`, in module order: Linear = truncated LeCun normal, zero bias;
        embeddings std 1/sqrt(D) (times sqrt(D) at lookup = unit scale); RMSNorm gains 1; Mamba2 and MoE
        use their own reset_parameters(generator). Then the special cases below."""
        cfg = self.config
        D = cfg.hidden_size

        def visit(module: nn.Module) -> None:
            if isinstance(module, MoEFeedForward) or type(module).__name__ == "Mamba2":
                module.reset_parameters(generator)  # owns its children's init
                return
            if isinstance(module, (nn.Linear, CastedLinear)):
                lecun_normal_(module.weight, module.weight.shape[1], generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                lecun_normal_(module.weight, D, generator)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()
            for child in module.children():
                visit(child)

        visit(self)
        nn.init.trunc_normal_(self.H_init, std=1.0, a=-2.0, b=2.0, generator=generator)
        nn.init.trunc_normal_(self.L_init, std=1.0, a=-2.0, b=2.0, generator=generator)
        lecun_normal_(self.hrm_null, D, generator)
        lecun_normal_(self.memory_null, D, generator)
        # Halting head starts input-independent: improvement -> p = sigmoid(-2) = 0.12, below any sensible
        # threshold, so an untrained model runs every segment; sum_target -> p_s = 1/halt_max_steps, so
        # sum_s p_s starts at the default target of 1.
        self.halt_head.weight.zero_()
        p0 = 1.0 / cfg.halt_max_steps
        if cfg.halt_objective == "improvement":
            self.halt_head.bias.fill_(-2.0)
        else:
            self.halt_head.bias.fill_(math.log(p0 / (1 - p0)) if p0 < 1 else 0.0)
        self.gate_proj.bias.fill_(cfg.gate_init_bias)
        # HRM memory projection starts at zero, so opening the gate is at first an exact no-op: the decoder,
        # which co-adapted with m_null during warmup, is not perturbed, and the gate gets no gradient until
        # W_m carries something. (With random W_m, or with g scaling m_null itself, Adam shut the gate to
        # ~1e-4 within 100 steps of opening on tinyshakespeare, saturating the sigmoid.)
        self.hrm_out.weight.zero_()

    @property
    def prompt_limit(self) -> int:
        """Longest prompt generation accepts (0 = unlimited)."""
        c = self.config
        return max(c.max_prompt_len, 0) if c.max_prompt_len != 0 else max(c.seq_len, 0)

    # ---- schedule hooks -------------------------------------------------------------------------
    def gate_scale_at(self, step: int) -> float:
        c = self.config
        if c.gate_mode == "off" or step < c.hrm_gate_warmup_steps:
            return 0.0
        if c.hrm_gate_ramp_steps <= 0:
            return 1.0
        return min(1.0, (step - c.hrm_gate_warmup_steps + 1) / c.hrm_gate_ramp_steps)

    def gate_floor_at(self, step: int) -> float:
        """Training-only minimum of the (pre-scale) gate: gate_floor from the end of the warmup, then a linear
        decay to 0 over gate_floor_steps (0 = held)."""
        c = self.config
        if c.gate_floor_steps <= 0:
            return c.gate_floor
        opened = max(step - c.hrm_gate_warmup_steps, 0)
        return c.gate_floor * max(0.0, 1.0 - opened / c.gate_floor_steps)

    def set_gate_schedule(self, step: int) -> None:
        self.gate_scale.fill_(self.gate_scale_at(step))
        self.gate_floor_now.fill_(self.gate_floor_at(step))

    def segment_loss_weights(self) -> list[float]:
        """Deep-supervision weight of each segment's decoder loss, the final segment's last."""
        c = self.config
        if c.ds_segment_weights:
            return [float(w) for w in c.ds_segment_weights]
        return [c.ds_weight] * (c.halt_max_steps - 1) + [1.0]

    @property
    def core_enabled(self) -> bool:
        return self.config.gate_mode != "off"

    # ---- pieces ---------------------------------------------------------------------------------
    def _generator(self, device) -> torch.Generator | None:
        if not (self.training and self.config.encoder_ffn == "moe" and self.config.moe_dropout > 0):
            return None
        if self._dropout_generator is None or self._dropout_generator.device != torch.device(device):
            self._dropout_generator = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._dropout_generator

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids) * self.embed_scale

    def encode(self, encoder_ids: torch.Tensor, encoder_mask: torch.Tensor):
        """-> (states [B,Lp,D], key mask [B,Lp], moe aux, moe drop). The key mask marks position 0 valid in
        an empty prompt so that attention never sees a row without keys (that row's states are zeros)."""
        mask = encoder_mask.bool()
        key_mask = mask.clone()
        key_mask[:, 0] |= ~mask.any(-1)
        states, aux, drop = self.encoder(self.embed(encoder_ids), key_mask, self._generator(encoder_ids.device))
        return states, key_mask, aux, drop

    def initial_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        return self.H_init.to(x.dtype).expand(shape).clone(), self.L_init.to(x.dtype).expand(shape).clone()

    def reason_segment(self, z_H, z_L, x, mask, rope):
        """One segment of the configured core (arch.core, models/recursion.py) over the prompt positions.
        Inputs must be detached carries."""
        c = self.config
        self.num_segment_calls += 1
        self.num_segment_rows += z_H.shape[0]
        f_H = self.H_level if c.core == "hrm" else self.L_level  # TRM: one network for both updates

        def L_step(z_L, z_H, x):
            return self.L_level(z_L, z_H + x, cos_sin=rope, key_mask=mask)

        def H_step(z_H, z_L):
            return f_H(z_H, z_L, cos_sin=rope, key_mask=mask)

        return RECURSIONS[c.core](z_H, z_L, x, L_step, H_step, c.H_cycles, c.L_cycles)

    def halt_prob(self, z_H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask.unsqueeze(-1).to(z_H.dtype)
        pooled = (z_H * w).sum(1) / w.sum(1).clamp_min(1.0)
        return torch.sigmoid(self.halt_head(pooled).float().squeeze(-1))  # [B]

    def bridge(self, enc_states, z_H, key_mask):
        """-> memory [B, 1+2Lp, D], memory mask [B, 1+2Lp], effective gate [B, Lp, 1|D].
        z_H None (gate_mode=off): the HRM half is the null memory, exactly what a gate of 0 passes on."""
        if z_H is None:
            hrm_mem = self.hrm_null.to(enc_states.dtype).expand_as(enc_states)
            gate = enc_states.new_zeros(enc_states.shape[:2] + (1,))
        else:
            gate = torch.sigmoid(self.gate_proj(z_H))
            if self.training:  # 0 + (1 - 0) * g == g exactly, so a zero floor changes nothing
                floor = self.gate_floor_now.to(gate.dtype)
                gate = floor + (1 - floor) * gate
            gate = self.gate_scale.to(z_H.dtype) * gate
            # g * (m_null + W_m z_H) + (1 - g) * m_null, written in its cheaper, equal form.
            hrm_mem = self.hrm_null.to(z_H.dtype) + gate * self.hrm_out(z_H)
        B = enc_states.shape[0]
        null = self.memory_null.to(enc_states.dtype).expand(B, 1, -1)
        memory = torch.cat([null, enc_states, hrm_mem], dim=1)
        ones = torch.ones(B, 1, dtype=torch.bool, device=key_mask.device)
        return memory, torch.cat([ones, key_mask, key_mask], dim=1), gate

    def memory_kv(self, memory):
        return [layer.cross_attn.project_memory(memory) for layer in self.decoder_layers]

    def decode(self, decoder_input_ids, memory_kv, memory_mask, caches=None, start_pos: int = 0):
        """decoder_input_ids [B, Lt] -> logits [B, Lt, V] (float32)."""
        h = self.embed(decoder_input_ids)
        rope = self.rotary(torch.arange(start_pos, start_pos + h.shape[1], device=h.device))
        for i, layer in enumerate(self.decoder_layers):
            h = layer(h, rope, memory_kv[i], memory_mask, None if caches is None else caches[i])
        return self.lm_head(self.decoder_norm(h)).float()

    @staticmethod
    def gate_stats(gate: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Means over valid prompt tokens (and channels); saturation = share of gates < 0.05 or > 0.95."""
        g = gate.detach().float()
        m = mask.unsqueeze(-1).expand_as(g)
        n = m.sum().clamp_min(1)
        inf = torch.tensor(float("inf"), device=g.device)
        return {
            "gate/mean": (g * m).sum() / n,
            "gate/min": torch.where(m, g, inf).amin(),
            "gate/max": torch.where(m, g, -inf).amax(),
            "gate/saturation": (((g < 0.05) | (g > 0.95)) & m).sum() / n,
        }

    # ---- full passes ----------------------------------------------------------------------------
    def forward(self, encoder_ids, encoder_mask, decoder_input_ids, decoder_mask=None, **_unused) -> dict:
        """Training (self.training): every segment runs; returns per-segment logits for deep supervision.
        Eval: per-row adaptive halting, one decoder pass on each row's final memory.

        Returns a dict with logits [B,Lt,V] (final), segment_logits (list, training; last = logits),
        halt_probs [B, S], steps [B] (segments each row ran), gate stats, moe_aux, moe_drop,
        encoder_states [B,Lp,D]."""
        if self.training:
            return self._forward_train(encoder_ids, encoder_mask, decoder_input_ids)
        enc, key_mask, aux, drop = self.encode(encoder_ids, encoder_mask)
        z_H, halt_probs, steps = self.reason_adaptive(enc, key_mask)
        memory, mem_mask, gate = self.bridge(enc, z_H, key_mask)
        logits = self.decode(decoder_input_ids, self.memory_kv(memory), mem_mask)
        return dict(logits=logits, halt_probs=halt_probs, steps=steps, moe_aux=aux, moe_drop=drop,
                    encoder_states=enc, **self.gate_stats(gate, key_mask))

    def _forward_train(self, encoder_ids, encoder_mask, decoder_input_ids) -> dict:
        c = self.config
        enc, key_mask, aux, drop = self.encode(encoder_ids, encoder_mask)
        if not self.core_enabled:
            memory, mem_mask, gate = self.bridge(enc, None, key_mask)
            logits = self.decode(decoder_input_ids, self.memory_kv(memory), mem_mask)
            B = enc.shape[0]
            return dict(logits=logits, segment_logits=[logits], halt_probs=enc.new_zeros(B, 0, dtype=torch.float32),
                        steps=torch.zeros(B, dtype=torch.long, device=enc.device), moe_aux=aux, moe_drop=drop,
                        encoder_states=enc, **self.gate_stats(gate, key_mask))
        x = self.hrm_in(enc)
        rope = self.rotary(torch.arange(enc.shape[1], device=enc.device))
        z_H, z_L = self.initial_state(enc)
        weights = self.segment_loss_weights()
        segment_logits, halt_probs = [], []
        for s in range(c.halt_max_steps):
            z_H, z_L = self.reason_segment(z_H.detach(), z_L.detach(), x, key_mask, rope)
            halt_probs.append(self.halt_prob(z_H, key_mask))
            last = s == c.halt_max_steps - 1
            if last or weights[s] > 0 or c.halt_objective == "improvement":
                # Deep-supervision passes go through the same gate as the final one.
                memory, mem_mask, gate = self.bridge(enc, z_H, key_mask)
                segment_logits.append(self.decode(decoder_input_ids, self.memory_kv(memory), mem_mask))
            else:
                segment_logits.append(None)  # weight 0 and no halting target needs it: not decoded
        steps = torch.full((enc.shape[0],), c.halt_max_steps, device=enc.device)
        return dict(logits=segment_logits[-1], segment_logits=segment_logits, halt_probs=torch.stack(halt_probs, 1),
                    steps=steps, moe_aux=aux, moe_drop=drop, encoder_states=enc, **self.gate_stats(gate, key_mask))

    @torch.no_grad()
    def reason_adaptive(self, enc: torch.Tensor, key_mask: torch.Tensor):
        """Inference HRM loop with per-row halting: a row stops after the segment where its halting
        probability (halt_objective=improvement) or running sum of halting probabilities (sum_target)
        reaches halt_threshold, or at halt_max_steps. Only still-running rows are
        computed, and the loop ends when none is left (one host sync per segment, inference only).
        -> final z_H [B,Lp,D], halt_probs [B, halt_max_steps] (0 after halting), steps [B].
        gate_mode=off: (None, [B, 0], zeros): no segment runs."""
        c = self.config
        B = enc.shape[0]
        if not self.core_enabled:
            return None, enc.new_zeros(B, 0, dtype=torch.float32), torch.zeros(B, dtype=torch.long, device=enc.device)
        x = self.hrm_in(enc)
        rope = self.rotary(torch.arange(enc.shape[1], device=enc.device))
        z_H, z_L = self.initial_state(enc)
        final_H = z_H.clone()
        halt_probs = enc.new_zeros(B, c.halt_max_steps, dtype=torch.float32)
        steps = torch.zeros(B, dtype=torch.long, device=enc.device)
        cum = enc.new_zeros(B, dtype=torch.float32)
        active = torch.arange(B, device=enc.device)
        for s in range(c.halt_max_steps):
            m = key_mask[active]
            h, l = self.reason_segment(z_H[active], z_L[active], x[active], m, rope)
            p = self.halt_prob(h, m)
            z_H[active], z_L[active] = h, l
            halt_probs[active, s] = p
            cum[active] += p
            steps[active] = s + 1
            crit = cum[active] if c.halt_objective == "sum_target" else p
            done = (crit >= c.halt_threshold) | (s == c.halt_max_steps - 1)
            final_H[active[done]] = h[done]
            active = active[~done]
            if active.numel() == 0:
                break
        return final_H, halt_probs, steps

    # ---- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_generation(self, encoder_ids: torch.Tensor, encoder_mask: torch.Tensor) -> dict:
        """Encode the prompt, reason with adaptive halting, project the memory for every decoder layer."""
        enc, key_mask, _, _ = self.encode(encoder_ids, encoder_mask)
        z_H, halt_probs, steps = self.reason_adaptive(enc, key_mask)
        memory, mem_mask, gate = self.bridge(enc, z_H, key_mask)
        stats = self.gate_stats(gate, key_mask)
        return dict(memory_kv=self.memory_kv(memory), memory_mask=mem_mask, caches=[{} for _ in self.decoder_layers],
                    pos=0, steps=steps, halt_probs=halt_probs, gate_stats=stats, gate_mean=stats["gate/mean"])

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, state: dict) -> torch.Tensor:
        """tokens [B] (the newest decoder input) -> next-token logits [B, V]; updates the KV caches."""
        logits = self.decode(tokens[:, None], state["memory_kv"], state["memory_mask"], state["caches"], state["pos"])
        state["pos"] += 1
        return logits[:, -1]

    @torch.no_grad()
    def decode_prefix(self, decoder_input_ids: torch.Tensor, state: dict) -> torch.Tensor:
        """decoder_input_ids [B, t] (BOS first) -> the last position's next-token logits [B, V], without the
        KV cache (the prompt's memory is still computed once, in prepare_generation)."""
        return self.decode(decoder_input_ids, state["memory_kv"], state["memory_mask"])[:, -1]

    def estimate_flops(self, batch_size: int) -> float:
        """Rough FLOPs of one training step: 6 * params * tokens for the encoder and decoder (fwd + bwd),
        plus, per segment, 2 FLOPs/param/token forward for the no-grad core updates and 6 for the
        differentiated ones (hrm: the last L and H update; trm: the last outer cycle's L_cycles + 1).
        Attention score FLOPs are ignored. Token counts use seq_len for both sides."""
        c = self.config
        L = max(c.seq_len, 1)

        def params(m):
            return sum(p.numel() for p in m.parameters())

        enc = params(self.encoder) + params(self.embed_tokens)
        dec = params(self.decoder_layers) + params(self.lm_head)
        per_L = params(self.L_level)
        per_H = params(self.H_level) if c.core == "hrm" else per_L
        if c.core == "hrm":
            nograd = (c.H_cycles * c.L_cycles - 1) * per_L + (c.H_cycles - 1) * per_H
            grad = per_L + per_H
        else:
            nograd = (c.H_cycles - 1) * (c.L_cycles + 1) * per_L
            grad = (c.L_cycles + 1) * per_L
        if not self.core_enabled:
            return float((6 * enc + 6 * dec) * L * batch_size)
        weights = self.segment_loss_weights()
        dec_passes = c.halt_max_steps if c.halt_objective == "improvement" else sum(1 for w in weights[:-1] if w > 0) + 1
        per_token = 6 * enc + dec_passes * 6 * dec + c.halt_max_steps * (2 * nograd + 6 * grad)
        return float(per_token * L * batch_size)

