"""Look inside a built puzzle dataset: metadata, counts, token histogram and a few puzzles as text grids.

    python -m dataset.inspect data/sudoku-extreme-1k-aug-1000 [--split train] [--show 3] [--no-validate]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dataset.common import (ARRAY_FIELDS, DatasetError, PuzzleDatasetMetadata, arc_grid_from_tokens,
                            exit_on_dataset_error, validate_puzzle_dataset)


def guess_kind(meta: PuzzleDatasetMetadata) -> str:
    side = int(round(meta.seq_len ** 0.5))
    if meta.vocab_size == 12 and meta.seq_len == 900 and meta.num_puzzle_identifiers > 1:
        return "arc"
    if meta.vocab_size == 6 and side * side == meta.seq_len:
        return "maze"
    if side * side == meta.seq_len and meta.vocab_size == side + 2:
        return "sudoku"
    return "generic"


def render(tokens: np.ndarray, kind: str, seq_len: int) -> str:
    tokens = np.asarray(tokens).astype(np.int64)
    side = int(round(seq_len ** 0.5))
    if kind == "sudoku":
        return "\n".join(" ".join("." if t <= 1 else str(t - 1) for t in row) for row in tokens.reshape(side, side))
    if kind == "maze":
        return "\n".join("".join("?# SGo"[t] if t < 6 else "?" for t in row) for row in tokens.reshape(side, side))
    if kind == "arc":
        g = arc_grid_from_tokens(tokens)
        if g.size == 0:  # translated example: show the whole canvas
            return "\n".join("".join({0: ".", 1: "|"}.get(t, str(t - 2)) for t in row) for row in tokens.reshape(30, 30))
        return "\n".join("".join(str(v) for v in row) for row in g)
    if side * side == seq_len:
        return "\n".join(" ".join(f"{t:3d}" for t in row) for row in tokens.reshape(side, side))
    return " ".join(str(t) for t in tokens)


def describe(data_path: Path, split: str, show: int, out=sys.stdout) -> None:
    sdir = data_path / split
    meta = PuzzleDatasetMetadata.load(sdir / "dataset.json")
    kind = guess_kind(meta)
    names = None
    if (data_path / "identifiers.json").is_file():
        with open(data_path / "identifiers.json") as f:
            names = json.load(f)
    print(f"== {split}: {json.dumps(meta.to_dict())}", file=out)
    print(f"   looks like: {kind}", file=out)
    for set_name in meta.sets:
        a = {k: np.load(sdir / f"{set_name}__{k}.npy", mmap_mode="r", allow_pickle=False) for k in ARRAY_FIELDS}
        n_ex, n_pz, n_gr = len(a["inputs"]), len(a["puzzle_identifiers"]), len(a["group_indices"]) - 1
        pi, gi = np.asarray(a["puzzle_indices"]), np.asarray(a["group_indices"])
        ex_per_pz = np.diff(pi)
        pz_per_gr = np.diff(gi)
        print(f"   set {set_name!r}: {n_ex} examples, {n_pz} puzzles, {n_gr} groups; inputs {a['inputs'].dtype} "
              f"{tuple(a['inputs'].shape)}", file=out)
        if n_pz:
            print(f"   examples/puzzle min {ex_per_pz.min()} mean {ex_per_pz.mean():.2f} max {ex_per_pz.max()}; "
                  f"puzzles/group min {pz_per_gr.min()} mean {pz_per_gr.mean():.2f} max {pz_per_gr.max()}", file=out)
        for key in ("inputs", "labels"):
            hist = np.zeros(max(meta.vocab_size, 1), dtype=np.int64)
            for s in range(0, n_ex, 1 << 16):
                block = np.asarray(a[key][s:s + (1 << 16)]).reshape(-1)
                hist += np.bincount(block, minlength=len(hist))[:len(hist)]
            total = max(int(hist.sum()), 1)
            print(f"   {key} token histogram: " + ", ".join(f"{t}:{c} ({100 * c / total:.1f}%)"
                                                           for t, c in enumerate(hist) if c), file=out)
        for p in range(min(show, n_pz)):
            pid = int(a["puzzle_identifiers"][p])
            label = names[pid] if names and pid < len(names) else str(pid)
            row = int(pi[p])
            print(f"\n   puzzle {p} (id {pid} {label!r}), example row {row}:", file=out)
            inp = render(a["inputs"][row], kind, meta.seq_len).splitlines()
            lab = render(a["labels"][row], kind, meta.seq_len).splitlines()
            width = max(len(x) for x in inp) if inp else 0
            for i in range(max(len(inp), len(lab))):
                left = inp[i] if i < len(inp) else ""
                right = lab[i] if i < len(lab) else ""
                print(f"   {left:<{width}}   |   {right}", file=out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataset.inspect", description=__doc__.splitlines()[0])
    p.add_argument("data_path")
    p.add_argument("--split", choices=["train", "test", "both"], default="both")
    p.add_argument("--show", type=int, default=2, help="puzzles to render per split (default 2)")
    p.add_argument("--no-validate", action="store_true", help="skip the full validation pass")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    root = Path(args.data_path)
    with exit_on_dataset_error():
        splits = ["train", "test"] if args.split == "both" else [args.split]
        if not args.no_validate:
            validate_puzzle_dataset(root, splits=splits)
        for split in splits:
            describe(root, split, args.show)
    print(f"\n{root}: {'validated and ' if not args.no_validate else ''}inspected {len(splits)} split(s) in "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
