"""The recursion shared by every recurrent-reasoning model here (HRM puzzles, TRM, the HRM language model).

Both recursions run the same schedule over two states, z_H and z_L (TRM's answer y and latent z):

    for h in range(H_cycles):
        for l in range(L_cycles):
            z_L = L_step(z_L, z_H, x)    # the low-level / latent update: the only one that sees the input x
        z_H = H_step(z_H, z_L)           # the high-level / answer update

They differ in the networks and in which updates are differentiated:
- `hrm_recursion` (HRM): two modules (f_L, f_H); only the LAST L-update and the LAST H-update carry
  gradient, every earlier one runs under no_grad (the paper's 1-step gradient approximation).
- `trm_recursion` (TRM): one network for both updates; the whole LAST outer cycle (L_cycles z-updates and
  one y-update) is backpropagated in full, the H_cycles-1 earlier cycles run under no_grad.

API (for every model and for eval-time instrumentation):
    z_H, z_L = hrm_recursion(z_H, z_L, x, L_step, H_step, H_cycles, L_cycles, hook=None)
    y, z     = trm_recursion(y, z, x, L_step, H_step, H_cycles, L_cycles, hook=None)
  - `L_step(z_L, z_H, x) -> z_L` and `H_step(z_H, z_L) -> z_H` are any callables; close over rope tables,
    masks, gate statistics etc. The usual ones are `L_step = lambda z_L, z_H, x: f_L(z_L, z_H + x)` and
    `H_step = f_H` with `ReasoningModule`s (for TRM, f_L is f_H: the same network). The injection is added
    as (z_H + x) first, then to z_L: the original's order, which matters in bf16.
  - `hook(step: Step, state) -> state`, if given, runs after every update on the new state, in the same
    grad mode as the update, and its return value replaces the state (e.g. noise on the latent per
    recursion step at eval time, tracing, statistics). `Step(level, h, l, differentiated)`: level "L" or
    "H", outer index h, inner index l (None for H), and whether the update is in the gradient path
    in training (it is not actually differentiated under an outer torch.no_grad(), e.g. in eval).
  - Inputs must be detached carries (the models detach between ACT segments); outputs are not detached.
  - `ReasoningModule(layers)`: `f(h, injection, **kw)` = the blocks applied to `h + injection`; `kw`
    (e.g. `cos_sin=`) is passed to every block.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn


class Step(NamedTuple):
    level: str  # "L" (z_L, TRM's z) or "H" (z_H, TRM's y)
    h: int  # outer cycle, 0 .. H_cycles-1
    l: Optional[int]  # inner cycle for an L update, 0 .. L_cycles-1; None for an H update
    differentiated: bool  # in the training gradient path


StepFn = Callable[..., torch.Tensor]
Hook = Callable[[Step, torch.Tensor], torch.Tensor]


class ReasoningModule(nn.Module):
    """A stack of blocks applied to (own state + injection); state-dict names `layers.<i>.…` (the original's)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor, input_injection: torch.Tensor, **block_kwargs) -> torch.Tensor:
        hidden_states = hidden_states + input_injection
        for layer in self.layers:
            hidden_states = layer(hidden_states, **block_kwargs)
        return hidden_states


def _update(fn: StepFn, hook: Optional[Hook], step: Step, *args: torch.Tensor) -> torch.Tensor:
    state = fn(*args)
    return state if hook is None else hook(step, state)


def _outer_cycle(z_H, z_L, x, L_step, H_step, h: int, L_cycles: int, hook, differentiated: bool):
    """One outer cycle: L_cycles L-updates, then one H-update."""
    for l in range(L_cycles):
        z_L = _update(L_step, hook, Step("L", h, l, differentiated), z_L, z_H, x)
    z_H = _update(H_step, hook, Step("H", h, None, differentiated), z_H, z_L)
    return z_H, z_L


def hrm_recursion(z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, L_step: StepFn, H_step: StepFn,
                  H_cycles: int, L_cycles: int, hook: Optional[Hook] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HRM's segment: H_cycles*L_cycles L-updates and H_cycles H-updates; 1-step gradient (see module doc)."""
    last_h, last_l = H_cycles - 1, L_cycles - 1
    with torch.no_grad():
        for h in range(H_cycles):
            for l in range(L_cycles):
                if not (h == last_h and l == last_l):
                    z_L = _update(L_step, hook, Step("L", h, l, False), z_L, z_H, x)
            if h != last_h:
                z_H = _update(H_step, hook, Step("H", h, None, False), z_H, z_L)
    z_L = _update(L_step, hook, Step("L", last_h, last_l, True), z_L, z_H, x)
    z_H = _update(H_step, hook, Step("H", last_h, None, True), z_H, z_L)
    return z_H, z_L


def trm_recursion(y: torch.Tensor, z: torch.Tensor, x: torch.Tensor, L_step: StepFn, H_step: StepFn,
                  H_cycles: int, L_cycles: int, hook: Optional[Hook] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRM's call: H_cycles outer cycles; the last one fully backpropagated, earlier ones no_grad."""
    with torch.no_grad():
        for h in range(H_cycles - 1):
            y, z = _outer_cycle(y, z, x, L_step, H_step, h, L_cycles, hook, differentiated=False)
    return _outer_cycle(y, z, x, L_step, H_step, H_cycles - 1, L_cycles, hook, differentiated=True)


RECURSIONS = {"hrm": hrm_recursion, "trm": trm_recursion}
