"""What the recurrent puzzle models (HRM `models/hrm/hrm_act_v1.py`, TRM `models/recursive_reasoning/trm.py`)
share around their recursion: the config fields both originals have, the carries, the puzzle input/output
layer (token + puzzle-prefix embeddings, lm_head, q_head, fixed initial states) and the ACT wrapper.

The ACT wrapper runs one recursion call ("segment") per forward, keeps the carry of unfinished rows,
refills halted rows with the batch's example and decides halting:
- steps += 1; a row halts at halt_max_steps; in eval that is the only rule (every row runs all steps);
- in training (halt_max_steps > 1) it also halts when the Q-head says so (`q_halts`, per model), and
  exploration (prob. halt_exploration_prob) draws a minimum of [2, halt_max_steps] steps per row;
- with a bootstrapped Q-continue target (HRM; TRM with no_ACT_continue=false) one more segment on the new
  carry gives target_q_continue (PQN-style: no replay buffer, no target network).

Randomness: init draws from the `generator=` passed to the constructor (else the global RNG, as the
originals, whose trainers seed it); halting exploration draws from `self.generator` (`set_generator`),
else from a generator seeded with 0 created on the model's device at the first training step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dataset import context as fmt  # the context format's token ids, defined once there
from models.common import trunc_normal_init_
from models.layers import (ATTN_BACKENDS, CONTEXT_EMB_MODES, CastedEmbedding, CastedLinear, ContextEmbedding,
                           RotaryEmbedding, swiglu_intermediate_size)
from models.recursion import Hook
from models.sparse_embedding import CastedSparseEmbedding
from utils.schema import ConfigError, from_dict

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# carries


@dataclass
class InnerCarry:
    z_H: torch.Tensor  # [B, S, D] forward dtype (TRM: the answer y)
    z_L: torch.Tensor  # [B, S, D] (TRM: the latent z)


@dataclass
class ACTCarry:
    inner_carry: InnerCarry
    steps: torch.Tensor  # [B] int32, segments run on the current example
    halted: torch.Tensor  # [B] bool, the row takes a new example at the next call
    current_data: dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class RecurrentPuzzleConfig:
    """The keys HRM's and TRM's configs share (the originals' names and defaults, HRM's values)."""
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
    pos_encodings: str = "rope"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1

    forward_dtype: str = "bfloat16"
    attn_backend: str = "auto"  # addition of this project: "auto" | "flash" | "sdpa" | "math"
    # Addition of this project for the context format (dataset/context.py): "none" (the originals), "role"
    # (a learned vector per demo input / demo output / query / answer position) or "role_grid" (also
    # learned row and column vectors of the cell inside its grid), added to the token embeddings.
    context_emb: str = "none"

    POSITIVE_KEYS: ClassVar[tuple[str, ...]] = (
        "batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "H_cycles", "L_cycles", "H_layers",
        "L_layers", "hidden_size", "num_heads", "halt_max_steps")
    POS_ENCODINGS: ClassVar[tuple[str, ...]] = ("rope", "learned")

    def bad(self, key: str, expected: str):
        raise ConfigError(f"config key 'arch.{key}' expects {expected}, got {getattr(self, key)!r}")

    def __post_init__(self):
        for key in self.POSITIVE_KEYS:
            if getattr(self, key) < 1:
                self.bad(key, "an integer >= 1")
        if self.puzzle_emb_ndim < 0:
            self.bad("puzzle_emb_ndim", "an integer >= 0")
        if self.hidden_size % self.num_heads != 0:
            raise ConfigError(f"config key 'arch.hidden_size' ({self.hidden_size}) must be divisible by "
                              f"'arch.num_heads' ({self.num_heads})")
        if self.pos_encodings not in self.POS_ENCODINGS:
            self.bad("pos_encodings", " or ".join(repr(p) for p in self.POS_ENCODINGS))
        if self.forward_dtype not in DTYPES:
            self.bad("forward_dtype", "one of " + ", ".join(DTYPES))
        if self.attn_backend not in ATTN_BACKENDS:
            self.bad("attn_backend", "one of " + ", ".join(ATTN_BACKENDS))
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            self.bad("halt_exploration_prob", "a probability in [0, 1]")
        if self.context_emb not in CONTEXT_EMB_MODES:
            self.bad("context_emb", "one of " + ", ".join(CONTEXT_EMB_MODES))

    @property
    def min_puzzle_emb_len(self) -> int:
        """Positions the puzzle vector needs: ceil(puzzle_emb_ndim / hidden_size) (HRM's prefix length)."""
        return -(self.puzzle_emb_ndim // -self.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.forward_dtype]


# ----------------------------------------------------------------------------------------------
# inner model: input/output layer and carry handling


class RecurrentPuzzleInner(nn.Module):
    """Base of HRM's and TRM's inner model. A subclass's __init__ calls `_build_io`, builds its reasoning
    modules, then `_build_init_states`: the originals' module creation order, i.e. their RNG order."""

    def _build_io(self, config: RecurrentPuzzleConfig, puzzle_emb_len: int, generator: Optional[torch.Generator]):
        self.config = config
        self.forward_dtype = config.dtype
        D = config.hidden_size
        self.embed_scale = math.sqrt(D)
        embed_init_std = 1.0 / self.embed_scale
        self.embed_tokens = CastedEmbedding(config.vocab_size, D, init_std=embed_init_std,
                                            cast_to=self.forward_dtype, generator=generator)
        self.lm_head = CastedLinear(D, config.vocab_size, bias=False, generator=generator)
        self.q_head = CastedLinear(D, 2, bias=True, generator=generator)

        # Prefix positions in front of the tokens; the puzzle vector fills the first ones, the rest are zero.
        self.puzzle_emb_len = puzzle_emb_len
        if config.puzzle_emb_ndim > 0:
            # Zero init (std 0), as the original.
            self.puzzle_emb = CastedSparseEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim,
                                                    batch_size=config.batch_size, init_std=0,
                                                    cast_to=self.forward_dtype)
        S = config.seq_len + puzzle_emb_len
        if config.pos_encodings == "rope":
            self.rotary_emb = RotaryEmbedding(D // config.num_heads, max_position_embeddings=S,
                                              base=config.rope_theta)
        elif config.pos_encodings == "learned":
            self.embed_pos = CastedEmbedding(S, D, init_std=embed_init_std, cast_to=self.forward_dtype,
                                             generator=generator)

    def _build_init_states(self, generator: Optional[torch.Generator]):
        D = self.config.hidden_size
        # Fixed (untrained) initial states, persistent so checkpoints carry them.
        self.register_buffer("H_init", trunc_normal_init_(torch.empty(D, dtype=self.forward_dtype), std=1,
                                                          generator=generator), persistent=True)
        self.register_buffer("L_init", trunc_normal_init_(torch.empty(D, dtype=self.forward_dtype), std=1,
                                                          generator=generator), persistent=True)
        # Q-head starts at "never halt" (both logits -5), which makes early halting a learned decision.
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5)
        # Created after every original module, so that turning it on leaves their initialisation intact.
        if self.config.context_emb != "none":
            marks = dict(PAD=fmt.PAD, ROW=fmt.ROW, END=fmt.END, IN=fmt.IN, OUT=fmt.OUT)
            self.context_emb = ContextEmbedding(self.config.context_emb, D, marks, 1.0 / self.embed_scale,
                                                self.forward_dtype, generator=generator)

    def _cos_sin(self):
        return self.rotary_emb() if self.config.pos_encodings == "rope" else None

    def _input_embeddings(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        D = self.config.hidden_size
        embedding = self.embed_tokens(inputs.to(torch.int32))  # [B, L, D]
        if self.config.context_emb != "none":
            embedding = embedding + self.context_emb(inputs)
        if self.puzzle_emb_len > 0:
            if self.config.puzzle_emb_ndim > 0:
                puzzle_embedding = self.puzzle_emb(puzzle_identifiers)  # [B, puzzle_emb_ndim]
            else:  # no puzzle vector: all prefix positions are zero-input scratch (the original crashes here)
                puzzle_embedding = embedding.new_zeros(embedding.shape[0], 0)
            pad_count = self.puzzle_emb_len * D - puzzle_embedding.shape[-1]
            if pad_count > 0:
                puzzle_embedding = F.pad(puzzle_embedding, (0, pad_count))
            embedding = torch.cat((puzzle_embedding.view(-1, self.puzzle_emb_len, D), embedding), dim=-2)  # [B, S, D]
        if self.config.pos_encodings == "learned":
            # 1/sqrt(2) keeps the variance of the sum equal to that of one term.
            embedding = 0.707106781 * (embedding + self.embed_pos.embedding_weight.to(self.forward_dtype))
        return self.embed_scale * embedding

    def empty_carry(self, batch_size: int, device=None) -> InnerCarry:
        # Zeros rather than torch.empty: identical results (every row is reset before use) but deterministic.
        shape = (batch_size, self.config.seq_len + self.puzzle_emb_len, self.config.hidden_size)
        return InnerCarry(z_H=torch.zeros(shape, dtype=self.forward_dtype, device=device),
                          z_L=torch.zeros(shape, dtype=self.forward_dtype, device=device))

    def reset_carry(self, reset_flag: torch.Tensor, carry: InnerCarry) -> InnerCarry:
        flag = reset_flag.view(-1, 1, 1)
        return InnerCarry(z_H=torch.where(flag, self.H_init, carry.z_H), z_L=torch.where(flag, self.L_init, carry.z_L))

    def _read_out(self, z_H: torch.Tensor, z_L: torch.Tensor, with_outputs: bool):
        """-> (detached new carry, logits [B, L, V] or None, (q_halt, q_continue) [B] fp32)."""
        new_carry = InnerCarry(z_H=z_H.detach(), z_L=z_L.detach())
        logits = self.lm_head(z_H)[:, self.puzzle_emb_len:] if with_outputs else None
        # Q-head reads position 0 (the puzzle-embedding slot), like a CLS token.
        q_logits = self.q_head(z_H[:, 0]).to(torch.float32)
        return new_carry, logits, (q_logits[..., 0], q_logits[..., 1])

    def block_flops(self, tokens: int, batch_size: int) -> int:
        """FLOPs of one block over `tokens` = batch_size * S positions (matmuls and attention; 2 per MAC)."""
        cfg = self.config
        D, S = cfg.hidden_size, cfg.seq_len + self.puzzle_emb_len
        mlp = 2 * tokens * 3 * D * swiglu_intermediate_size(D, cfg.expansion)
        if getattr(cfg, "mlp_t", False):
            mixer = 2 * batch_size * D * 3 * S * swiglu_intermediate_size(S, cfg.expansion)
        else:
            mixer = 2 * tokens * 4 * D * D + 2 * 2 * batch_size * S * S * D
        return mixer + mlp

    def heads_flops(self, batch_size: int) -> int:
        D = self.config.hidden_size
        return 2 * batch_size * self.config.seq_len * D * self.config.vocab_size + 2 * batch_size * D * 2


# ----------------------------------------------------------------------------------------------
# ACT wrapper


class ACTModel(nn.Module):
    """ACT wrapper base. Subclasses set `config_class` and `inner_class`, and define `q_halts` and
    `bootstraps_q_continue`. `recursion_hook` (default None) is passed to every recursion step of the inner
    model (see models/recursion.py), e.g. for eval-time noise on the latent."""

    config_class: ClassVar[type]
    inner_class: ClassVar[type]
    bootstraps_q_continue: bool  # train Q-continue on a bootstrapped target (costs one more segment)

    def __init__(self, config_dict: dict, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.config = from_dict(self.config_class, dict(config_dict), where="arch")
        self.inner = self.inner_class(self.config, generator=generator)
        self.generator: Optional[torch.Generator] = None
        self.recursion_hook: Optional[Hook] = None

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

    def q_halts(self, q_halt_logits: torch.Tensor, q_continue_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> ACTCarry:
        batch_size = batch["inputs"].shape[0]
        device = batch["inputs"].device
        return ACTCarry(
            inner_carry=self.inner.empty_carry(batch_size, device=device),
            steps=torch.zeros((batch_size,), dtype=torch.int32, device=device),
            halted=torch.ones((batch_size,), dtype=torch.bool, device=device),  # every row loads data first
            current_data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def forward(self, carry: ACTCarry, batch: dict[str, torch.Tensor]):
        cfg = self.config
        # Halted rows restart from the init states with the new example; running rows keep theirs and
        # the new batch's row is dropped (as the original).
        new_inner_carry = self.inner.reset_carry(carry.halted, carry.inner_carry)
        new_steps = torch.where(carry.halted, 0, carry.steps)
        new_current_data = {
            k: torch.where(carry.halted.view((-1,) + (1,) * (batch[k].ndim - 1)), batch[k], v)
            for k, v in carry.current_data.items()}

        new_inner_carry, logits, (q_halt_logits, q_continue_logits), stats = self.inner(
            new_inner_carry, new_current_data, hook=self.recursion_hook)
        outputs = {"logits": logits, "q_halt_logits": q_halt_logits, "q_continue_logits": q_continue_logits}
        outputs.update(stats)

        with torch.no_grad():
            new_steps = new_steps + 1
            is_last_step = new_steps >= cfg.halt_max_steps
            halted = is_last_step
            if self.training and cfg.halt_max_steps > 1:
                halted = halted | self.q_halts(q_halt_logits, q_continue_logits)
                # Exploration: with prob. halt_exploration_prob a row gets a minimum step count drawn
                # from [2, halt_max_steps]; it can only delay halting. Re-drawn every step (as the original).
                gen = self._exploration_generator(q_halt_logits.device)
                explore = torch.rand(q_halt_logits.shape, generator=gen, device=gen.device)
                min_steps = torch.randint(2, cfg.halt_max_steps + 1, new_steps.shape, generator=gen,
                                          device=gen.device, dtype=new_steps.dtype)
                min_halt_steps = ((explore < cfg.halt_exploration_prob) * min_steps).to(new_steps.device)
                halted = halted & (new_steps >= min_halt_steps)

                if self.bootstraps_q_continue:
                    # Target Q: one more segment on the new carry; only the Q-logits are needed.
                    _, _, (next_q_halt, next_q_continue), _ = self.inner(new_inner_carry, new_current_data,
                                                                         with_outputs=False)
                    outputs["target_q_continue"] = torch.sigmoid(
                        torch.where(is_last_step, next_q_halt, torch.maximum(next_q_halt, next_q_continue)))

        return ACTCarry(new_inner_carry, new_steps, halted, new_current_data), outputs
