"""Training throughput of pretrain.py (the whole loop: data, forward, target-Q, backward, both optimizers)
at the tiny CPU shape and the full Sudoku shape, on a generated 9x9 Sudoku set. Prints a markdown table.

    python -m bench.bench_train                 # both shapes, fp32 and bf16 forward
    python -m bench.bench_train --shapes tiny --steps 40
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    # the reference's "tiny CPU config": D128, 2+2 layers, cycles 2/2, halt 4, batch 32, seq 81
    "tiny": dict(hidden_size=128, num_heads=2, H_layers=2, L_layers=2, H_cycles=2, L_cycles=2, halt_max_steps=4, batch=32),
    # the original Sudoku model: D512, 4+4 layers, cycles 2/2, halt 16 (27.3M params); batch 32 on CPU
    "full": dict(hidden_size=512, num_heads=8, H_layers=4, L_layers=4, H_cycles=2, L_cycles=2, halt_max_steps=16, batch=32),
}


def run_one(data: Path, work: Path, shape: str, dtype: str, steps: int, log_every: int) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pretrain
    from utils.config import build_config

    s = dict(SHAPES[shape])
    batch = s.pop("batch")
    overrides = [f"arch.{k}={v}" for k, v in s.items()] + [
        f"arch.forward_dtype={dtype}", f"data_path={data}", f"checkpoint_path={work / f'{shape}-{dtype}'}",
        "run_name=bench", "project_name=bench", f"global_batch_size={batch}", "epochs=1000", "eval_interval=1000",
        f"max_steps={steps}", f"log_every={log_every}", "logger=jsonl", "checkpoint_every_eval=false",
        "lr_warmup_steps=10"]
    repo = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(repo / "config"), version_base="1.3"):
        cfg = build_config(OmegaConf.to_container(compose("cfg_pretrain", overrides=overrides), resolve=True))
    pretrain.train(cfg)
    lines = [json.loads(l) for l in (work / f"{shape}-{dtype}" / "metrics.jsonl").read_text().splitlines()]
    perf = [l for l in lines if "perf/samples_per_s" in l][1:]  # drop the first window (warm-up)
    n_params = next(l["num_params"] for l in lines if "num_params" in l)
    mean = lambda key: sum(l[key] for l in perf) / len(perf)  # noqa: E731
    return {"shape": shape, "dtype": dtype, "params": n_params, "batch": batch, "step_ms": mean("perf/step_ms"),
            "samples_per_s": mean("perf/samples_per_s"), "tflops": mean("perf/tflops"),
            "peak_mib": max(l["perf/peak_mem_mib"] for l in perf)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,full")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: tiny 40, full 8)")
    args = p.parse_args(argv)
    from dataset.build_sudoku_dataset import main as build
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    t0 = time.time()
    try:
        data = work / "sudoku9"
        build(["--generate", "512", "--grid", "9", "--blanks", "15", "--test-size", "32", "--output-dir", str(data)])
        rows = []
        for shape in args.shapes.split(","):
            steps = args.steps or (40 if shape == "tiny" else 8)
            for dtype in args.dtypes.split(","):
                rows.append(run_one(data, work, shape, dtype, steps, log_every=max(2, steps // 4)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"\n{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, Python {platform.python_version()}; "
          f"9x9 Sudoku (seq 81), AdamATan2, steps after the first log window\n")
    print("| shape | params | forward dtype | batch | step ms | samples/s | achieved TFLOP/s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params'] / 1e6:.2f}M | {r['dtype']} | {r['batch']} | {r['step_ms']:.0f} | "
              f"{r['samples_per_s']:.1f} | {r['tflops']:.3f} | {r['peak_mib']:.0f} |")
    print(f"\n({time.time() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
