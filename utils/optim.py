"""Optimizers and learning-rate schedules by name.

The dense optimizer defaults to AdamATan2 (the original's choice); any `pytorch_optimizer` name works too.
Muon and its variants (`muon`, `normuon`, `adamuon`, ...) get the usual split: Muon for the 2-D hidden
matrices, AdamW for embeddings, heads, gains and biases (`muon_split`).
The schedule defaults to the original's linear-warmup-then-cosine (`cosine_warmup`); any
`pytorch_optimizer` / torch scheduler name works too, built once per optimizer so that the dense and the
sparse puzzle-embedding optimizers each follow the same shape from their own base LR."""
from __future__ import annotations

import inspect
import math
from typing import Any, Iterable

import torch

from utils.schema import ConfigError, closest_key

DEFAULT_OPTIMIZER = "adam_atan2"
DEFAULT_SCHEDULER = "cosine_warmup"
# A param group's own base LR (Muon's matrices); groups without it start from the optimizer's base_lr.
SCHEDULE_BASE_LR = "schedule_base_lr"


def cosine_warmup_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The original's `cosine_schedule_with_warmup_lr_lambda`, as a multiplier of the base LR.

    `step` counts optimizer steps from 1 (the original increments before computing the LR)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + max(0.0, (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _load_by_name(key: str, name: str, loader: str, lister: str, our_default: str):
    """A pytorch_optimizer class by name (`loader`/`lister` are its lookup functions); an unknown name is a
    ConfigError naming the closest known one."""
    import pytorch_optimizer
    try:
        return getattr(pytorch_optimizer, loader)(name)
    except Exception:
        hint = closest_key(name.lower(), list(getattr(pytorch_optimizer, lister)()) + [our_default])
        raise ConfigError(f"unknown {key} '{name}'" + (f" did you mean '{hint}'?" if hint else "")) from None


def build_optimizer(params: Iterable[torch.nn.Parameter] | torch.nn.Module, name: str, lr: float,
                    betas: tuple[float, float], weight_decay: float,
                    kwargs: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """Dense optimizer by name. `adam_atan2` -> utils.adam_atan2.make_adam_atan2 (kwargs may hold `backend`);
    a Muon-family name -> `build_muon` (needs the module, for the split); anything else ->
    `pytorch_optimizer.load_optimizer(name)`, passing betas/weight_decay when it takes them."""
    kwargs = dict(kwargs or {})
    module = params if isinstance(params, torch.nn.Module) else None
    params = list(module.parameters() if module is not None else params)
    if name.lower().replace("-", "_") in ("adam_atan2", "adamatan2"):
        from utils.adam_atan2 import make_adam_atan2
        return make_adam_atan2(params, lr=lr, betas=betas, weight_decay=weight_decay, **kwargs)
    cls = _load_by_name("optimizer.name", name, "load_optimizer", "get_supported_optimizers", DEFAULT_OPTIMIZER)
    if is_muon_family(cls):
        if module is None:
            raise TypeError(f"optimizer '{name}' splits parameters by module: pass the module, not a list")
        return build_muon(cls, module, name, lr, betas, weight_decay, kwargs)
    accepted = inspect.signature(cls.__init__).parameters
    base: dict[str, Any] = {"lr": lr}
    if "betas" in accepted:
        base["betas"] = betas
    if "weight_decay" in accepted:
        base["weight_decay"] = weight_decay
    base.update(kwargs)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    for key in kwargs:
        if key not in accepted and not has_var_kw:
            hint = closest_key(key, [k for k in accepted if k not in ("self", "params")])
            raise ConfigError(f"unknown config key 'optimizer.kwargs.{key}' for optimizer '{name}'"
                              + (f" did you mean '{hint}'?" if hint else ""))
    try:
        return cls(params, **base)
    except (ValueError, TypeError) as e:  # the optimizer's own range checks (eps < 0, ...)
        raise ConfigError(f"optimizer '{name}' rejected its settings {_shown(base)}: {_first_line(e)}") from None


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, kwargs: dict[str, Any] | None, *,
                    base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float):
    """A scheduler whose `.step()` is called once after every optimizer step.

    Before the first optimizer step the LR is already the one for step 1 (as in the original, which
    sets the LR after incrementing its step counter). A group that carries SCHEDULE_BASE_LR (Muon's
    matrices) follows the same shape from that base instead of `base_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = group.get(SCHEDULE_BASE_LR, base_lr)
    kwargs = dict(kwargs or {})
    if name == DEFAULT_SCHEDULER:
        if kwargs:
            raise ConfigError(f"lr_scheduler '{DEFAULT_SCHEDULER}' takes no kwargs (use lr_warmup_steps, lr_min_ratio); "
                              f"got {sorted(kwargs)}")
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: cosine_warmup_factor(e + 1, warmup_steps, total_steps, min_ratio))

    cls = _load_by_name("lr_scheduler.name", name, "load_lr_scheduler", "get_supported_lr_schedulers",
                        DEFAULT_SCHEDULER)
    # Fill the usual length/LR arguments from the run so that `lr_scheduler.name=cosine` just works.
    accepted = inspect.signature(cls).parameters
    if "max_lr" in accepted and any(SCHEDULE_BASE_LR in g for g in optimizer.param_groups):
        raise ConfigError(f"lr_scheduler '{name}' sets one absolute LR (max_lr) for every param group, which "
                          f"would give Muon's matrices the AdamW LR; use cosine_warmup or a torch-style scheduler "
                          f"(cosine, linear, step, ...)")
    auto = {"t_max": total_steps, "total_steps": total_steps, "first_cycle_steps": total_steps,
            "num_training_steps": total_steps, "total_iters": total_steps, "max_lr": base_lr,
            "min_lr": base_lr * min_ratio, "warmup_steps": warmup_steps, "num_warmup_steps": warmup_steps}
    for key, value in auto.items():
        if key in accepted and key not in kwargs:
            kwargs[key] = value
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as e:  # e.g. warmup_steps >= the cycle length
        raise ConfigError(f"lr_scheduler '{name}' (lr_scheduler.kwargs, lr_warmup_steps, epochs) rejected "
                          f"{_shown(kwargs)}: {_first_line(e)}") from None


def _shown(kwargs: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + "}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# ------------------------------------------------------------------------------------------------
# Muon: orthogonalized momentum for the hidden matrices, AdamW for everything else

def is_embedding(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Embedding) or type(module).__name__.endswith("Embedding")


def muon_split(module: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """(Muon, AdamW) named parameters, the usual split for Muon.

    Muon takes the 2-D hidden matrices: attention, MLP/SwiGLU (mlp_t included), Mamba in/out projections.
    AdamW takes what is not a hidden linear map: embedding tables (rows are looked up, not multiplied),
    output heads (any module named `*head`: lm_head, q_head, halt_head; their rows are per-class
    read-outs), 1-D gains, biases and SSM scalars, matrices with a side of 1 (a vector in disguise, e.g.
    a scalar gate's projection), and tensors of 3+ dims (conv filters). The puzzle-embedding table is a
    buffer with its own sign-SGD optimizer and appears in neither list."""
    embedding_params = {id(p) for m in module.modules() if is_embedding(m) for p in m.parameters(recurse=False)}
    muon, adamw = [], []
    for name, p in module.named_parameters():
        owner = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in name else ""
        hidden_matrix = (p.ndim == 2 and min(p.shape) > 1 and id(p) not in embedding_params
                         and not owner.endswith("head") and not owner.startswith("embed"))
        (muon if hidden_matrix else adamw).append((name, p))
    return muon, adamw


def is_muon_family(cls: type) -> bool:
    """pytorch_optimizer's Muon and its variants (NorMuon, AdaMuon, ...): they need `use_muon` groups."""
    from pytorch_optimizer.optimizer.muon.base import MuonBase
    return isinstance(cls, type) and issubclass(cls, MuonBase)


# Set through the trainer's own keys, so refused in optimizer.kwargs (one name per knob).
MUON_OWN_KEYS = {"adamw_lr": "lr", "adamw_betas": "beta1/beta2"}


def build_muon(cls: type, module: torch.nn.Module, name: str, lr: float, betas: tuple[float, float],
               weight_decay: float, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """Two groups: Muon over `muon_split`'s matrices at `optimizer.kwargs.lr` (default: the class's, 0.02
    for Muon), AdamW over the rest at the run's `lr`/`beta1`/`beta2`. `weight_decay` applies to both
    unless `optimizer.kwargs.weight_decay` (Muon) or `adamw_wd` (AdamW) say otherwise. The Muon group keeps
    its base LR under SCHEDULE_BASE_LR, so the schedule scales both groups by the same factor."""
    accepted = inspect.signature(cls.__init__).parameters
    for key in kwargs:
        if key in MUON_OWN_KEYS:
            raise ConfigError(f"optimizer.kwargs.{key} is set by the config key {MUON_OWN_KEYS[key]} for "
                              f"'{name}' (the AdamW part: embeddings, heads, norms, biases)")
        if key not in accepted or key in ("self", "params"):
            hint = closest_key(key, [k for k in accepted if k not in ("self", "params", "kwargs")])
            raise ConfigError(f"unknown config key 'optimizer.kwargs.{key}' for optimizer '{name}'"
                              + (f" did you mean '{hint}'?" if hint else ""))
    kwargs = dict(kwargs)
    muon_lr = float(kwargs.pop("lr", accepted["lr"].default))
    muon, adamw = muon_split(module)
    groups = [
        {"params": [p for _, p in muon], "use_muon": True, "lr": muon_lr, SCHEDULE_BASE_LR: muon_lr,
         "weight_decay": kwargs.pop("weight_decay", weight_decay)},
        {"params": [p for _, p in adamw], "use_muon": False, "lr": lr, "betas": betas,
         "weight_decay": kwargs.pop("adamw_wd", weight_decay)},
    ]
    return cls([g for g in groups if g["params"]], **kwargs)
