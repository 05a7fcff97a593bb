"""Look inside a built dataset. Puzzle datasets: metadata, counts, token histogram and a few puzzles as
text grids. LM datasets (dataset.build_lm_dataset): metadata, examples and token lengths per split, and a
few (prompt | continuation) pairs decoded with the dataset's tokenizer.

    python -m dataset.inspect data/sudoku-extreme-1k-aug-1000 [--split train] [--show 3] [--no-validate]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dataset import context
from dataset.common import (ARRAY_FIELDS, DatasetError, PuzzleDatasetMetadata, arc_grid_from_tokens,
                            exit_on_dataset_error, guess_kind, validate_puzzle_dataset)


def _grid_text(g: np.ndarray) -> list[str]:
    return ["".join(str(v) for v in row) for row in g]


def render_context(inputs: np.ndarray, labels: np.ndarray) -> tuple[str, str]:
    """A context row -> (demonstrations and query, one grid after another; the answer grid)."""
    d = context.decode_context(inputs, labels)
    lines = []
    for k, (i, o) in enumerate(d["demos"], 1):
        lines += [f"demo {k} in"] + _grid_text(i) + [f"demo {k} out"] + _grid_text(o)
    lines += ["query"] + _grid_text(d["query"])
    return "\n".join(lines), "\n".join(["answer"] + _grid_text(d["answer"]))


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


def describe(data_path: Path, split: str, show: int, out=None) -> None:
    out = out or sys.stdout  # looked up per call: a default bound at import misses later redirections
    sdir = data_path / split
    meta = PuzzleDatasetMetadata.load(sdir / "dataset.json")
    first_labels = np.load(sdir / f"{meta.sets[0]}__labels.npy", mmap_mode="r", allow_pickle=False)
    kind = guess_kind(meta, first_labels[0] if len(first_labels) else None)
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
            if kind == "context":
                inp, lab = (t.splitlines() for t in render_context(a["inputs"][row], a["labels"][row]))
            else:
                inp = render(a["inputs"][row], kind, meta.seq_len).splitlines()
                lab = render(a["labels"][row], kind, meta.seq_len).splitlines()
            width = max(len(x) for x in inp) if inp else 0
            for i in range(max(len(inp), len(lab))):
                left = inp[i] if i < len(inp) else ""
                right = lab[i] if i < len(lab) else ""
                print(f"   {left:<{width}}   |   {right}", file=out)


def describe_lm(root: Path, splits: list[str], show: int, validate: bool, out=None) -> None:
    out = out or sys.stdout
    from dataset.lm_tokenizer import LMTokenizer
    from lm_dataset import LMSplit, load_lm_meta, validate_lm_dataset
    meta = validate_lm_dataset(root) if validate else load_lm_meta(root)
    scalars = {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))}
    print(f"== LM dataset: {json.dumps(scalars)}", file=out)
    tok = LMTokenizer.from_dataset(root) if (root / "tokenizer.json").is_file() else None
    for split in [s for s in splits if s in meta["splits"]]:
        data = LMSplit(root, split, meta)
        lengths = np.array([[len(p), len(t)] for p, t in (data.example(i) for i in range(len(data)))]).reshape(-1, 2)
        print(f"   {split}: {len(data)} examples; prompt tokens mean {lengths[:, 0].mean():.1f} max "
              f"{lengths[:, 0].max(initial=0)}; continuation tokens mean {lengths[:, 1].mean():.1f} max "
              f"{lengths[:, 1].max(initial=0)}", file=out)
        for i in range(min(show, len(data))):
            prompt, target = data.example(i)
            if tok is not None:
                print(f"     [{i}] {tok.decode(prompt.tolist())!r} | {tok.decode(target.tolist())!r}", file=out)
            else:
                print(f"     [{i}] {prompt.tolist()} | {target.tolist()}", file=out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataset.inspect", description=__doc__.splitlines()[0])
    p.add_argument("data_path")
    p.add_argument("--split", choices=["train", "validation", "test", "both"], default="both",
                   help="both = every split (train and test; LM datasets also validation)")
    p.add_argument("--show", type=int, default=2, help="puzzles to render per split (default 2)")
    p.add_argument("--no-validate", action="store_true", help="skip the full validation pass")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    root = Path(args.data_path)
    if (root / "meta.json").is_file() and not (root / "train" / "dataset.json").is_file():
        from dataset.lm_tokenizer import LMDataError
        splits = ["train", "validation", "test"] if args.split == "both" else [args.split]
        try:
            describe_lm(root, splits, args.show, validate=not args.no_validate)
        except LMDataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"\n{root}: {'validated and ' if not args.no_validate else ''}inspected LM dataset in "
              f"{time.perf_counter() - t0:.1f} s")
        return
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
