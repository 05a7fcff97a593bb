"""Checkpoints: `<checkpoint_path>/step_N/{model.safetensors, train_state.pt, config.yaml}`.

- `model.safetensors`: the loss head's state_dict with the original's names (`model.inner.…`), no
  `_orig_mod.` prefix, so it loads into the original code too.
- `train_state.pt`: everything else needed for an exact resume (optimizers, schedulers, step, data
  position, ACT carry and RNG states of every rank), as plain containers of tensors/numbers, so it
  loads with `torch.load(weights_only=True)`. Files holding pickled objects are refused, never run.
- `config.yaml`: the resolved config, arch keys injected from the dataset included, so the model can
  be rebuilt from the checkpoint alone.

Writes are atomic: a temp dir next to the target, fsync, then rename. Replacing an existing dir (`best`,
or a step written twice) takes two renames: the old dir first moves to `.tmp-old-<name>-<pid>`, which the
next start renames back if the new one never arrived. A kill at any moment therefore leaves every
previous checkpoint intact and never a half-written `step_N`; tests/test_checkpoint_faults.py kills a
save at each of its renames and unlinks to check that."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from models.common import rename_legacy_keys

STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, refused, shapes that do not fit). One-line message."""


# Fault injection for the crash-safety tests: when set, called as hook(op, path) right before every
# rename, unlink and rmdir that saving, rotating or recovering checkpoints performs ("rename", "unlink",
# "rmdir"), so a test can kill the process at exactly that instant.
fault_hook = None


def _fs_op(op: str, path: Path) -> None:
    if fault_hook is not None:
        fault_hook(op, path)


def _replace(src: Path, dst: Path) -> None:
    _fs_op("rename", src)
    os.replace(src, dst)


def _rmtree(path: Path) -> None:
    """shutil.rmtree(ignore_errors=True), but one unlink at a time so that the fault hook sees each."""
    try:
        if path.is_dir() and not path.is_symlink():
            for p in sorted(path.iterdir()):
                _rmtree(p)
            _fs_op("rmdir", path)
            path.rmdir()
        elif path.exists() or path.is_symlink():
            _fs_op("unlink", path)
            path.unlink()
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
    except KeyboardInterrupt:  # Ctrl-C mid-delete: finish it, so no .tmp-* is left behind, then stop
        shutil.rmtree(path, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# Directory handling

def check_writable(path: str | os.PathLike) -> None:
    """Fail early (before training) if checkpoints could not be written under `path`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint dir '{path}' is not writable ({e.strerror or e})") from None


def list_step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete `step_N` checkpoints under run_dir, oldest first (temp dirs are never named step_N)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / WEIGHTS_FILE).is_file() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = list_step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


OLD_RE = re.compile(r"^\.tmp-old-(?P<name>.+)-(?P<pid>\d+)$")


def _is_complete(step_dir: Path) -> bool:
    return (step_dir / WEIGHTS_FILE).is_file() and (step_dir / CONFIG_FILE).is_file()


def remove_stale_temps(run_dir: str | os.PathLike) -> list[Path]:
    """Clean up after a killed writer (call it with the run dir locked): a `.tmp-old-<name>-<pid>` whose
    replacement `<name>` never arrived is renamed back to `<name>`; every other `.tmp-*` is removed.
    Returns the recovered dirs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    recovered = []
    for p in sorted(run_dir.iterdir()):
        m = OLD_RE.match(p.name)
        if m and p.is_dir() and not (run_dir / m.group("name")).exists() and _is_complete(p):
            _replace(p, run_dir / m.group("name"))
            recovered.append(run_dir / m.group("name"))
    for p in run_dir.iterdir():
        if p.name.startswith(".tmp-"):
            _rmtree(p)
    if recovered:
        _fsync_dir(run_dir)
    return recovered


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or as torch.save's "unexpected pos" / safetensors' IoError text."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)
    return any(s in text for s in ("No space left", "unexpected pos", "StorageFull", "Disk quota", "File too large"))


def _write_error(e: BaseException, final: Path, run_dir: Path) -> CheckpointError | None:
    """The one-line error for a failed write (None: not a file-system problem, re-raise as is)."""
    if _is_disk_full(e):
        try:
            free = f"; {shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free"
        except OSError:
            free = ""
        return CheckpointError(f"no space left on device while writing checkpoint '{final}'{free}; "
                               f"the previous checkpoints in '{run_dir}' are intact (free space or set checkpoint_limit)")
    if isinstance(e, OSError):
        return CheckpointError(f"cannot write checkpoint '{final}': {e.strerror or e}; "
                               f"the previous checkpoints in '{run_dir}' are intact")
    return None


def save_checkpoint(run_dir: str | os.PathLike, name: str, weights: dict[str, torch.Tensor],
                    train_state: dict | None, config_yaml: str, extra_files: dict[str, str] | None = None,
                    extra_arrays: dict[str, dict] | None = None,
                    ema_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `<run_dir>/<name>/` atomically and return its path. `extra_arrays`: {file name: {key: numpy
    array}} written with np.savez_compressed inside the same atomic write (eval outputs). `ema_weights`:
    the EMA shadow, written as ema.safetensors."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir()
    try:
        for fname, state in ((WEIGHTS_FILE, weights), (EMA_FILE, ema_weights)):
            if state is not None:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp / fname),
                          metadata={"format": "pt"})
                os.chmod(tmp / fname, 0o666 & ~_umask())  # safetensors creates it 0600; match the other files
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        if extra_arrays:
            import numpy as np
            for fname, arrays in extra_arrays.items():
                with open(tmp / fname, "wb") as f:
                    np.savez_compressed(f, **arrays)
        for p in tmp.iterdir():
            _fsync_file(p)
        _fsync_dir(tmp)
        if final.exists():
            # Two renames; between them the old dir exists only as .tmp-old-*, which remove_stale_temps
            # renames back. It is deleted only once the new dir is in place.
            old = run_dir / f".tmp-old-{name}-{os.getpid()}"
            _replace(final, old)
            _replace(tmp, final)
            _fsync_dir(run_dir)
            _rmtree(old)
        else:
            _replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # Ctrl-C or a full disk: nothing partial stays behind
        error = _write_error(e, final, run_dir) if isinstance(e, Exception) else None
        if error is not None:
            raise error from None
        raise
    return final


def rotate_checkpoints(run_dir: str | os.PathLike, limit: int) -> list[Path]:
    """Delete all but the newest `limit` step_N dirs (limit 0 keeps all). Returns the removed paths."""
    if limit <= 0:
        return []
    removed = []
    for _, path in list_step_dirs(run_dir)[:-limit]:
        trash = path.with_name(f".tmp-del-{path.name}")
        _replace(path, trash)  # gone from the step_N namespace at once, then removed at leisure
        _rmtree(trash)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------
# Loading

def safe_torch_load(path: str | os.PathLike) -> Any:
    """torch.load that refuses pickled objects (never executes them)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        detail = next((l for l in lines if "GLOBAL" in l or "Unsupported global" in l), None)
        if detail is None:  # not a pickle of objects, just not a checkpoint
            raise CheckpointError(f"checkpoint '{path}' cannot be read: not a torch checkpoint "
                                  f"({(lines[-1] if lines else '')[:120]})") from None
        raise CheckpointError(f"checkpoint '{path}' holds pickled Python objects; refused without loading them "
                              f"(only tensors and plain containers are accepted: {detail.strip()[:160]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint '{path}' cannot be read: {str(e).splitlines()[0][:200]}") from None


def strip_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """-> (weights file, kind) where kind is "ours" (step dir / model.safetensors) or "original" (step_N file)."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return path / WEIGHTS_FILE, "ours"
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest / WEIGHTS_FILE, "ours"
        raise CheckpointError(f"checkpoint dir '{path}' has no {WEIGHTS_FILE} and no step_N checkpoints")
    if path.is_file():
        return path, "ours" if path.suffix == ".safetensors" else "original"
    raise CheckpointError(f"checkpoint '{path}' does not exist")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' is not a valid safetensors file ({e})") from None


def ema_file(path: str | os.PathLike) -> Path | None:
    """The `ema.safetensors` of the checkpoint `path` points at, or None (no EMA; the original's files)."""
    weights_file, kind = resolve_checkpoint(path)
    candidate = weights_file.parent / EMA_FILE
    return candidate if kind == "ours" and candidate.is_file() else None


def load_ema(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    found = ema_file(path)
    return None if found is None else _load_safetensors(found)


def load_weights(path: str | os.PathLike, ema: bool = False) -> dict[str, torch.Tensor]:
    """Weights of our checkpoints or the original's `step_N` file (a torch.save'd state_dict). With `ema`,
    the checkpoint's EMA parameters (if it has them) replace the live ones: the model to evaluate or start from."""
    weights_file, kind = resolve_checkpoint(path)
    if kind == "ours":
        weights = _load_safetensors(weights_file)
        shadow = load_ema(weights_file) if ema else None
        for key, value in (shadow or {}).items():
            if key not in weights or weights[key].shape != value.shape:
                raise CheckpointError(f"checkpoint '{weights_file.parent}': {EMA_FILE} key '{key}' "
                                      f"does not match {WEIGHTS_FILE} (shape {list(value.shape)})")
            weights[key] = value
        return weights
    state = safe_torch_load(weights_file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint '{weights_file}' is not a state_dict of tensors")
    return strip_compile_prefix(state)


def load_train_state(step_dir: str | os.PathLike) -> dict:
    state = safe_torch_load(Path(step_dir) / STATE_FILE)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"'{Path(step_dir) / STATE_FILE}' is not a train state (no 'step')")
    return state


PUZZLE_TABLE_SUFFIX = "puzzle_emb.weights"


def apply_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str,
                  resize_puzzle_emb: bool = False) -> list[str]:
    """Copy `weights` into module's state (params + persistent buffers), refusing missing keys, extra keys
    and shape mismatches with a message naming the key and both shapes. With `resize_puzzle_emb`, a
    puzzle-embedding table with another row count is resized: shared rows copied, new rows = the mean
    row (a neutral start for puzzles the checkpoint never saw). Returns notes on what was resized."""
    own = module.state_dict()
    weights = rename_legacy_keys(module, strip_compile_prefix(weights))
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    if missing:
        raise CheckpointError(f"checkpoint '{source}' lacks key '{missing[0]}' that the model needs "
                              f"({len(missing)} missing); is it for this arch?")
    if extra:
        raise CheckpointError(f"checkpoint '{source}' has key '{extra[0]}' that the model does not have "
                              f"({len(extra)} unexpected); is it for this arch?")
    notes = []
    fixed = {}
    for key, target in own.items():
        value = weights[key]
        if value.shape != target.shape:
            if resize_puzzle_emb and key.endswith(PUZZLE_TABLE_SUFFIX) and value.dim() == 2 and value.shape[1] == target.shape[1]:
                rows = min(value.shape[0], target.shape[0])
                new = value.mean(dim=0, keepdim=True).expand(target.shape[0], -1).clone()
                new[:rows] = value[:rows]
                value = new
                notes.append(f"resized '{key}' from {list(weights[key].shape)} to {list(target.shape)}")
            else:
                raise CheckpointError(f"checkpoint '{source}': key '{key}' has shape {list(value.shape)} "
                                      f"but the config gives {list(target.shape)}")
        fixed[key] = value.to(dtype=target.dtype)
    module.load_state_dict(fixed, strict=True)
    return notes


# ------------------------------------------------------------------------------------------------
# Nested state (ACT carries are dataclasses of tensors) <-> flat dicts torch.load(weights_only) accepts

def flatten_state(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().to("cpu").clone()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            out.update(flatten_state(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_state(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten_state(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def restore_state(template: Any, flat: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Rebuild `template` (same structure as what was flattened) with the tensors of `flat`."""
    if isinstance(template, torch.Tensor):
        if prefix not in flat:
            raise CheckpointError(f"saved carry lacks '{prefix}'")
        value = flat[prefix]
        if value.shape != template.shape:
            raise CheckpointError(f"saved carry '{prefix}' has shape {list(value.shape)}, expected {list(template.shape)}")
        return value.to(device=template.device, dtype=template.dtype)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        values = {f.name: restore_state(getattr(template, f.name), flat, f"{prefix}.{f.name}" if prefix else f.name)
                  for f in dataclasses.fields(template)}
        return dataclasses.replace(template, **values) if all(f.init for f in dataclasses.fields(template)) else _setattrs(template, values)
    if isinstance(template, dict):
        return type(template)({k: restore_state(v, flat, f"{prefix}.{k}" if prefix else str(k)) for k, v in template.items()})
    if isinstance(template, (list, tuple)):
        items = [restore_state(v, flat, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(template)]
        return type(template)(items) if isinstance(template, list) else tuple(items)
    return template


def _setattrs(obj, values):
    for k, v in values.items():
        setattr(obj, k, v)
    return obj


def to_plain(obj: Any) -> Any:
    """numpy scalars/arrays -> Python numbers / tensors, so the object passes torch.load(weights_only=True)."""
    import numpy as np
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj) if isinstance(obj, list) else tuple(to_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    return obj


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Rebuilding a model from a checkpoint alone (evaluate.py, generate.py)

def _find(weights: dict[str, torch.Tensor], suffix: str) -> torch.Tensor | None:
    return next((v for k, v in weights.items() if k.endswith(suffix)), None)


def _injected_from_original(raw: dict, weights: dict[str, torch.Tensor], data_path: str | None) -> dict:
    """The arch keys the original injected at training time, recovered from the data's metadata when
    it is there, else from the weights' shapes."""
    injected: dict[str, Any] = {"batch_size": int(raw.get("global_batch_size", 1))}
    meta_file = Path(data_path or raw.get("data_path", "")) / "train" / "dataset.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        injected.update({k: meta[k] for k in ("seq_len", "vocab_size", "num_puzzle_identifiers")})
    emb = _find(weights, "embed_tokens.embedding_weight")
    if emb is not None:
        injected.setdefault("vocab_size", int(emb.shape[0]))
    table = _find(weights, "puzzle_emb.weights")
    injected.setdefault("num_puzzle_identifiers", int(table.shape[0]) if table is not None else 1)
    if "seq_len" not in injected:
        pos = _find(weights, "embed_pos.embedding_weight")
        if pos is None:
            raise CheckpointError(f"cannot tell seq_len of this checkpoint: pass data_path=<the dataset it was "
                                  f"trained on> (no {meta_file})")
        arch = raw["arch"]
        # HRM's prefix rule, or TRM's explicit puzzle_emb_len when it is set (> 0)
        puzzle_len = int(arch.get("puzzle_emb_len", 0)) or -(-int(arch.get("puzzle_emb_ndim", 0)) // int(arch.get("hidden_size", 512)))
        injected["seq_len"] = int(pos.shape[0]) - puzzle_len
    return injected


# Keys the original TRM's pretrain.py adds that only its trainer reads (evaluator list, eval spacing, frozen
# weights, a checkpoint to start from); a model rebuilt from the weights ignores them.
TRM_TRAINER_ONLY_KEYS = ("data_paths_test", "evaluators", "min_eval_interval", "freeze_weights", "load_checkpoint")


def _trm_config_to_ours(raw: dict, cfg_file: Path, data_path: str | None) -> dict:
    """The original TRM's all_config.yaml has `data_paths` (a list) where HRM and we have `data_path`."""
    if "data_paths" not in raw:
        return raw
    raw = {k: v for k, v in raw.items() if k not in TRM_TRAINER_ONLY_KEYS}
    paths = raw.pop("data_paths") or []
    if data_path is None and len(paths) != 1:
        raise CheckpointError(f"{cfg_file}: data_paths has {len(paths)} entries; pass data_path=<the dataset to "
                              f"evaluate on>")
    raw["data_path"] = data_path or paths[0]
    return raw


def load_model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                               data_path: str | None = None, ema: bool = True):
    """-> (PretrainConfig, loss head in eval mode on `device`).

    `path`: one of our `step_N` dirs (or a run dir: its newest step), our `model.safetensors`, or the
    original's `step_N` file with `all_config.yaml` beside it. `ema`: use the EMA weights when the
    checkpoint has them (False: the live training weights)."""
    from omegaconf import OmegaConf

    from utils.config import build_config
    from utils.modeling import build_head, set_linear_backend

    weights_file, kind = resolve_checkpoint(path)
    cfg_file = weights_file.parent / (CONFIG_FILE if kind == "ours" else "all_config.yaml")
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint '{path}': no {cfg_file.name} beside the weights ({cfg_file})")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)
    except Exception as e:  # YAML errors come in several classes
        raise CheckpointError(f"{cfg_file}: not a readable config ({str(e).splitlines()[0]})") from None
    if kind == "original":
        raw = _trm_config_to_ours(raw, cfg_file, data_path)
    if data_path is not None:
        raw["data_path"] = data_path
    weights = load_weights(weights_file, ema=ema)
    injected = {} if kind == "ours" else _injected_from_original(raw, weights, data_path)
    cfg = build_config(raw)
    head = build_head(cfg.arch, injected, seed=cfg.seed)
    apply_weights(head, weights, str(weights_file))
    head.to(device)
    set_linear_backend(head, cfg.linear_backend, device)
    head.eval()
    return cfg, head


def archive_run(run_dir: str | os.PathLike, name: str) -> Path:
    """Move a run's checkpoints, best model and logs into `<run_dir>/<name>/` (replacing an older one),
    leaving the run dir empty for a fresh start (reset_progress)."""
    run_dir = Path(run_dir)
    target = run_dir / name
    if target.exists():
        shutil.rmtree(target)
    staging = run_dir / f".tmp-{name}-{os.getpid()}"
    staging.mkdir()
    for p in list(run_dir.iterdir()):
        if STEP_RE.match(p.name) or p.name in ("best", "metrics.jsonl", "wandb_id.txt"):
            os.replace(p, staging / p.name)
    os.replace(staging, target)
    return target


# ------------------------------------------------------------------------------------------------
# One live run per run dir

LOCK_FILE = ".lock"


class RunDirLock:
    """An exclusive flock on `<run_dir>/.lock` while a run uses the dir. The kernel drops it when its process
    dies, so a dead holder never blocks a restart (its stale file is simply taken over); the file's text
    (pid, host, start time) only names the holder in the refusal."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.created: list[Path] = []  # dirs this run created (leaf first), removed again after a failed start

    def acquire(self) -> "RunDirLock":
        import fcntl
        import socket
        import time
        self.created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
                    os.close(fd)
                    self.created = []
                    raise CheckpointError(f"run dir '{self.run_dir}' is in use by another run ({holder}); wait for "
                                          f"it to end or choose another run_name/checkpoint_path") from None
                try:  # the previous holder may have unlinked the file between our open and flock
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        except OSError as e:
            self.release(failed=True)
            raise CheckpointError(f"checkpoint dir '{self.run_dir}' is not writable ({e.strerror or e})") from None
        self.fd = fd
        return self

    def release(self, failed: bool = False) -> None:
        """Drop the lock; after a failed start also remove the run dir if this run created it and left it empty."""
        if self.fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        for path in self.created if failed else []:
            try:
                path.rmdir()  # only if empty
            except OSError:
                break
        self.created = []
