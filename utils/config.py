"""The training config: a dataclass schema for `config/cfg_pretrain.yaml`, strict validation of the
composed Hydra config (arch keys checked against the model's own `config_class`), and a check of the
command-line overrides that runs before Hydra, so a misspelt key fails with one line naming the
closest valid key instead of Hydra's multi-line "not in struct" error."""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from utils import model_schema
from utils.functions import load_model_class
from utils.schema import ConfigError, check_keys, closest_key, field_names, from_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"

# Keys the trainer fills into the arch config from the training split's metadata (the original injects
# batch_size, vocab_size, seq_len, num_puzzle_identifiers). Only those the model's config declares are set.
INJECTED_ARCH_KEYS = ("batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers", "pad_id", "bos_id", "eos_id")


@dataclass
class OptimizerConfig:
    name: str = "adam_atan2"            # or any pytorch_optimizer name (adamw, lion, ranger21, ...)
    kwargs: dict = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    name: str = "cosine_warmup"         # the original's warmup + cosine; or any pytorch_optimizer scheduler
    kwargs: dict = field(default_factory=dict)


@dataclass
class SaveBestConfig:
    metric: Optional[str] = None        # e.g. eval/exact_accuracy; None = no best-model tracking
    mode: str = "max"                   # max | min


@dataclass
class PretrainConfig:
    arch: dict
    # --- keys of the original cfg_pretrain.yaml / PretrainConfig -----------------------------------
    data_path: str = "data/arc-aug-1000"
    global_batch_size: int = 768
    epochs: int = 100000
    eval_interval: Optional[int] = 10000   # in epochs; None = only at the end
    checkpoint_every_eval: bool = True
    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    lr_warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    puzzle_emb_weight_decay: float = 0.1
    puzzle_emb_lr: float = 1e-2
    seed: int = 0
    project_name: Optional[str] = None
    run_name: Optional[str] = None
    checkpoint_path: Optional[str] = None
    eval_save_outputs: list = field(default_factory=list)
    # --- added: the seed trainer's features as Hydra keys ---------------------------------------------
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    grad_accum_steps: int = 1
    grad_clip: float = 0.0                  # max L2 norm of dense grads; 0 = off
    ema: bool = False                       # EMA of the weights, used by evals, best/, evaluate.py (utils/ema.py)
    ema_rate: float = 0.999                 # in [0, 1): shadow = (1 - rate) * param + rate * shadow per step
    mixed_precision: str = "none"           # none | bf16 (torch.autocast around the forward)
    compile: Union[bool, str] = False       # false | true | auto (utils/modeling.py compile_decision)
    linear_backend: str = "torch"           # torch | auto | onednn (models/layers.py resolve_linear_backend)
    device: str = "auto"                    # auto | cpu | cuda
    checkpoint_limit: int = 0               # keep the newest N step_* dirs; 0 = keep all
    checkpoint_interval_steps: Optional[int] = None  # also checkpoint every N optimizer steps
    save_best: SaveBestConfig = field(default_factory=SaveBestConfig)
    eval_patience: int = 0                  # stop after N evals without improving save_best.metric; 0 = off
    eval_patience_grace_steps: int = 0      # evals before this step never count against patience
    reset_progress: bool = False            # resume weights only: restart step, optimizers, schedule, data
    init_from: Optional[str] = None         # weights only (ours or the original's); resizes the puzzle table
    log_every: int = 10                     # optimizer steps between metric syncs / log lines
    max_eval_batches: Optional[int] = None
    eval_batch_size: Optional[int] = None   # global; default = global_batch_size
    eval_split: str = "test"
    eval_halting: str = "all"               # all (the original: every segment) | q (stop at the arch's halt rule)
    eval_max_segments: Optional[int] = None  # eval budget in ACT segments; None = arch.halt_max_steps
    eval_samples: int = 1                   # K trajectories per puzzle (batched), one answer chosen
    eval_noise_std: float = 0.0             # Gaussian noise on the latent per recursion step, x its RMS
    eval_select: str = "q"                  # q | first_halt | vote: how the answer is chosen among K
    eval_save_segments: bool = False        # eval outputs also get each segment's argmax + the halting segment
    eval_examples: int = 4                  # wrong and right examples per eval panel (PNG + W&B image); 0 = off
    eval_answers: Union[bool, str] = "auto"  # LM: greedy-decode every answer -> eval/answer_exact (utils/lm_eval.py)
    eval_answer_max_examples: Optional[int] = None  # LM: answer-decode at most the first N examples per split
    eval_extrap_split: Optional[str] = None  # LM: also answer-evaluate this split as eval_extrap/... (e.g. test)
    logger: str = "auto"                    # auto | wandb | jsonl | none (jsonl is always written by wandb too)
    wandb_group: Optional[str] = None       # default: one group per multirun sweep
    max_steps: Optional[int] = None         # stop (with a checkpoint) after this many steps
    nonfinite_loss: str = "stop"            # stop | skip
    nonfinite_max_skips: int = 20           # skip mode: stop after this many consecutive skipped steps
    peak_flops: Optional[float] = None      # per device, for MFU; None = auto for known GPUs
    loader_workers: int = 1                 # 0 = in-process data loading
    experiment: Optional[str] = None        # set by the Hydra `experiment=` group (informational)


CHOICES = {
    "mixed_precision": ("none", "bf16"),
    "device": ("auto", "cpu", "cuda"),
    "linear_backend": ("torch", "auto", "onednn"),  # models/layers.py resolve_linear_backend
    "logger": ("auto", "wandb", "jsonl", "none"),
    "nonfinite_loss": ("stop", "skip"),
    "eval_halting": ("all", "q"),
    "eval_select": ("q", "first_halt", "vote"),
}

# Allowed ranges of the numeric keys: key -> (low, high, high excluded). Null stays allowed where the schema
# says Optional; floats must be finite too (lr=nan passed before and trained NaN weights).
MAX_EVAL_EXAMPLES = 32  # per kind (wrong, right): a panel taller than this is no longer glanceable

BOUNDS = {
    "global_batch_size": (1, None, False), "epochs": (1, None, False), "grad_accum_steps": (1, None, False),
    "log_every": (1, None, False), "eval_interval": (1, None, False), "checkpoint_interval_steps": (1, None, False),
    "max_steps": (1, None, False), "max_eval_batches": (1, None, False), "eval_batch_size": (1, None, False),
    "nonfinite_max_skips": (1, None, False), "checkpoint_limit": (0, None, False),
    "lr_warmup_steps": (0, None, False), "eval_patience": (0, None, False),
    "eval_patience_grace_steps": (0, None, False), "loader_workers": (0, None, False),
    "lr": (0.0, None, False), "puzzle_emb_lr": (0.0, None, False), "weight_decay": (0.0, None, False),
    "puzzle_emb_weight_decay": (0.0, None, False), "grad_clip": (0.0, None, False),
    "lr_min_ratio": (0.0, 1.0, False), "beta1": (0.0, 1.0, True), "beta2": (0.0, 1.0, True),
    "peak_flops": (1.0, None, False), "ema_rate": (0.0, 1.0, True), "eval_examples": (0, MAX_EVAL_EXAMPLES, False),
    "eval_answer_max_examples": (1, None, False),
}


def check_bounds(cfg) -> None:
    """Every numeric key finite and inside BOUNDS, else one ConfigError naming the key and the range."""
    import math
    for key, (low, high, high_open) in BOUNDS.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number; got {value}")
        if high is None:
            ok, wanted = value >= low, f">= {low}"
        else:
            ok = low <= value < high if high_open else low <= value <= high
            wanted = f"in [{low}, {high}{')' if high_open else ']'}"
        if not ok:
            raise ConfigError(f"config key '{key}' must be {wanted}; got {value}")


def check_eval_keys(values: dict) -> None:
    """The inference keys (eval_halting, eval_max_segments, eval_samples, eval_noise_std, eval_select),
    shared by pretrain.py and evaluate.py: one ConfigError line for the first bad one."""
    import math
    for key in ("eval_halting", "eval_select"):
        if key in values and values[key] not in CHOICES[key]:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(CHOICES[key])}; got {values[key]!r}")
    samples = values.get("eval_samples", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"config key 'eval_samples' must be an integer >= 1; got {samples!r}")
    std = values.get("eval_noise_std", 0.0)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ConfigError(f"config key 'eval_noise_std' must be a finite number >= 0; got {std!r}")
    cap = values.get("eval_max_segments")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"config key 'eval_max_segments' must be an integer >= 1 or null; got {cap!r}")


def build_config(raw: dict) -> PretrainConfig:
    """Composed (resolved) config dict -> PretrainConfig, refusing unknown or mistyped keys."""
    raw = dict(raw)
    raw.pop("hydra", None)
    check_keys(raw.keys(), field_names(PretrainConfig))
    nested = {"optimizer": OptimizerConfig, "lr_scheduler": SchedulerConfig, "save_best": SaveBestConfig}
    for key, cls in nested.items():
        if key in raw:
            value = raw[key]
            if isinstance(value, str) and key in ("optimizer", "lr_scheduler"):
                value = {"name": value}  # `optimizer=adamw` is a natural shorthand
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
            raw[key] = from_dict(cls, value, where=key)
            for sub in ("kwargs",):
                if hasattr(raw[key], sub) and not isinstance(getattr(raw[key], sub), dict):
                    raise ConfigError(f"config key '{key}.{sub}' expects a mapping, got {getattr(raw[key], sub)!r}")
    if "arch" not in raw or not isinstance(raw["arch"], dict):
        raise ConfigError("config key 'arch' is required (a mapping; choose one with arch=hrm_v1)")
    if not isinstance(raw.get("eval_save_outputs", []), list):
        raise ConfigError(f"config key 'eval_save_outputs' expects a list, got {raw['eval_save_outputs']!r}")
    cfg = from_dict(PretrainConfig, raw)
    if cfg.mixed_precision == "fp16":
        # fp16 gradients underflow without dynamic loss scaling, which this trainer does not implement;
        # refusing beats training silently on zeroed gradients.
        raise ConfigError("config key 'mixed_precision': fp16 needs loss scaling, which is not implemented; "
                          "use bf16 (HRM's own forward dtype) or none")
    if cfg.compile not in (True, False, "auto"):
        raise ConfigError(f"config key 'compile' must be true, false or auto; got {cfg.compile!r}")
    if cfg.eval_answers not in (True, False, "auto"):
        raise ConfigError(f"config key 'eval_answers' must be true, false or auto; got {cfg.eval_answers!r}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    check_eval_keys(dataclasses.asdict(cfg))
    if cfg.save_best.mode not in ("max", "min"):
        raise ConfigError(f"config key 'save_best.mode' must be max or min; got {cfg.save_best.mode!r}")
    check_bounds(cfg)
    if cfg.logger == "wandb":
        from utils.logger import wandb_blocker
        blocker = wandb_blocker()
        if blocker:
            raise ConfigError(f"logger=wandb, but W&B cannot log: {blocker}. Run `wandb login`, set WANDB_API_KEY, "
                              "or WANDB_MODE=offline to log locally; logger=auto falls back to metrics.jsonl")
    check_arch(cfg.arch)
    return cfg


def loss_head_keys(loss_cls: type) -> list[str]:
    params = inspect.signature(loss_cls.__init__).parameters
    return [p for p in params if p not in ("self", "model") and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,)]


def _require_arch_names(arch: dict) -> None:
    if "name" not in arch:
        raise ConfigError("config key 'arch.name' is required (e.g. hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1)")
    if "loss" not in arch or not isinstance(arch["loss"], dict) or "name" not in arch["loss"]:
        raise ConfigError("config key 'arch.loss.name' is required (e.g. losses@ACTLossHead)")


def check_arch(arch: dict) -> None:
    """validate_arch without importing the model (so without torch): the schema is read from the source
    (utils/model_schema.py); where the source does not say, the classes are imported after all."""
    from utils.schema import _coerce
    _require_arch_names(arch)
    fields = model_schema.model_config_fields(arch["name"])
    loss = model_schema.loss_head_keys(arch["loss"]["name"])
    if fields is None or loss is None:
        validate_arch(arch)
        return
    specs = {f.name: f for f in fields}
    model_keys = [k for k in arch if k not in ("name", "loss")]
    check_keys(model_keys, specs, where="arch")
    for key in model_keys:
        _coerce(arch[key], specs[key].type, f"arch.{key}")
    loss_keys, takes_kwargs = loss
    if not takes_kwargs:
        check_keys([k for k in arch["loss"] if k != "name"], loss_keys, where="arch.loss")


def validate_arch(arch: dict) -> tuple[type, type]:
    """Check every arch key against the model's `config_class` and the loss head's constructor.

    Returns (model class, loss-head class)."""
    _require_arch_names(arch)
    model_cls = load_model_class(arch["name"])
    loss_cls = load_model_class(arch["loss"]["name"])
    model_keys = [k for k in arch if k not in ("name", "loss")]
    config_class = getattr(model_cls, "config_class", None)
    if config_class is not None:
        check_keys(model_keys, field_names(config_class), where="arch")
        # Type check the given keys too; injected keys may be missing at this point.
        hints = {f.name: f for f in dataclasses.fields(config_class)}
        partial = {k: arch[k] for k in model_keys}
        _type_check_partial(config_class, partial, hints)
    loss_keys = loss_head_keys(loss_cls)
    if not any(inspect.signature(loss_cls.__init__).parameters[p].kind is inspect.Parameter.VAR_KEYWORD for p in loss_keys):
        check_keys([k for k in arch["loss"] if k != "name"], loss_keys, where="arch.loss")
    return model_cls, loss_cls


def _type_check_partial(config_class: type, partial: dict, fields: dict) -> None:
    import typing
    from utils.schema import _coerce
    hints = typing.get_type_hints(config_class)
    import math
    for key, value in partial.items():
        value = _coerce(value, hints.get(key, Any), f"arch.{key}")
        if isinstance(value, float) and not math.isfinite(value):  # no arch knob means anything at nan/inf
            raise ConfigError(f"config key 'arch.{key}' must be a finite number; got {value}")


def model_config_dict(arch: dict, injected: dict) -> dict:
    """The dict handed to the model constructor: arch keys (minus name/loss) + injected metadata values
    for the keys the model's config declares."""
    model_cls = load_model_class(arch["name"])
    config_class = getattr(model_cls, "config_class", None)
    declared = set(field_names(config_class)) if config_class is not None else set(INJECTED_ARCH_KEYS)
    out = {k: v for k, v in arch.items() if k not in ("name", "loss")}
    for key, value in injected.items():
        if key in declared and value is not None:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# Command-line overrides, checked before Hydra composes anything.

def _group_options(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _split_values(value: str) -> list[str]:
    """Hydra sweep syntax a,b,c -> [a, b, c] (ignores commas inside brackets/quotes)."""
    out, depth, cur, quote = [], 0, "", None
    for ch in value:
        if quote:
            cur += ch
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def _arch_yaml(name: str) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "arch" / f"{name}.yaml"), resolve=False)


def _experiment_arch(name: str, depth: int = 0) -> Optional[str]:
    """The arch an experiment file selects through its defaults (`override /arch: X`, possibly via another
    experiment it starts from), or None."""
    from omegaconf import OmegaConf
    path = CONFIG_DIR / "experiment" / f"{name}.yaml"
    if depth > 8 or not path.is_file():
        return None
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        if isinstance(entry, dict) and "override /arch" in entry:
            return entry["override /arch"]
        if isinstance(entry, str) and entry != "_self_":
            found = _experiment_arch(entry, depth + 1)
            if found:
                return found
    return None


def preflight_overrides(argv: list[str]) -> None:
    """Validate `key=value` overrides of a pretrain command line before Hydra runs.

    Catches misspelt top-level keys, arch keys and loss keys, and unknown arch/experiment choices."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    top_fields = field_names(PretrainConfig)
    nested = {"optimizer": OptimizerConfig, "lr_scheduler": SchedulerConfig, "save_best": SaveBestConfig}
    arch_choices = ["hrm_v1"]
    for ov in overrides:  # an experiment may choose the arch (`override /arch: trm`); `arch=` wins over it
        key, value = ov.split("=", 1)
        if key == "experiment":
            arch_choices = sorted({_experiment_arch(e) or "hrm_v1" for e in _split_values(value)})
    for ov in overrides:
        key, value = ov.split("=", 1)
        if key == "arch":
            arch_choices = _split_values(value)
    for ov in overrides:
        key, value = ov.split("=", 1)
        if key.startswith(("hydra.", "hydra/", "+", "~", "++")) or key == "hydra":
            continue
        parts = key.split(".")
        if key in ("arch", "experiment"):
            options = _group_options(key)
            for choice in _split_values(value):
                if choice not in options and choice != "null":
                    hint = closest_key(choice, options)
                    raise ConfigError(f"unknown {key} '{choice}' (config/{key}/{choice}.yaml)"
                                      + (f" did you mean '{hint}'?" if hint else f"; choose from {', '.join(options)}"))
            continue
        if parts[0] not in top_fields:
            raise ConfigError(_unknown(parts[0], top_fields, ""))
        if parts[0] in nested and len(parts) > 1:
            sub = field_names(nested[parts[0]])
            if parts[1] not in sub:
                raise ConfigError(_unknown(parts[1], sub, parts[0]))
        if parts[0] == "arch" and len(parts) > 1:
            for choice in arch_choices:
                if (CONFIG_DIR / "arch" / f"{choice}.yaml").is_file():
                    _check_arch_override(parts[1:], _arch_yaml(choice))


def _unknown(key: str, valid: list[str], where: str) -> str:
    hint = closest_key(key, valid)
    full = f"{where}.{key}" if where else key
    return f"unknown config key '{full}'" + (f" did you mean '{hint}'?" if hint else f"; valid keys: {', '.join(sorted(valid))}")


def _check_arch_override(parts: list[str], arch_yaml: dict) -> None:
    try:
        fields = model_schema.model_config_fields(arch_yaml["name"])
        loss = model_schema.loss_head_keys(arch_yaml["loss"]["name"])
    except (KeyError, TypeError):
        return  # reported properly after composition
    if parts[0] == "loss":
        if len(parts) > 1 and loss is not None and not loss[1]:
            valid = ["name"] + list(loss[0])
            if parts[1] not in valid:
                raise ConfigError(_unknown(parts[1], valid, "arch.loss"))
        return
    if fields is None:
        return
    valid = ["name", "loss"] + [f.name for f in fields]
    if parts[0] not in valid:
        raise ConfigError(_unknown(parts[0], valid, "arch"))


def default_names(cfg: PretrainConfig, model_cls_name: str, rng_seed: int | None = None,
                  arch_choice: str | None = None) -> tuple[str, str, str]:
    """(project_name, run_name, checkpoint_path); the original's defaults for the missing ones, with '-' for
    its spaces (they become directory names) and the arch choice (hrm_v1_gated, ...) when it is known, so
    that the runs of an `arch=hrm_v1,hrm_v1_gated` sweep do not share one prefix."""
    project = cfg.project_name or f"{os.path.basename(os.path.normpath(cfg.data_path)).capitalize()}-ACT-torch"
    run = cfg.run_name
    if run is None:
        import random
        import coolname
        # A private Random: the slug never touches (or depends on) the global RNG state.
        coolname.replace_random(random.Random(rng_seed))
        run = f"{arch_choice or model_cls_name}-{coolname.generate_slug(2)}"
    path = cfg.checkpoint_path or os.path.join("checkpoints", project, run)
    return project, run, path
