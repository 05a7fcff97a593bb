"""Exponential moving average of the weights (TRM's `ema: True`; works for every arch).

After every optimizer step: shadow = (1 - rate) * param + rate * shadow, evaluated as the original
(TinyRecursiveModels models/ema.py) writes it: both products rounded, then added, so a shadow here is
bit-identical to the original's. The shadow starts at the initial weights, with no bias correction or
warm-up. Only parameters that require grad are averaged: buffers (the puzzle-embedding table, which
its own sign-SGD optimizer trains, H_init/L_init, rotary caches) keep their live values, as in the original.

Unlike the original, the shadow is checkpointed (`ema.safetensors`, see utils/checkpoint.py), so a resumed
run continues with the same EMA instead of restarting it from the EMA weights."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class WeightEMA:
    def __init__(self, module: torch.nn.Module, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"ema_rate must be in [0, 1); got {rate}")
        self.rate = float(rate)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current parameters (device-side only: no host sync)."""
        scaled = torch._foreach_mul(self.params, 1.0 - self.rate)
        torch._foreach_mul_(self.shadow, self.rate)
        torch._foreach_add_(self.shadow, scaled)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow under the module's own parameter names (the original's `model.inner.…`)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Restore a shadow saved by `state_dict`, refusing missing/extra names and other shapes (ValueError)."""
        missing = [n for n in self.names if n not in state]
        extra = [n for n in state if n not in self.names]
        if missing or extra:
            key, what = (missing[0], "lacks") if missing else (extra[0], "has unexpected")
            raise ValueError(f"EMA weights '{source}' {what} parameter '{key}' "
                             f"({len(missing)} missing, {len(extra)} unexpected); is it for this arch?")
        for name, shadow in zip(self.names, self.shadow):
            value = state[name]
            if value.shape != shadow.shape:
                raise ValueError(f"EMA weights '{source}': '{name}' has shape {list(value.shape)} "
                                 f"but the model has {list(shadow.shape)}")
            shadow.copy_(value)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The parameters hold the shadow inside the block and exactly their live values again after it."""
        live = [p.detach().clone() for p in self.params]
        torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            torch._foreach_copy_(self.params, live)
