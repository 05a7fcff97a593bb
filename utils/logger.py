"""Metric logging on rank 0: W&B (online, WANDB_MODE=offline or disabled) plus a JSONL file in the run
directory that always gets the same flat metrics (`train/lm_loss`, `eval/exact_accuracy`, ...).

The default `logger=auto` uses W&B only when it can log (an API key, or WANDB_MODE set) and otherwise
JSONL alone, saying so in one line: a first run without a W&B account must not end in wandb's traceback."""
from __future__ import annotations

import json
import secrets
import math
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from utils.schema import ConfigError

LOCAL_WANDB_MODES = ("offline", "dryrun", "disabled")


def wandb_blocker() -> str | None:
    """Why wandb.init would fail (no credentials for online logging), or None when it can log.

    Looks where wandb 0.2x looks, without importing it: WANDB_MODE, WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE,
    the netrc entry for the W&B host that `wandb login` writes, and the api_key of wandb's settings file."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in LOCAL_WANDB_MODES:
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc or "api.wandb.ai"
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in candidates:
        path = os.path.expanduser(path)
        if os.path.isfile(path):
            try:
                if netrc.netrc(path).authenticators(host):
                    return None
            except (netrc.NetrcParseError, OSError):
                pass
    settings = Path(os.environ.get("WANDB_CONFIG_DIR", "~/.config/wandb")).expanduser() / "settings"
    if settings.is_file() and any(line.split("=")[0].strip() == "api_key" for line in settings.read_text().splitlines()):
        return None
    return f"no W&B API key for {host} (WANDB_MODE is {mode or 'unset'})"


class MetricLogError(ValueError):
    """The metrics log cannot be written (read-only file system, disk full, a directory in its place)."""


def _log_error(path: Path, e: OSError) -> MetricLogError:
    return MetricLogError(f"cannot write the metrics log '{path}': {e.strerror or e} (choose a writable "
                          f"checkpoint_path, or logger=none)")


class MetricLogger:
    """`log(metrics, step)`; `close()`. A no-op on ranks other than 0.

    kind: "auto" (W&B + JSONL when W&B can log, else JSONL), "wandb" (W&B + JSONL), "jsonl" (JSONL only) or
    "none" (nothing)."""

    def __init__(self, kind: str, run_dir: str | os.PathLike, *, project: str, run_name: str, config: dict,
                 group: str | None = None, is_main: bool = True, resume_step: int | None = None):
        self.kind = kind if is_main else "none"
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        if self.kind == "none":
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_jsonl(self.jsonl_path, resume_step)
            with open(self.jsonl_path, "a"):
                pass  # fail now, not at the first log line
        except OSError as e:
            raise _log_error(self.jsonl_path, e) from None
        if self.kind == "auto":
            blocker = wandb_blocker()
            self.kind = "jsonl" if blocker else "wandb"
            if blocker:
                print(f"logger: metrics go to {self.jsonl_path} only ({blocker}; `wandb login` or WANDB_MODE=offline "
                      "turns W&B on)", flush=True)
        if self.kind == "wandb":
            self._start_wandb(project, run_name, config, group, fallback=kind == "auto")

    def _start_wandb(self, project: str, run_name: str, config: dict, group: str | None, fallback: bool) -> None:
        import wandb
        # One W&B run per run directory: a resumed run continues the same W&B run.
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        try:
            self.wandb_run = wandb.init(project=project, name=run_name, config=config, group=group,
                                        dir=str(self.run_dir), id=run_id, resume="allow")
        except Exception as e:  # wandb raises many types (auth, network, usage); the user needs one line
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            if not fallback:
                raise ConfigError(f"logger=wandb: wandb.init failed: {reason} (logger=jsonl logs to "
                                  f"{self.jsonl_path} only)") from None
            print(f"logger: wandb.init failed ({reason}); metrics go to {self.jsonl_path} only", file=sys.stderr, flush=True)
            self.kind = "jsonl"
            return
        if not id_file.is_file():
            id_file.write_text(run_id + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.kind == "none" or not metrics:
            return
        clean = {k: _plain(v) for k, v in metrics.items()}
        try:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        except OSError as e:
            raise _log_error(self.jsonl_path, e) from None
        if self.wandb_run is not None:
            self.wandb_run.log(clean, step=step)

    def log_image(self, key: str, image, step: int, caption: str = "") -> Path | None:
        """A PIL image as `<run dir>/examples/<key>_step_<N>.png` (every logger kind but none) and, with
        W&B, as `wandb.Image` under `key`. Returns the PNG path."""
        if self.kind == "none":
            return None
        from utils.puzzle_view import save_png_atomic
        path = save_png_atomic(image, self.run_dir / "examples" / f"{key.replace('/', '_')}_step_{step}.png")
        if self.wandb_run is not None:
            import wandb
            self.wandb_run.log({key: wandb.Image(str(path), caption=caption or None)}, step=step)
        return path

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: _plain(v) for k, v in values.items()})

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return v
    return v


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (they will be logged again by the resumed run)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
