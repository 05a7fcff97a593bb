"""Shared helpers of the trainer tests: a tiny Sudoku dataset and a tiny HRM config (seconds on 2 cores)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

TINY_ARCH = ["arch.hidden_size=32", "arch.num_heads=2", "arch.H_layers=1", "arch.L_layers=1", "arch.H_cycles=1",
             "arch.L_cycles=2", "arch.halt_max_steps=2", "arch.forward_dtype=float32", "arch.expansion=2"]


def build_tiny_sudoku(out: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    if not (out / "train" / "dataset.json").is_file():
        from dataset.build_sudoku_dataset import main as build
        build(["--generate", str(n_train), "--grid", "4", "--blanks", "6", "--test-size", str(n_test),
               "--output-dir", str(out), "--seed", str(seed)])
    return out


def tiny_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    base = {"data_path": str(data), "checkpoint_path": str(run_dir), "run_name": "t", "project_name": "p",
            "global_batch_size": 16, "epochs": 2, "eval_interval": 1, "lr": 1e-3, "puzzle_emb_lr": 1e-3,
            "lr_warmup_steps": 2, "log_every": 2, "logger": "jsonl", "loader_workers": 0}
    base.update(extra)
    return TINY_ARCH + [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def compose(overrides: list[str]):
    """The PretrainConfig Hydra would build from these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from utils.config import build_config
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = hydra_compose("cfg_pretrain", overrides=overrides)
    return build_config(OmegaConf.to_container(cfg, resolve=True))


def train(overrides: list[str]) -> dict:
    """In-process training run. One intra-op thread: tiny models are overhead-bound and two threads on a
    busy 2-core machine are several times slower."""
    import pretrain
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain.train(compose(overrides))
    finally:
        torch.set_num_threads(threads)


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300, cwd: Path | None = None):
    full_env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([PY, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def load_step_weights(step_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(step_dir / name))


LM_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
           "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


def build_tiny_text_lm(root: Path) -> Path:
    """The LM tests' tiny text dataset in root/data: LM_TEXT, a 300-token BPE, 32-token windows, 20 % validation."""
    (root / "corpus.txt").write_text(LM_TEXT)
    data = root / "data"
    r = run_cli(["-m", "dataset.build_lm_dataset", "--source", str(root / "corpus.txt"), "--output-dir", str(data),
                 "--vocab-size", "300", "--max-seq-len", "32", "--val-ratio", "0.2", "--doc-chars", "300", "--seed", "0"])
    assert r.returncode == 0, r.stderr
    return data
