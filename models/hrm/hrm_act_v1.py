"""HRM with adaptive computation time (ACT), v1: the model of sapientinc/HRM, optionally gated.

Two recurrent transformer modules share one segment of computation:
    for i in H_cycles:  for j in L_cycles:  z_L = f_L(z_L, z_H + x)      (low level, fast)
                        z_H = f_H(z_H, z_L)                                (high level, slow)
Only the last f_L call and the last f_H call are differentiated ("1-step gradient"); the carry
(z_H, z_L) is detached between segments. An ACT wrapper runs one segment per call, keeps the carry
of unfinished rows, refills halted rows with new data and decides halting with a Q-head.

Everything (keys, init order, state-dict names, numerics) follows the original so that its released
checkpoints load strictly; see docs for the few deliberate additions (gating, attention backend,
explicit RNG for halting exploration).

Randomness:
- init draws from the torch generator passed as `generator=` to the constructor, else from the
  global RNG (as the original, whose trainer seeds it);
- halting exploration draws from `self.generator`; set it with `model.set_generator(gen)`, else a
  generator seeded with 0 is created on the model's device at the first training step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.common import trunc_normal_init_
from models.layers import (ATTN_BACKENDS, CastedEmbedding, CastedLinear, CosSin, PostNormBlock, RotaryEmbedding,
                           swiglu_intermediate_size)
from models.recursion import Hook, ReasoningModule, hrm_recursion
from models.sparse_embedding import CastedSparseEmbedding
from utils.schema import ConfigError, from_dict

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# carries


@dataclass
class HierarchicalReasoningModel_ACTV1InnerCarry:
    z_H: torch.Tensor  # [B, S, D] forward dtype
    z_L: torch.Tensor  # [B, S, D]


@dataclass
class HierarchicalReasoningModel_ACTV1Carry:
    inner_carry: HierarchicalReasoningModel_ACTV1InnerCarry
    steps: torch.Tensor  # [B] int32, segments run on the current example
    halted: torch.Tensor  # [B] bool, the row takes a new example at the next call
    current_data: dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# blocks


class HierarchicalReasoningModel_ACTV1Block(PostNormBlock):
    """The shared post-norm attention block (models/layers.py) built from the HRM config."""

    def __init__(self, config: "HierarchicalReasoningModel_ACTV1Config", generator: Optional[torch.Generator] = None):
        super().__init__(config.hidden_size, config.num_heads, config.expansion, config.rms_norm_eps,
                         attn_backend=config.attn_backend, generator=generator)


class HRMGate(nn.Module):
    """Per-token, per-channel sigmoid gates for the n_inputs summed into a module's input.

    concat(inputs) [.., n*D] -> Linear(n*D -> r*D) -> SiLU -> Linear(r*D -> n*D) -> sigmoid, split in n.
    The output bias starts at `init_bias` (-2.2 -> gates ~0.1)."""

    def __init__(self, hidden_size: int, n_inputs: int, hidden_ratio: float, init_bias: float,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.n_inputs = n_inputs
        inner = max(1, int(round(hidden_ratio * hidden_size)))
        self.fc_in = CastedLinear(n_inputs * hidden_size, inner, bias=True, generator=generator)
        self.fc_out = CastedLinear(inner, n_inputs * hidden_size, bias=True, generator=generator)
        with torch.no_grad():
            self.fc_out.bias.fill_(init_bias)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """-> gates [n, B, S, D] in the inputs' dtype."""
        g = torch.sigmoid(self.fc_out(F.silu(self.fc_in(torch.cat(inputs, dim=-1)))))
        return torch.stack(g.chunk(self.n_inputs, dim=-1))


class HierarchicalReasoningModel_ACTV1ReasoningModule(ReasoningModule):
    """A stack of blocks applied to (own state + other state [+ injection]).

    Ungated, this is the original: `layers(z_self + (z_other + x))` for L (the original adds
    z_H + x first, and bf16 addition order matters) and `layers(z_H + z_L)` for H. Gated, the input is
    `g_self*z_self + g_other*z_other [+ g_x*x]`; the H module has no injection and hence no gate for it."""

    def __init__(self, layers: list[HierarchicalReasoningModel_ACTV1Block], gate: Optional[HRMGate] = None):
        super().__init__(layers)
        self.gate = gate  # None: the original ungated module (no extra state-dict keys)

    def update(self, z_self: torch.Tensor, z_other: torch.Tensor, x: Optional[torch.Tensor],
               cos_sin: Optional[CosSin]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One call of this module; returns (new state, gates [n, B, S, D] or None)."""
        if self.gate is None:
            return self(z_self, z_other if x is None else z_other + x, cos_sin=cos_sin), None
        if x is None:
            gates = self.gate(z_self, z_other)
            h = gates[0] * z_self + gates[1] * z_other
        else:
            gates = self.gate(z_self, z_other, x)
            h = gates[0] * z_self + gates[1] * z_other + gates[2] * x
        for layer in self.layers:
            h = layer(h, cos_sin=cos_sin)
        return h, gates


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class HierarchicalReasoningModel_ACTV1Config:
    # injected by the trainer from the train split's metadata / world size
    batch_size: int
    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int = 1
    puzzle_emb_ndim: int = 0

    H_cycles: int = 2
    L_cycles: int = 2
    H_layers: int = 4
    L_layers: int = 4

    hidden_size: int = 512
    expansion: float = 4.0
    num_heads: int = 8
    pos_encodings: str = "rope"  # "rope" | "learned"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1

    forward_dtype: str = "bfloat16"

    # additions of this project
    use_gating: bool = False
    gate_hidden_ratio: float = 0.25
    gate_init_bias: float = -2.2
    attn_backend: str = "auto"  # "auto" | "flash" | "sdpa"

    def __post_init__(self):
        def bad(key, expected):
            raise ConfigError(f"config key 'arch.{key}' expects {expected}, got {getattr(self, key)!r}")

        for key in ("batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "H_cycles", "L_cycles",
                    "H_layers", "L_layers", "hidden_size", "num_heads", "halt_max_steps"):
            if getattr(self, key) < 1:
                bad(key, "an integer >= 1")
        if self.puzzle_emb_ndim < 0:
            bad("puzzle_emb_ndim", "an integer >= 0")
        if self.hidden_size % self.num_heads != 0:
            raise ConfigError(f"config key 'arch.hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'arch.num_heads' ({self.num_heads})")
        if self.pos_encodings not in ("rope", "learned"):
            bad("pos_encodings", "'rope' or 'learned'")
        if self.forward_dtype not in DTYPES:
            bad("forward_dtype", "one of " + ", ".join(DTYPES))
        if self.attn_backend not in ATTN_BACKENDS:
            bad("attn_backend", "one of " + ", ".join(ATTN_BACKENDS))
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            bad("halt_exploration_prob", "a probability in [0, 1]")
        if self.gate_hidden_ratio <= 0:
            bad("gate_hidden_ratio", "a positive number")

    @property
    def puzzle_emb_len(self) -> int:
        return -(self.puzzle_emb_ndim // -self.hidden_size)  # ceil

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.forward_dtype]


# ----------------------------------------------------------------------------------------------
# inner model (one ACT segment)


def _gate_stats(prefix: str, gates: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    g = gates.detach().float()
    stats = {f"{prefix}/mean": g.mean(), f"{prefix}/min": g.amin(), f"{prefix}/max": g.amax(),
             f"{prefix}/frac_lt_0.1": (g < 0.1).float().mean(), f"{prefix}/frac_gt_0.9": (g > 0.9).float().mean()}
    for i, name in enumerate(names):
        stats[f"{prefix}/{name}_mean"] = g[i].mean()
    return stats


def _merge_stats(acc: Optional[dict], new: dict) -> dict:
    """Running aggregate over calls: means averaged (equal-sized calls), min/max combined."""
    if acc is None:
        return {k: [v] for k, v in new.items()}
    for k, v in new.items():
        acc[k].append(v)
    return acc


def _finish_stats(acc: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, vs in acc.items():
        stacked = torch.stack(vs)
        out[k] = stacked.amin() if k.endswith("/min") else stacked.amax() if k.endswith("/max") else stacked.mean()
    return out


class HierarchicalReasoningModel_ACTV1_Inner(nn.Module):
    def __init__(self, config: HierarchicalReasoningModel_ACTV1Config, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.config = config
        self.forward_dtype = config.dtype
        D = config.hidden_size
        # Module creation order = RNG consumption order of the original; do not reorder.
        self.embed_scale = math.sqrt(D)
        embed_init_std = 1.0 / self.embed_scale
        self.embed_tokens = CastedEmbedding(config.vocab_size, D, init_std=embed_init_std,
                                            cast_to=self.forward_dtype, generator=generator)
        self.lm_head = CastedLinear(D, config.vocab_size, bias=False, generator=generator)
        self.q_head = CastedLinear(D, 2, bias=True, generator=generator)

        self.puzzle_emb_len = config.puzzle_emb_len
        if config.puzzle_emb_ndim > 0:
            # Zero init (std 0), as the original.
            self.puzzle_emb = CastedSparseEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim,
                                                    batch_size=config.batch_size, init_std=0,
                                                    cast_to=self.forward_dtype)
        S = config.seq_len + self.puzzle_emb_len
        if config.pos_encodings == "rope":
            self.rotary_emb = RotaryEmbedding(D // config.num_heads, max_position_embeddings=S,
                                              base=config.rope_theta)
        else:
            self.embed_pos = CastedEmbedding(S, D, init_std=embed_init_std, cast_to=self.forward_dtype,
                                             generator=generator)

        self.H_level = HierarchicalReasoningModel_ACTV1ReasoningModule(
            [HierarchicalReasoningModel_ACTV1Block(config, generator) for _ in range(config.H_layers)])
        self.L_level = HierarchicalReasoningModel_ACTV1ReasoningModule(
            [HierarchicalReasoningModel_ACTV1Block(config, generator) for _ in range(config.L_layers)])

        # Fixed (untrained) initial states, persistent so checkpoints carry them.
        self.register_buffer("H_init", trunc_normal_init_(torch.empty(D, dtype=self.forward_dtype), std=1,
                                                          generator=generator), persistent=True)
        self.register_buffer("L_init", trunc_normal_init_(torch.empty(D, dtype=self.forward_dtype), std=1,
                                                          generator=generator), persistent=True)
        # Q-head starts at "never halt" (both logits -5), which makes early halting a learned decision.
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5)

        # Gates come after everything else so that enabling them leaves the other weights' init intact.
        if config.use_gating:
            self.L_level.gate = HRMGate(D, 3, config.gate_hidden_ratio, config.gate_init_bias, generator)
            self.H_level.gate = HRMGate(D, 2, config.gate_hidden_ratio, config.gate_init_bias, generator)

    def _input_embeddings(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        embedding = self.embed_tokens(inputs.to(torch.int32))  # [B, L, D]
        if self.config.puzzle_emb_ndim > 0:
            puzzle_embedding = self.puzzle_emb(puzzle_identifiers)  # [B, puzzle_emb_ndim]
            pad_count = self.puzzle_emb_len * self.config.hidden_size - puzzle_embedding.shape[-1]
            if pad_count > 0:
                puzzle_embedding = F.pad(puzzle_embedding, (0, pad_count))
            embedding = torch.cat((puzzle_embedding.view(-1, self.puzzle_emb_len, self.config.hidden_size),
                                   embedding), dim=-2)  # [B, S, D]
        if self.config.pos_encodings == "learned":
            # 1/sqrt(2) keeps the variance of the sum equal to that of one term.
            embedding = 0.707106781 * (embedding + self.embed_pos.embedding_weight.to(self.forward_dtype))
        return self.embed_scale * embedding

    def empty_carry(self, batch_size: int, device=None) -> HierarchicalReasoningModel_ACTV1InnerCarry:
        # Zeros rather than torch.empty: identical results (every row is reset before use) but deterministic.
        shape = (batch_size, self.config.seq_len + self.puzzle_emb_len, self.config.hidden_size)
        return HierarchicalReasoningModel_ACTV1InnerCarry(
            z_H=torch.zeros(shape, dtype=self.forward_dtype, device=device),
            z_L=torch.zeros(shape, dtype=self.forward_dtype, device=device))

    def reset_carry(self, reset_flag: torch.Tensor, carry: HierarchicalReasoningModel_ACTV1InnerCarry):
        flag = reset_flag.view(-1, 1, 1)
        return HierarchicalReasoningModel_ACTV1InnerCarry(z_H=torch.where(flag, self.H_init, carry.z_H),
                                                          z_L=torch.where(flag, self.L_init, carry.z_L))

    def forward(self, carry: HierarchicalReasoningModel_ACTV1InnerCarry, batch: dict[str, torch.Tensor],
                with_outputs: bool = True, collect_gate_stats: bool = True, hook: Optional[Hook] = None):
        """One segment. Returns (new_carry, logits [B, L, V] or None, (q_halt, q_continue) [B] fp32,
        gate stats dict). `hook`: see models/recursion.py."""
        cfg = self.config
        cos_sin = self.rotary_emb() if cfg.pos_encodings == "rope" else None
        x = self._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])  # [B, S, D], built with grad

        gated = cfg.use_gating and collect_gate_stats
        stats = {"L": None, "H": None}

        def L_step(z_L, z_H, x):
            z_L, g = self.L_level.update(z_L, z_H, x, cos_sin)
            if gated:
                stats["L"] = _merge_stats(stats["L"], _gate_stats("gate/L", g, ("self", "other", "x")))
            return z_L

        def H_step(z_H, z_L):
            z_H, g = self.H_level.update(z_H, z_L, None, cos_sin)
            if gated:
                stats["H"] = _merge_stats(stats["H"], _gate_stats("gate/H", g, ("self", "other")))
            return z_H

        # 1-step gradient: only the last L-call and the last H-call are differentiated.
        z_H, z_L = hrm_recursion(carry.z_H, carry.z_L, x, L_step, H_step, cfg.H_cycles, cfg.L_cycles, hook=hook)

        new_carry = HierarchicalReasoningModel_ACTV1InnerCarry(z_H=z_H.detach(), z_L=z_L.detach())
        logits = self.lm_head(z_H)[:, self.puzzle_emb_len:] if with_outputs else None
        # Q-head reads position 0 (the puzzle-embedding slot), like a CLS token.
        q_logits = self.q_head(z_H[:, 0]).to(torch.float32)
        gate_stats = {}
        if gated:
            gate_stats.update(_finish_stats(stats["L"]))
            gate_stats.update(_finish_stats(stats["H"]))
        return new_carry, logits, (q_logits[..., 0], q_logits[..., 1]), gate_stats


# ----------------------------------------------------------------------------------------------
# ACT wrapper


class HierarchicalReasoningModel_ACTV1(nn.Module):
    """ACT wrapper; `name: hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1`."""

    config_class = HierarchicalReasoningModel_ACTV1Config

    def __init__(self, config_dict: dict, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.config = from_dict(HierarchicalReasoningModel_ACTV1Config, dict(config_dict), where="arch")
        self.inner = HierarchicalReasoningModel_ACTV1_Inner(self.config, generator=generator)
        self.generator: Optional[torch.Generator] = None

    @property
    def puzzle_emb(self) -> Optional[CastedSparseEmbedding]:
        return getattr(self.inner, "puzzle_emb", None)

    def set_generator(self, generator: torch.Generator) -> None:
        """The RNG for halting exploration (must live on the model's device, or on CPU)."""
        self.generator = generator

    def _exploration_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(0)
        return self.generator

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> HierarchicalReasoningModel_ACTV1Carry:
        batch_size = batch["inputs"].shape[0]
        device = batch["inputs"].device
        return HierarchicalReasoningModel_ACTV1Carry(
            inner_carry=self.inner.empty_carry(batch_size, device=device),
            steps=torch.zeros((batch_size,), dtype=torch.int32, device=device),
            halted=torch.ones((batch_size,), dtype=torch.bool, device=device),  # every row loads data first
            current_data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def forward(self, carry: HierarchicalReasoningModel_ACTV1Carry, batch: dict[str, torch.Tensor]):
        cfg = self.config
        # Halted rows restart from the init states with the new example; running rows keep theirs and
        # the new batch's row is dropped (as the original).
        new_inner_carry = self.inner.reset_carry(carry.halted, carry.inner_carry)
        new_steps = torch.where(carry.halted, 0, carry.steps)
        new_current_data = {
            k: torch.where(carry.halted.view((-1,) + (1,) * (batch[k].ndim - 1)), batch[k], v)
            for k, v in carry.current_data.items()}

        new_inner_carry, logits, (q_halt_logits, q_continue_logits), stats = self.inner(new_inner_carry,
                                                                                       new_current_data)
        outputs = {"logits": logits, "q_halt_logits": q_halt_logits, "q_continue_logits": q_continue_logits}
        outputs.update(stats)

        with torch.no_grad():
            new_steps = new_steps + 1
            is_last_step = new_steps >= cfg.halt_max_steps
            halted = is_last_step
            if self.training and cfg.halt_max_steps > 1:
                halted = halted | (q_halt_logits > q_continue_logits)
                # Exploration: with prob. halt_exploration_prob a row gets a minimum step count drawn
                # from [2, halt_max_steps]; it can only delay halting. Re-drawn every step (as the original).
                gen = self._exploration_generator(q_halt_logits.device)
                explore = torch.rand(q_halt_logits.shape, generator=gen, device=gen.device)
                min_steps = torch.randint(2, cfg.halt_max_steps + 1, new_steps.shape, generator=gen,
                                          device=gen.device, dtype=new_steps.dtype)
                min_halt_steps = ((explore < cfg.halt_exploration_prob) * min_steps).to(new_steps.device)
                halted = halted & (new_steps >= min_halt_steps)

                # Target Q (PQN-style bootstrapping, no replay/target network): one more segment on the
                # new carry. Only the Q-logits are needed, so the lm_head is skipped.
                _, _, (next_q_halt, next_q_continue), _ = self.inner(new_inner_carry, new_current_data,
                                                                     with_outputs=False, collect_gate_stats=False)
                outputs["target_q_continue"] = torch.sigmoid(
                    torch.where(is_last_step, next_q_halt, torch.maximum(next_q_halt, next_q_continue)))

        return HierarchicalReasoningModel_ACTV1Carry(new_inner_carry, new_steps, halted, new_current_data), outputs

    # ------------------------------------------------------------------------------------------

    def estimate_flops(self, batch_size: int) -> float:
        """Approximate FLOPs of one training step (matmuls and attention only; 2 FLOPs per MAC).

        Forward of one segment = H_cycles*L_cycles L-calls + H_cycles H-calls; the target-Q forward
        (training, halt_max_steps > 1) repeats it without the lm_head; the backward costs 2x the
        forward of the differentiated part (last L-call, last H-call, heads)."""
        cfg = self.config
        D, H = cfg.hidden_size, cfg.num_heads
        S = cfg.seq_len + self.inner.puzzle_emb_len
        T = batch_size * S
        inter = swiglu_intermediate_size(D, cfg.expansion)
        block = 2 * T * (D * 3 * D + D * D + D * 2 * inter + inter * D) + 2 * 2 * batch_size * S * S * D
        gate_L = gate_H = 0
        if cfg.use_gating:
            r = max(1, int(round(cfg.gate_hidden_ratio * D)))
            gate_L = 2 * T * 2 * (3 * D * r)
            gate_H = 2 * T * 2 * (2 * D * r)
        call_L = cfg.L_layers * block + gate_L
        call_H = cfg.H_layers * block + gate_H
        segment = cfg.H_cycles * cfg.L_cycles * call_L + cfg.H_cycles * call_H
        heads = 2 * batch_size * cfg.seq_len * D * cfg.vocab_size + 2 * batch_size * D * 2
        forward = segment + heads
        target_q = segment if cfg.halt_max_steps > 1 else 0
        backward = 2 * (call_L + call_H + heads)
        return float(forward + target_q + backward)
