"""Helpers shared by the models: the JAX-style truncated-normal init (as in the original
`models/common.py`) and a strict state-dict loader that reads checkpoints of the original."""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import torch
from torch import nn

COMPILE_PREFIX = "_orig_mod."


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model. One line, naming the first offending key."""



def trunc_normal_init_(tensor: torch.Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """In-place truncated normal in [lower, upper] standard deviations, rescaled so the resulting
    std is `std` (JAX's `truncated_normal` initializer semantics; torch's `trunc_normal_` is not
    rescaled). Sampled by inverse CDF: uniform in erf-space, then erfinv. This consumes the RNG in
    the same way as the original, so the same seed gives the same weights."""
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        sqrt2 = math.sqrt(2.0)
        lo_cdf = math.erf(lower / sqrt2)
        hi_cdf = math.erf(upper / sqrt2)
        mass = (hi_cdf - lo_cdf) / 2
        norm_pdf = (2 * math.pi) ** -0.5
        pdf_lower = norm_pdf * math.exp(-0.5 * lower ** 2)
        pdf_upper = norm_pdf * math.exp(-0.5 * upper ** 2)
        # Variance of a standard normal truncated to [lower, upper]; divide it out so the final std is `std`.
        trunc_var = 1 - (upper * pdf_upper - lower * pdf_lower) / mass - ((pdf_upper - pdf_lower) / mass) ** 2
        scaled_std = std / math.sqrt(trunc_var)

        tensor.uniform_(lo_cdf, hi_cdf, generator=generator)
        tensor.erfinv_()
        tensor.mul_(sqrt2 * scaled_std)
        tensor.clip_(lower * scaled_std, upper * scaled_std)
    return tensor



def strip_compile_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop every `_orig_mod.` that `torch.compile` inserts (at the compiled module's position)."""
    return {k.replace(COMPILE_PREFIX, ""): v for k, v in state_dict.items()}


def rename_legacy_keys(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys that an earlier version of a model wrote. A submodule whose names changed lists
    `legacy_key_renames` = ((regex, replacement), ...), applied in order to the part of each key below the
    submodule's prefix; keys the module has today are never renamed."""
    rules = [(prefix + "." if prefix else "", re.compile(pattern), repl)
             for prefix, sub in module.named_modules() for pattern, repl in getattr(sub, "legacy_key_renames", ())]
    if not rules:
        return dict(state_dict)
    own = module.state_dict().keys()
    out = {}
    for key, value in state_dict.items():
        if key not in own:
            for prefix, pattern, repl in rules:
                if key.startswith(prefix):
                    key = prefix + pattern.sub(repl, key[len(prefix):])
        out[key] = value
    return out


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load `state_dict` into `module` requiring the exact same names and shapes, with or without
    the `_orig_mod.` prefix. Non-persistent buffers (RoPE tables, batch-local embedding rows) are
    not part of either side. On mismatch raise CheckpointMismatchError naming the first differing
    key (in the model's order) and both shapes."""
    given = rename_legacy_keys(module, strip_compile_prefix(state_dict))
    expected = module.state_dict()
    for key, ref in expected.items():
        if key not in given:
            raise CheckpointMismatchError(
                f"checkpoint is missing key '{key}' (model expects shape {list(ref.shape)})")
        got = given[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointMismatchError(
                f"checkpoint key '{key}' has shape {list(got.shape)}, model expects {list(ref.shape)}")
    for key, got in given.items():
        if key not in expected:
            raise CheckpointMismatchError(
                f"checkpoint has unexpected key '{key}' (shape {list(got.shape)}) that the model does not define")
    module.load_state_dict(given, strict=True)
