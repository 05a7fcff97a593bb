"""One prepared GPU check: every CUDA path the CPU test suite cannot reach, in one run of a few minutes on one
H100/H200, with no network. Prints one markdown table (check, result, detail, step ms, MFU).

    bash bench/gpu_check.sh                    # the entry point (pre-checks, then this on the GPU)
    python -m bench.gpu_check --precheck       # CPU-side pre-checks only: imports, data builds, versions
    python -m bench.gpu_check --cpu-dry-run    # every check at a tiny shape on the CPU: tests this script itself

Checks (each one row; one that cannot run says why instead of stopping the rest):
  attention   our attention backends (math, SDPA, flash-attn when importable) agree on one HRM forward, bf16
  hrm bf16    pretrain.py on a 9x9 Sudoku set at the original Sudoku shape (D512, 4+4 layers), bf16 autocast
  hrm compile the same run with torch.compile
  lm bf16     pretrain.py with arch=hrm_lm_mamba on a generated corpus (mamba-ssm kernels when importable)
  nccl        torchrun --nproc-per-node 1 pretrain.py: NCCL process-group init, the 1-rank DDP path
  adam_atan2  the CUDA AdamATan2 package against our pure-PyTorch one, 20 steps (when importable)
  mamba_ssm   mamba-ssm's fused scan against our chunked SSD, one Mamba2 block forward (when importable)
The numbers it prints belong in docs/benchmarks.md with the machine and the date."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS: list[dict] = []
# the original Sudoku model (27.3M params) at the original global batch 768
HRM_FULL = ["arch.hidden_size=512", "arch.num_heads=8", "arch.H_layers=4", "arch.L_layers=4", "arch.H_cycles=2",
            "arch.L_cycles=2", "arch.halt_max_steps=16", "arch.forward_dtype=bfloat16"]
HRM_TINY = ["arch.hidden_size=32", "arch.num_heads=2", "arch.H_layers=1", "arch.L_layers=1", "arch.H_cycles=1",
            "arch.L_cycles=1", "arch.halt_max_steps=2", "arch.forward_dtype=bfloat16"]
LM_TINY = ["arch.hidden_size=32", "arch.num_heads=2", "arch.encoder_layers=1", "arch.decoder_layers=1",
           "arch.H_layers=1", "arch.L_layers=1", "arch.mamba_d_state=8", "arch.mamba_headdim=8"]


class Setup:
    """Full shapes on CUDA, or (--cpu-dry-run) tiny shapes on the CPU to exercise this script's own code."""
    device = "cuda"
    hrm = HRM_FULL
    lm: list[str] = []
    hrm_batch, lm_batch, steps, n_sudoku, n_docs = 768, 64, 60, 2000, 300


def row(check: str, result: str, detail: str = "", step_ms: float | None = None, mfu: float | None = None) -> None:
    ROWS.append({"check": check, "result": result, "detail": detail, "step_ms": step_ms, "mfu": mfu})
    print(f"[gpu_check] {check}: {result} {detail}", file=sys.stderr, flush=True)


def guarded(check: str):
    """Run one check; an exception becomes a FAIL row with its first line, and the next check still runs."""
    def wrap(fn):
        def run(*a, **kw):
            t0 = time.time()
            try:
                fn(*a, **kw)
            except Exception as e:  # a row, not a crash: the table must come out
                row(check, "FAIL", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}")
            print(f"[gpu_check] {check} took {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        return run
    return wrap


def optional(module: str) -> str | None:
    """The version of an importable optional package, else None."""
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------------------
# data (built here, offline, seeded)

def build_data(work: Path, n_sudoku: int, n_docs: int) -> tuple[Path, Path]:
    from dataset.build_lm_dataset import main as build_lm
    from dataset.build_sudoku_dataset import main as build_sudoku
    sudoku = work / "sudoku9"
    build_sudoku(["--generate", str(n_sudoku), "--grid", "9", "--blanks", "30..50", "--test-size", "64",
                  "--output-dir", str(sudoku), "--seed", "0"])
    import numpy as np
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 300)) for _ in range(n_docs)), encoding="utf-8")
    lm = work / "lm"
    build_lm(["--source", str(corpus), "--output-dir", str(lm), "--vocab-size", "1024", "--max-seq-len", "256",
              "--doc-chars", "2000", "--val-ratio", "0.05"])
    return sudoku, lm


def precheck(work: Path, n_sudoku: int, n_docs: int) -> tuple[Path, Path]:
    import torch
    import pretrain  # noqa: F401  (the trainer and everything it imports)
    import evaluate  # noqa: F401
    print(f"[gpu_check] python {sys.version.split()[0]}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
          f"flash_attn {optional('flash_attn') or optional('flash_attn_interface') or 'absent'}, "
          f"mamba_ssm {optional('mamba_ssm') or 'absent'}, adam_atan2 {optional('adam_atan2') or 'absent'}",
          file=sys.stderr, flush=True)
    return build_data(work, n_sudoku=n_sudoku, n_docs=n_docs)


# ----------------------------------------------------------------------------------------------------------
# checks

def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from utils.config import build_config
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = hydra_compose("cfg_pretrain", overrides=overrides)
    return build_config(OmegaConf.to_container(cfg, resolve=True))


def train_overrides(data: Path, run_dir: Path, steps: int, batch: int, extra: list[str]) -> list[str]:
    return extra + [f"data_path={data}", f"checkpoint_path={run_dir}", "run_name=gpu", "project_name=gpu_check",
                    f"global_batch_size={batch}", "epochs=100000", "eval_interval=100000", f"max_steps={steps}",
                    f"log_every={steps // 3}", "logger=jsonl", "checkpoint_every_eval=false", f"device={Setup.device}",
                    "mixed_precision=bf16", "loader_workers=1", "lr_warmup_steps=10"]


def last_perf(run_dir: Path) -> tuple[float | None, float | None, dict]:
    """step ms and MFU of the last log interval (the first one holds compilation and warm-up)."""
    from utils.logger import read_jsonl
    lines = [l for l in read_jsonl(run_dir / "metrics.jsonl") if "perf/step_ms" in l]
    last = lines[-1] if lines else {}
    return last.get("perf/step_ms"), last.get("perf/mfu"), last


@guarded("attention")
def check_attention(sudoku: Path) -> None:
    import torch

    from models.layers import _FLASH_ATTN_FUNC
    from utils.modeling import build_head
    from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
    ds = PuzzleDataset(PuzzleDatasetConfig(seed=0, dataset_path=str(sudoku), global_batch_size=64, test_set_mode=True,
                                           epochs_per_iter=1, rank=0, num_replicas=1), split="test")
    _, batch, _ = next(iter(ds))
    batch = {k: v.to(Setup.device) for k, v in batch.items()}
    meta = ds.metadata
    injected = {"batch_size": 64, "seq_len": meta.seq_len, "vocab_size": meta.vocab_size,
                "num_puzzle_identifiers": meta.num_puzzle_identifiers}
    backends = ["math", "sdpa"] + (["flash"] if _FLASH_ATTN_FUNC is not None else [])
    logits = {}
    for backend in backends:
        cfg = compose(Setup.hrm + [f"arch.attn_backend={backend}"])
        head = build_head(cfg.arch, injected, seed=0).to(Setup.device).eval()
        with torch.no_grad(), torch.autocast(Setup.device, dtype=torch.bfloat16):
            carry = head.initial_carry(batch)
            _, _, _, out, _ = head(return_keys=["logits"], carry=carry, batch=batch)
        logits[backend] = out["logits"].float()
    ref = logits["math"]
    diffs = {b: float((v - ref).abs().max()) for b, v in logits.items() if b != "math"}
    scale = float(ref.abs().max())
    ok = all(d <= 0.05 * scale for d in diffs.values())  # bf16 forward through 8 layers x cycles
    row("attention", "ok" if ok else "FAIL", ", ".join(f"{b} vs math max abs diff {d:.3g}" for b, d in diffs.items())
        + f" (max abs logit {scale:.3g})" + ("" if "flash" in diffs else "; flash-attn not importable"))


def _train_row(check: str, overrides: list[str]) -> None:
    import torch

    import pretrain
    run_dir = Path(overrides[[o.split("=")[0] for o in overrides].index("checkpoint_path")].split("=", 1)[1])
    if Setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    summary = pretrain.train(compose(overrides))
    step_ms, mfu, last = last_perf(run_dir)
    loss = next((v for k, v in last.items() if k.endswith("lm_loss")), float("nan"))
    row(check, "ok" if summary["step"] > 0 and loss == loss else "FAIL",
        f"{summary['step']} steps, last lm_loss {loss:.3g}, peak {last.get('perf/peak_mem_mib', 0) / 1024:.1f} GiB",
        step_ms, mfu)


@guarded("hrm bf16")
def check_hrm(sudoku: Path, work: Path, compiled: bool) -> None:
    name = "hrm compile" if compiled else "hrm bf16"
    _train_row(name, train_overrides(sudoku, work / name.replace(" ", "_"), Setup.steps, Setup.hrm_batch,
                                     Setup.hrm + [f"compile={str(compiled).lower()}"]))


@guarded("lm bf16")
def check_lm(lm: Path, work: Path) -> None:
    _train_row("lm bf16", train_overrides(lm, work / "lm_run", Setup.steps, Setup.lm_batch, ["arch=hrm_lm_mamba"] + Setup.lm))


@guarded("nccl")
def check_nccl(sudoku: Path, work: Path) -> None:
    args = train_overrides(sudoku, work / "nccl", 6, min(128, Setup.hrm_batch), Setup.hrm)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "4"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
                           "pretrain.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    ok = proc.returncode == 0 and "world 1" in proc.stdout
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:160]
    backend = "NCCL" if Setup.device == "cuda" else "gloo"
    row("nccl", "ok" if ok else "FAIL", f"torchrun 1 rank, {backend}, 6 steps" if ok else f"rc {proc.returncode}: {tail}")


@guarded("adam_atan2")
def check_adam_atan2() -> None:
    import torch

    from utils.adam_atan2 import _cuda_adam_atan2_class, make_adam_atan2
    if _cuda_adam_atan2_class() is None:
        row("adam_atan2", "skip", "adam_atan2 (CUDA package) not importable; the pure-PyTorch backend is in the CPU tests")
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(512, 512, device="cuda", generator=gen), torch.randn(512, device="cuda", generator=gen)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(20)]
    finals = {}
    for backend in ("cuda", "torch"):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = make_adam_atan2(params, backend=backend, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        finals[backend] = [p.detach() for p in params]
    diff = max(float((a - b).abs().max()) for a, b in zip(finals["cuda"], finals["torch"]))
    row("adam_atan2", "ok" if diff <= 1e-5 else "FAIL", f"CUDA vs torch after 20 steps: max abs diff {diff:.3g}")


@guarded("mamba_ssm")
def check_mamba_ssm() -> None:
    import torch

    from models.mamba2 import Mamba2
    if optional("mamba_ssm") is None:
        row("mamba_ssm", "skip", "mamba_ssm not importable; our chunked SSD is what runs (CPU-tested)")
        return
    fused = Mamba2(d_model=256, d_state=64, headdim=32, chunk_size=64, backend="mamba_ssm", device="cuda")
    ours = Mamba2(d_model=256, d_state=64, headdim=32, chunk_size=64, backend="torch", device="cuda")
    ours.load_state_dict(fused.state_dict())
    u = torch.randn(2, 1024, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        a, b = fused(u), ours(u)
    rel = float((a - b).norm() / b.norm())
    row("mamba_ssm", "ok" if rel <= 1e-3 else "FAIL", f"fused scan vs our SSD, fp32, L=1024: rel err {rel:.3g}")


# ----------------------------------------------------------------------------------------------------------

def print_table(device: str) -> None:
    print(f"\nGPU check on {device}, {time.strftime('%Y-%m-%d')}\n")
    print("| check | result | detail | step ms | MFU |")
    print("|---|---|---|---:|---:|")
    for r in ROWS:
        ms = f"{r['step_ms']:.1f}" if r["step_ms"] is not None else ""
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else ""
        print(f"| {r['check']} | {r['result']} | {r['detail']} | {ms} | {mfu} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precheck", action="store_true", help="CPU-side pre-checks only (no CUDA needed)")
    p.add_argument("--cpu-dry-run", action="store_true", help="all checks at tiny shapes on the CPU (tests the script)")
    p.add_argument("--small", action="store_true", help="with --precheck: small data builds (for the CPU test)")
    p.add_argument("--work-dir", help="where data and runs go (default: a temp dir, removed afterwards)")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        Setup.device, Setup.hrm, Setup.lm = "cpu", HRM_TINY, LM_TINY
        Setup.hrm_batch, Setup.lm_batch, Setup.steps = 32, 8, 6
    if args.cpu_dry_run or args.small:
        Setup.n_sudoku, Setup.n_docs = 64, 30
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        sudoku, lm = precheck(work, Setup.n_sudoku, Setup.n_docs)
        print(f"[gpu_check] pre-checks passed in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        if args.precheck:
            return 0
        import torch
        if not torch.cuda.is_available() and not args.cpu_dry_run:
            print("error: gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); the CPU "
                  "pre-checks passed, no GPU check ran", file=sys.stderr)
            return 3
        device = torch.cuda.get_device_name(0) if Setup.device == "cuda" else "CPU (dry run: tiny shapes, not a measurement)"
        check_attention(sudoku)
        check_hrm(sudoku, work, compiled=False)
        check_hrm(sudoku, work, compiled=True)
        check_lm(lm, work)
        check_nccl(sudoku, work)
        check_adam_atan2()
        check_mamba_ssm()
        print_table(device)
        print(f"\n(total {time.time() - t0:.0f} s)")
        return 0 if all(r["result"] != "FAIL" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
