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

Shared with TRM (models/act.py): config fields, carries, the input/output layer, the ACT wrapper
(halting, exploration, Q targets) and randomness; the recursion is models/recursion.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.act import ACTCarry, ACTModel, InnerCarry, RecurrentPuzzleConfig, RecurrentPuzzleInner
from models.layers import CastedLinear, CosSin, PostNormBlock
from models.recursion import Hook, ReasoningModule, hrm_recursion

# The original's carry names.
HierarchicalReasoningModel_ACTV1InnerCarry = InnerCarry
HierarchicalReasoningModel_ACTV1Carry = ACTCarry


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
class HierarchicalReasoningModel_ACTV1Config(RecurrentPuzzleConfig):
    """The original's keys and defaults (models/act.py) plus this project's gating."""
    use_gating: bool = False
    gate_hidden_ratio: float = 0.25
    gate_init_bias: float = -2.2

    def __post_init__(self):
        super().__post_init__()
        if self.gate_hidden_ratio <= 0:
            self.bad("gate_hidden_ratio", "a positive number")

    @property
    def puzzle_emb_len(self) -> int:
        return self.min_puzzle_emb_len


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


class HierarchicalReasoningModel_ACTV1_Inner(RecurrentPuzzleInner):
    def __init__(self, config: HierarchicalReasoningModel_ACTV1Config, generator: Optional[torch.Generator] = None):
        super().__init__()
        # Module creation order = RNG consumption order of the original; do not reorder.
        self._build_io(config, config.puzzle_emb_len, generator)
        self.H_level = HierarchicalReasoningModel_ACTV1ReasoningModule(
            [HierarchicalReasoningModel_ACTV1Block(config, generator) for _ in range(config.H_layers)])
        self.L_level = HierarchicalReasoningModel_ACTV1ReasoningModule(
            [HierarchicalReasoningModel_ACTV1Block(config, generator) for _ in range(config.L_layers)])
        self._build_init_states(generator)

        # Gates come after everything else so that enabling them leaves the other weights' init intact.
        if config.use_gating:
            D = config.hidden_size
            self.L_level.gate = HRMGate(D, 3, config.gate_hidden_ratio, config.gate_init_bias, generator)
            self.H_level.gate = HRMGate(D, 2, config.gate_hidden_ratio, config.gate_init_bias, generator)

    def forward(self, carry: HierarchicalReasoningModel_ACTV1InnerCarry, batch: dict[str, torch.Tensor],
                with_outputs: bool = True, collect_gate_stats: Optional[bool] = None, hook: Optional[Hook] = None):
        """One segment. Returns (new_carry, logits [B, L, V] or None, (q_halt, q_continue) [B] fp32,
        gate stats dict; collected by default only with the outputs). `hook`: see models/recursion.py."""
        cfg = self.config
        cos_sin = self._cos_sin()
        x = self._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])  # [B, S, D], built with grad

        gated = cfg.use_gating and (with_outputs if collect_gate_stats is None else collect_gate_stats)
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

        new_carry, logits, q_logits = self._read_out(z_H, z_L, with_outputs)
        gate_stats = {}
        if gated:
            gate_stats.update(_finish_stats(stats["L"]))
            gate_stats.update(_finish_stats(stats["H"]))
        return new_carry, logits, q_logits, gate_stats


# ----------------------------------------------------------------------------------------------
# ACT wrapper


class HierarchicalReasoningModel_ACTV1(ACTModel):
    """ACT wrapper (models/act.py); `name: hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1`.
    Halts in training when q_halt > q_continue; Q-continue is trained on a bootstrapped target."""

    config_class = HierarchicalReasoningModel_ACTV1Config
    inner_class = HierarchicalReasoningModel_ACTV1_Inner
    bootstraps_q_continue = True

    def q_halts(self, q_halt_logits: torch.Tensor, q_continue_logits: torch.Tensor) -> torch.Tensor:
        return q_halt_logits > q_continue_logits

    # ------------------------------------------------------------------------------------------

    def _recursion_flops(self, batch_size: int) -> tuple[int, int, int]:
        """(one segment's recursion, one L-call, one H-call) forward FLOPs for `batch_size` rows."""
        cfg = self.config
        D = cfg.hidden_size
        T = batch_size * (cfg.seq_len + self.inner.puzzle_emb_len)
        block = self.inner.block_flops(T, batch_size)
        gate_L = gate_H = 0
        if cfg.use_gating:
            r = max(1, int(round(cfg.gate_hidden_ratio * D)))
            gate_L = 2 * T * 2 * (3 * D * r)
            gate_H = 2 * T * 2 * (2 * D * r)
        call_L = cfg.L_layers * block + gate_L
        call_H = cfg.H_layers * block + gate_H
        return cfg.H_cycles * cfg.L_cycles * call_L + cfg.H_cycles * call_H, call_L, call_H

    def segment_flops(self, batch_size: int = 1) -> float:
        """Forward FLOPs of one ACT segment at evaluation (recursion + heads; eval's FLOPs per puzzle)."""
        return float(self._recursion_flops(batch_size)[0] + self.inner.heads_flops(batch_size))

    def estimate_flops(self, batch_size: int) -> float:
        """Approximate FLOPs of one training step (matmuls and attention only; 2 FLOPs per MAC).

        Forward of one segment = H_cycles*L_cycles L-calls + H_cycles H-calls; the target-Q forward
        (training, halt_max_steps > 1) repeats it without the lm_head; the backward costs 2x the
        forward of the differentiated part (last L-call, last H-call, heads)."""
        segment, call_L, call_H = self._recursion_flops(batch_size)
        heads = self.inner.heads_flops(batch_size)
        target_q = segment if self.config.halt_max_steps > 1 else 0
        backward = 2 * (call_L + call_H + heads)
        return float(segment + heads + target_q + backward)
