"""linear_backend torch (F.linear: MKL on CPU) vs onednn (models/layers.py onednn_linear), in one process.

Two tables. GEMMs: the products of the training step at a shape (forward x W^T, and the backward's g W),
median of `--reps` calls each. Steps: our training step (bench/bench_step.py's Runner, one model) with the
backend switched on the same model between consecutive steps, so both backends see the same weights, data and
machine load; each pair gives torch_time / onednn_time and the table reports their median and range. The
compiled row compiles once per backend (dynamo guards on the layer's `backend`), outside the timing.

    python -m bench.bench_linear                          # HRM and TRM, tiny shape, eager and compiled
    python -m bench.bench_linear --shape demo --archs hrm --pairs 9
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.bench_model import SHAPES
from bench.bench_step import Runner, build
from models.layers import onednn_available, onednn_linear, swiglu_intermediate_size
from utils.modeling import retain_freed_host_memory, set_linear_backend


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def gemm_rows(shape: str, reps: int) -> list[tuple]:
    s = SHAPES[shape]
    D = s["hidden_size"]
    M = s["batch_size"] * (s["seq_len"] + 1)  # HRM: one puzzle-prefix position
    inter = swiglu_intermediate_size(D, s["expansion"])
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (k, n) in {"qkv": (D, 3 * D), "o": (D, D), "gate_up": (D, 2 * inter), "down": (inter, D)}.items():
        x, w = torch.randn(M, k, generator=g), torch.randn(n, k, generator=g)
        gy = torch.randn(M, n, generator=g)
        wt = w.t().contiguous()
        with torch.no_grad():
            for what, a, b in (("x W^T", x, w), ("g W (grad x)", gy, wt)):
                t_torch = _median_ms(lambda: F.linear(a, b), reps)
                t_dnn = _median_ms(lambda: onednn_linear(a, b), reps)
                gflop = 2 * M * b.shape[0] * b.shape[1] / 1e9
                rows.append((f"{name} {what}", f"[{M},{a.shape[1]}]x[{a.shape[1]},{b.shape[0]}]", t_torch, t_dnn,
                             gflop / t_torch * 1e3, gflop / t_dnn * 1e3))
    return rows


def step_row(arch: str, shape: str, compiled: bool, pairs: int, warmup: int) -> tuple:
    runner = Runner("ours", *build(arch, shape, "float32", reference=False, compiled=compiled), reference=False)
    backends = ("torch", "onednn")
    for b in backends:  # compiles each backend's graphs here, untimed
        set_linear_backend(runner.head, b, "cpu")
        for _ in range(warmup):
            runner.step()
    times = {b: [] for b in backends}
    for _ in range(pairs):
        for b in backends:
            set_linear_backend(runner.head, b, "cpu")
            times[b].append(runner.step())
    ratios = sorted(t / o for t, o in zip(times["torch"], times["onednn"]))
    return (arch, "compiled" if compiled else "eager", 1e3 * statistics.median(times["torch"]),
            1e3 * statistics.median(times["onednn"]), statistics.median(ratios), ratios[0], ratios[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["hrm", "trm"], choices=["hrm", "trm"])
    ap.add_argument("--shape", default="tiny", choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=7, help="(torch, onednn) step pairs per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first (compiles here)")
    ap.add_argument("--reps", type=int, default=20, help="calls per GEMM timing")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled step rows")
    args = ap.parse_args(argv)
    if not onednn_available():
        print("this torch has no oneDNN: nothing to compare", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    retain_freed_host_memory()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), {args.shape} shape, fp32; "
          "load %.1f/%.1f/%.1f at start\n" % os.getloadavg())
    print("| GEMM | shape | torch ms | onednn ms | torch GFLOP/s | onednn GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, shp, tt, td, gt, gd in gemm_rows(args.shape, args.reps):
        print(f"| {name} | {shp} | {tt:.2f} | {td:.2f} | {gt:.0f} | {gd:.0f} |", flush=True)
    print(f"\n| arch | step | torch ms/step | onednn ms/step | torch/onednn per pair: median | min | max |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for compiled in (False,) if args.no_compile else (False, True):
            a, kind, tt, td, med, lo, hi = step_row(arch, args.shape, compiled, args.pairs, args.warmup)
            print(f"| {a} | {kind} | {tt:.0f} | {td:.0f} | {med:.3f}x | {lo:.3f} | {hi:.3f} |", flush=True)
    print("\nload %.1f/%.1f/%.1f at the end" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
