"""Dataset benchmarks: Sudoku builder throughput (1000 puzzles x 1000 augmentations) and PuzzleDataset
loader batches/s at the Sudoku (B=768, L=81) and ARC (B=768, L=900) shapes. Prints a markdown table.

    python -m bench.bench_datasets [--workdir /tmp/bench_datasets] [--batches 200]

The Sudoku source is 1000 random solved 9x9 grids with ~60% of cells blanked (uniqueness is not needed
to time the builder). The ARC-shaped dataset is synthetic: 10,000 groups x 2 puzzles x 4 examples of
random 900-token rows, written with the project's writer.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dataset import build_sudoku_dataset as bs
from dataset.common import PuzzleSetArrays, split_metadata, write_puzzle_dataset
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig, create_dataloader


def make_sudoku_source(src: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    src.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", n), ("test", 100)):
        with open(src / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["source", "question", "answer", "rating"])
            for _ in range(count):
                s = bs.random_solution(9, rng)
                q = np.where(rng.random(81) < 0.6, 0, s)
                w.writerow(["bench", "".join("." if v == 0 else str(v) for v in q), "".join(map(str, s)), "0"])


def make_arc_shaped(out: Path, groups: int = 10_000, puzzles: int = 2, examples: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_pz = groups * puzzles
    n = n_pz * examples
    sets = {"all": PuzzleSetArrays(inputs=rng.integers(0, 12, (n, 900), dtype=np.uint8),
                                   labels=rng.integers(0, 12, (n, 900), dtype=np.uint8),
                                   puzzle_identifiers=np.arange(1, n_pz + 1, dtype=np.int32),
                                   puzzle_indices=np.arange(0, n + 1, examples, dtype=np.int32),
                                   group_indices=np.arange(0, n_pz + 1, puzzles, dtype=np.int32))}
    meta = split_metadata(sets, vocab_size=12, seq_len=900, num_puzzle_identifiers=n_pz + 1)
    write_puzzle_dataset(out, {"train": (meta, sets), "test": (meta, sets)},
                         ["<blank>"] + [f"p{i}" for i in range(n_pz)])


def time_loader(path: Path, batches: int, num_workers: int, gbs: int = 768) -> float:
    ds = PuzzleDataset(PuzzleDatasetConfig(seed=0, dataset_path=str(path), global_batch_size=gbs,
                                           test_set_mode=False, epochs_per_iter=10**6, rank=0, num_replicas=1))
    loader = create_dataloader(ds, prefetch=8, num_workers=num_workers)
    it = iter(loader)
    next(it)  # worker start-up and first epoch plan are not throughput
    t0 = time.perf_counter()
    checksum = 0
    for _ in range(batches):
        _, batch, _ = next(it)
        checksum += int(batch["inputs"][0, 0])  # touch the data like a consumer would
    dt = time.perf_counter() - t0
    del it
    return batches / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/bench_datasets")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--keep", action="store_true", help="keep the built datasets")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []

    src = work / "sudoku_src"
    make_sudoku_source(src, 1000)
    out = work / "sudoku_1k_aug_1000"
    t0 = time.perf_counter()
    bs.main(["--source", str(src), "--output-dir", str(out), "--num-aug", "1000", "--seed", "0"])
    dt = time.perf_counter() - t0
    n = 1000 * 1001
    rows.append(("Sudoku build, 1000 puzzles x 1000 aug (CSV parse, augment, write 162 MB, validate)",
                 f"{dt:.2f} s", f"{n / dt / 1e6:.2f} M examples/s"))

    arc = work / "arc_shaped"
    make_arc_shaped(arc)
    for name, path in (("Sudoku B=768 L=81", out), ("ARC B=768 L=900", arc)):
        for workers in (0, 1):
            bps = time_loader(path, args.batches, workers)
            mode = "in-process" if workers == 0 else "1 worker, prefetch 8"
            rows.append((f"Loader {name}, {mode}", f"{bps:.0f} batches/s", f"{bps * 768 / 1e3:.0f} k examples/s"))

    print(f"\nDate {time.strftime('%Y-%m-%d')}; {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, numpy {np.__version__}\n")
    print("| measurement | time / rate | throughput |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
