"""Building the model + loss head from an arch config, and the ONE place where device, precision,
compilation and seeding are applied (outside the model code)."""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import numpy as np
import torch

from utils.config import model_config_dict, validate_arch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (seed, rank, purpose): distinct streams that never collide."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def build_head(arch: dict, injected: dict, seed: int = 0) -> torch.nn.Module:
    """Model + loss head on CPU, initialised from a generator seeded with `seed` (same on every rank)."""
    model_cls, loss_cls = validate_arch(arch)
    config = model_config_dict(arch, injected)
    init_gen = torch.Generator().manual_seed(derive_seed(seed, 0x1417))
    if "generator" in inspect.signature(model_cls.__init__).parameters:
        model = model_cls(config, generator=init_gen)
    else:
        # A model without a generator hook initialises from the global RNG: fork it so the caller's
        # global state is untouched and the init is still a function of `seed`.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, 0x1417))
            model = model_cls(config)
    loss_kwargs = {k: v for k, v in arch["loss"].items() if k != "name"}
    return loss_cls(model, **loss_kwargs)


def inner_model(head: torch.nn.Module) -> torch.nn.Module:
    return getattr(head, "model", head)


def puzzle_embedding(head: torch.nn.Module):
    """The CastedSparseEmbedding of the model, or None."""
    return getattr(inner_model(head), "puzzle_emb", None)


def set_exploration_generator(head: torch.nn.Module, seed: int, rank: int, device: torch.device) -> Optional[torch.Generator]:
    """Give the model its halting-exploration generator, seeded from (seed, rank). Returns it (or None)."""
    model = inner_model(head)
    if not hasattr(model, "set_generator"):
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, rank, 0xAC7))
    model.set_generator(gen)
    return gen


def autocast_context(device: torch.device, mixed_precision: str):
    if mixed_precision == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_for_training(head: torch.nn.Module, device: torch.device, compile_model: bool) -> torch.nn.Module:
    """Move to the device and optionally compile. Returns the module to call in the step; `head` itself
    stays the uncompiled module whose state_dict has the original names."""
    head.to(device)
    if compile_model:
        return torch.compile(head, dynamic=False)
    return head
