"""TRM, the Tiny Recursive Model (SamsungSAILMontreal/TinyRecursiveModels, arXiv 2510.04871), with ACT.

One small network f (L_layers post-norm blocks) updates both states, the answer y (`z_H`) and the
latent z (`z_L`); x is the input embedding (tokens after `puzzle_emb_len` prefix positions):
    for h in H_cycles:  for l in L_cycles:  z = f(z, y + x)
                        y = f(y, z)
The whole last outer cycle is backpropagated, the H_cycles-1 earlier ones run under no_grad
(models/recursion.py `trm_recursion`); the carry (y, z) is detached between ACT calls. logits =
lm_head(y) without the prefix positions, (q_halt, q_continue) = q_head(y at position 0).

Exact to the original in float32: the same config keys, init order and distributions, state-dict names
(`inner.L_level.layers.<i>.{self_attn|mlp_t,mlp}...`), forward, carry and halting. Deliberate differences
(see docs/trm-reference.md for the original's pitfalls):
- `no_ACT_continue=false` trains (halt when q_halt > q_continue, Q-continue on a bootstrapped target);
  the original crashes there. With the default true, a row halts when q_halt > 0 and there is no
  second forward pass;
- `puzzle_emb_ndim=0` keeps `puzzle_emb_len` zero-input prefix positions (the original's shape crash);
  `puzzle_emb_len=0` means ceil(puzzle_emb_ndim / hidden_size), as in HRM;
- `pos_encodings=none` is explicit (the original silently accepts any other string as "none");
- exploration draws from an explicit generator and the inner model also returns a (empty) stats dict,
  like HRM's (models/act.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from models.act import ACTCarry, ACTModel, InnerCarry, RecurrentPuzzleConfig, RecurrentPuzzleInner
from models.layers import PostNormBlock
from models.recursion import Hook, ReasoningModule, trm_recursion
from utils.schema import ConfigError

# The original's carry and module names.
TinyRecursiveReasoningModel_ACTV1InnerCarry = InnerCarry
TinyRecursiveReasoningModel_ACTV1Carry = ACTCarry
TinyRecursiveReasoningModel_ACTV1ReasoningModule = ReasoningModule


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class TinyRecursiveReasoningModel_ACTV1Config(RecurrentPuzzleConfig):
    """The original's trm.yaml keys; defaults of the shared keys are TRM's (config/arch/trm.yaml)."""
    H_cycles: int = 3
    L_cycles: int = 6
    H_layers: int = 0  # ignored (one network); kept because the original's config requires it
    L_layers: int = 2
    pos_encodings: str = "rope"  # "rope" | "learned" | "none" (mlp_t is usually paired with none)

    mlp_t: bool = False  # token mixing by a SwiGLU across positions instead of self-attention
    puzzle_emb_len: int = 16  # prefix positions; 0 = ceil(puzzle_emb_ndim / hidden_size)
    no_ACT_continue: bool = True  # halt on sigmoid(q_halt) > 0.5 alone; no Q-continue target

    POSITIVE_KEYS = tuple(k for k in RecurrentPuzzleConfig.POSITIVE_KEYS if k != "H_layers")
    POS_ENCODINGS = ("rope", "learned", "none")

    def __post_init__(self):
        super().__post_init__()
        if self.H_layers < 0:
            self.bad("H_layers", "an integer >= 0 (it is ignored by TRM)")
        if self.puzzle_emb_len < 0:
            self.bad("puzzle_emb_len", "an integer >= 0")
        if 0 < self.puzzle_emb_len < self.min_puzzle_emb_len:
            raise ConfigError(f"config key 'arch.puzzle_emb_len' ({self.puzzle_emb_len}) is too short for "
                              f"'arch.puzzle_emb_ndim' ({self.puzzle_emb_ndim}): it needs at least "
                              f"{self.min_puzzle_emb_len} positions of hidden_size {self.hidden_size} (or 0 = that)")

    @property
    def prefix_len(self) -> int:
        """The number of prefix positions actually used (the original's rule)."""
        return self.puzzle_emb_len if self.puzzle_emb_len > 0 else self.min_puzzle_emb_len


# ----------------------------------------------------------------------------------------------
# block and inner model (one ACT call)


class TinyRecursiveReasoningModel_ACTV1Block(PostNormBlock):
    """The shared post-norm block (models/layers.py): self-attention, or with mlp_t a SwiGLU of width
    seq_len + prefix_len across positions."""

    def __init__(self, config: TinyRecursiveReasoningModel_ACTV1Config, generator: Optional[torch.Generator] = None):
        super().__init__(config.hidden_size, config.num_heads, config.expansion, config.rms_norm_eps,
                         attn_backend=config.attn_backend,
                         mlp_t_len=config.seq_len + config.prefix_len if config.mlp_t else 0, generator=generator)


class TinyRecursiveReasoningModel_ACTV1_Inner(RecurrentPuzzleInner):
    def __init__(self, config: TinyRecursiveReasoningModel_ACTV1Config, generator: Optional[torch.Generator] = None):
        super().__init__()
        # Module creation order = RNG consumption order of the original; do not reorder.
        self._build_io(config, config.prefix_len, generator)
        self.L_level = TinyRecursiveReasoningModel_ACTV1ReasoningModule(
            [TinyRecursiveReasoningModel_ACTV1Block(config, generator) for _ in range(config.L_layers)])
        self._build_init_states(generator)

    def forward(self, carry: InnerCarry, batch: dict[str, torch.Tensor], with_outputs: bool = True,
                hook: Optional[Hook] = None):
        """One ACT call. Returns (new_carry, logits [B, L, V] or None, (q_halt, q_continue) [B] fp32, {}).
        `hook`: see models/recursion.py (level "L" = the latent z, "H" = the answer y)."""
        cfg = self.config
        cos_sin = self._cos_sin()
        x = self._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])  # [B, S, D]

        def latent_step(z, y, x):  # z = f(z, y + x)
            return self.L_level(z, y + x, cos_sin=cos_sin)

        def answer_step(y, z):  # y = f(y, z): the same network, without x
            return self.L_level(y, z, cos_sin=cos_sin)

        y, z = trm_recursion(carry.z_H, carry.z_L, x, latent_step, answer_step, cfg.H_cycles, cfg.L_cycles,
                             hook=hook)
        new_carry, logits, q_logits = self._read_out(y, z, with_outputs)
        return new_carry, logits, q_logits, {}


# ----------------------------------------------------------------------------------------------
# ACT wrapper


class TinyRecursiveReasoningModel_ACTV1(ACTModel):
    """ACT wrapper (models/act.py); `name: recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1`."""

    config_class = TinyRecursiveReasoningModel_ACTV1Config
    inner_class = TinyRecursiveReasoningModel_ACTV1_Inner

    @property
    def bootstraps_q_continue(self) -> bool:
        return not self.config.no_ACT_continue

    def q_halts(self, q_halt_logits: torch.Tensor, q_continue_logits: torch.Tensor) -> torch.Tensor:
        if self.config.no_ACT_continue:
            return q_halt_logits > 0
        return q_halt_logits > q_continue_logits

    def _call_flops(self, batch_size: int) -> int:
        """Forward FLOPs of one network call (L_layers blocks) for `batch_size` rows."""
        T = batch_size * (self.config.seq_len + self.inner.puzzle_emb_len)
        return self.config.L_layers * self.inner.block_flops(T, batch_size)

    def segment_flops(self, batch_size: int = 1) -> float:
        """Forward FLOPs of one ACT call at evaluation (H_cycles * (L_cycles + 1) network calls + heads)."""
        cfg = self.config
        return float(cfg.H_cycles * (cfg.L_cycles + 1) * self._call_flops(batch_size) + self.inner.heads_flops(batch_size))

    def estimate_flops(self, batch_size: int) -> float:
        """Approximate FLOPs of one training step (matmuls and attention; 2 FLOPs per MAC): H_cycles *
        (L_cycles + 1) network calls forward, 2x the last cycle's calls and the heads backward, and one more
        forward segment for the Q-continue target when it is bootstrapped."""
        cfg = self.config
        call = self._call_flops(batch_size)
        segment = cfg.H_cycles * (cfg.L_cycles + 1) * call
        heads = self.inner.heads_flops(batch_size)
        target_q = segment if self.bootstraps_q_continue and cfg.halt_max_steps > 1 else 0
        backward = 2 * ((cfg.L_cycles + 1) * call + heads)
        return float(segment + heads + target_q + backward)
