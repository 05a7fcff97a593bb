"""Context-format benchmarks (issue 11): builder throughput of `build_arc_dataset --mode context` (vs the
canvas mode on the same tasks) and of `build_rules_dataset` (both formats), and the HRM train step at
context lengths (puzzle_emb_ndim=0, fp32) against the 900-token canvas. Prints markdown tables.

    python -m bench.bench_context [--arc-dir ../shared/data/arc-agi-1/training] [--num-aug 8] [--threads 1]

The step rows are one optimizer step (forward of one ACT segment + target-Q segment, backward, AdamATan2) of
`bench.bench_model.Runner` on random tokens; "scores MiB" is one attention call's fp32 score tensor
(batch x heads x L^2 x 4 bytes), what the CPU math backend materialises and flash/SDPA avoid on GPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_model import Runner
from dataset import build_arc_dataset as ba
from dataset import build_rules_dataset as br
from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.losses import ACTLossHead
from utils.adam_atan2 import AdamATan2

REPO = Path(__file__).resolve().parents[1]


def _size_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


def bench_builders(work: Path, arc_dir: str, num_aug: int, rules_tasks: int) -> list[tuple]:
    rows = []
    runs = [("arc canvas (original)", lambda o: ba.main(["--dataset-dirs", arc_dir, "--output-dir", o, "--num-aug",
                                                         str(num_aug), "--eval-subsets", "none"]), 400),
            ("arc context", lambda o: ba.main(["--mode", "context", "--dataset-dirs", arc_dir, "--output-dir", o,
                                               "--num-aug", str(num_aug), "--eval-subsets", "none"]), 400)]
    for fmt in ("context", "puzzle_id"):
        runs.append((f"rules {fmt} (3..5, 3 demos)", lambda o, fmt=fmt: br.main(
            ["--output-dir", o, "--format", fmt, "--min-size", "3", "--max-size", "5", "--train-tasks",
             str(rules_tasks), "--test-tasks", "200"]), rules_tasks + 400))
        runs.append((f"rules {fmt} (3..10, 3 demos)", lambda o, fmt=fmt: br.main(
            ["--output-dir", o, "--format", fmt, "--train-tasks", str(rules_tasks), "--test-tasks", "200"]),
            rules_tasks + 400))
    for name, fn, tasks in runs:
        out = work / name.split(" (")[0].replace(" ", "_")
        t0 = time.perf_counter()
        fn(str(out))
        dt = time.perf_counter() - t0
        inputs = np.load(out / "train" / "all__inputs.npy", mmap_mode="r")
        lengths = inputs.shape[1] - np.argmax(np.asarray(inputs)[:, ::-1] != 0, axis=1)  # up to the last non-PAD
        note = f"{np.median(lengths):.0f} / {np.percentile(lengths, 90):.0f} / {lengths.max()}"
        rows.append((name, tasks, dt, tasks / dt, inputs.shape[0], inputs.shape[1], _size_mb(out), note))
        shutil.rmtree(out)
    return rows


def build_step(seq_len: int, batch: int, hidden: int, heads: int, layers: int):
    cfg = dict(batch_size=batch, seq_len=seq_len, vocab_size=17, num_puzzle_identifiers=1, puzzle_emb_ndim=0,
               H_cycles=2, L_cycles=2, H_layers=layers, L_layers=layers, hidden_size=hidden, num_heads=heads,
               expansion=4, halt_max_steps=2, forward_dtype="float32")
    model = HierarchicalReasoningModel_ACTV1(cfg, generator=torch.Generator().manual_seed(0))
    model.set_generator(torch.Generator().manual_seed(0))
    head = ACTLossHead(model, "stablemax_cross_entropy")
    head.train()
    g = torch.Generator().manual_seed(1)
    data = {"inputs": torch.randint(1, 17, (batch, seq_len), generator=g, dtype=torch.int32),
            "labels": torch.randint(1, 17, (batch, seq_len), generator=g, dtype=torch.int32),
            "puzzle_identifiers": torch.zeros(batch, dtype=torch.int32)}
    return head, data, [AdamATan2(head.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)]


def bench_steps(shapes: list[tuple[str, int, int, int, int, int]], steps: int) -> list[tuple]:
    rows = []
    for name, L, B, D, H, n_layers in shapes:
        r = Runner(*build_step(L, B, D, H, n_layers), with_optim=True)
        for i in range(1 + steps):
            r.step(record=i >= 1)
        med = statistics.median(r.times)
        rows.append((name, L, B, D, n_layers, med, B / med, B * L / med, B * H * L * L * 4 / 2**20))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arc-dir", default=str(REPO.parent / "shared" / "data" / "arc-agi-1" / "training"))
    ap.add_argument("--num-aug", type=int, default=8)
    ap.add_argument("--rules-tasks", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), "
          f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    if not args.skip_build:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_builders(Path(tmp), args.arc_dir, args.num_aug, args.rules_tasks)
        print(f"builders (ARC: 400 tasks x {1 + args.num_aug} variants; rules: {args.rules_tasks} train + 400 test tasks)\n")
        print("| builder | tasks | seconds | tasks/s | train rows | seq_len | MiB written | row tokens median / p90 / max |")
        print("|---|---|---|---|---|---|---|---|")
        for name, tasks, dt, tps, n, L, mb, note in rows:
            print(f"| {name} | {tasks} | {dt:.1f} | {tps:.0f} | {n} | {L} | {mb:.0f} | {note} |")
        print()
    if not args.skip_step:
        shapes = [("canvas 5x5 (rules puzzle-id)", 25, 32, 64, 2, 1),
                  ("rules context (3..5)", 248, 32, 64, 2, 1),
                  ("rules context (3..10)", 888, 8, 64, 2, 1),
                  ("ARC canvas 30x30", 900, 4, 128, 2, 1),
                  ("ARC context, 2048", 2048, 4, 128, 2, 1),
                  ("ARC context, 4096", 4096, 1, 128, 2, 1)]
        rows = bench_steps(shapes, args.steps)
        print("HRM step, fp32, H_cycles=L_cycles=2, halt_max_steps=2, one optimizer step, median of "
              f"{args.steps}\n")
        print("| shape | seq_len | batch | hidden | layers/level | s/step | samples/s | tokens/s | scores MiB/call |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, L, B, D, nl, med, sps, tps, mib in rows:
            print(f"| {name} | {L} | {B} | {D} | {nl} | {med:.3f} | {sps:.2f} | {tps:.0f} | {mib:.0f} |")
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
