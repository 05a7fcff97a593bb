"""Small Sudoku, maze and ARC datasets and hand-made predictions for the viewer and panel tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from dataset.common import IGNORE_LABEL_ID

N_SEGMENTS = 3


def build_datasets(root: Path, shared_data: Path | None = None) -> dict[str, Path]:
    """{'sudoku': 4x4 (64 train / 32 test), 'maze': 9x9 (8 / 6), 'arc': a few tasks (needs shared ARC data)}."""
    from dataset.build_maze_dataset import main as build_maze

    from trainer_helpers import build_tiny_sudoku
    out = {"sudoku": build_tiny_sudoku(root / "sudoku")}
    if not (root / "maze" / "train" / "dataset.json").is_file():
        build_maze(["--generate", "8", "--test-size", "6", "--size", "9", "--output-dir", str(root / "maze"), "--seed", "1"])
    out["maze"] = root / "maze"
    if shared_data is not None:
        arc = root / "arc"
        if not (arc / "train" / "dataset.json").is_file():
            from dataset.build_arc_dataset import main as build_arc
            files = sorted((shared_data / "arc-agi-1" / "training").glob("*.json"))
            src = root / "arc_src"
            for sub, chosen in (("training", files[:2]), ("evaluation", files[2:5])):
                (src / sub).mkdir(parents=True, exist_ok=True)
                for f in chosen:
                    shutil.copy(f, src / sub / f.name)
            build_arc(["--dataset-dirs", str(src), "--output-dir", str(arc), "--num-aug", "3", "--seed", "0"])
        out["arc"] = arc
    return out


def split_arrays(data: Path, split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels as the loader yields them (ignore -> -100), puzzle id per row) of an 'all' set."""
    sdir = data / split
    meta = json.loads((sdir / "dataset.json").read_text())
    inputs = np.load(sdir / "all__inputs.npy").astype(np.int64)
    labels = np.load(sdir / "all__labels.npy").astype(np.int64)
    if meta["ignore_label_id"] is not None:
        labels = np.where(labels == meta["ignore_label_id"], IGNORE_LABEL_ID, labels)
    pi = np.load(sdir / "all__puzzle_indices.npy")
    pids = np.load(sdir / "all__puzzle_identifiers.npy")[np.repeat(np.arange(len(pi) - 1), np.diff(pi))]
    return inputs, labels, pids


def wrong_token(labels_row: np.ndarray, cell: int, vocab_lo: int, vocab_hi: int) -> int:
    """A valid token different from the label at `cell`."""
    t = int(labels_row[cell])
    return vocab_lo if t != vocab_lo else vocab_lo + 1 if vocab_lo + 1 < vocab_hi else vocab_lo


def fake_predictions(data: Path, out: Path, wrong_rows: dict[int, list[int]], vocab: tuple[int, int],
                     segments: int = N_SEGMENTS) -> dict[str, np.ndarray]:
    """predictions.npz as evaluate.py writes it: right everywhere except `wrong_rows` {row: [cells]}.
    Segment k < last holds one more wrong cell per remaining segment (the model refines), so the last
    segment equals `preds`. q_halt_logits: +3 for right rows, -2 for wrong ones."""
    inputs, labels, pids = split_arrays(data)
    preds = np.where(labels == IGNORE_LABEL_ID, 0, labels)
    # Segment errors go to the middle of the grid's content cells (inside an ARC crop, clear of `wrong_rows`).
    content = [np.flatnonzero(labels[r] >= vocab[0]) for r in range(len(labels))]
    scored = [c[len(c) // 2:] for c in content]
    for r, cells in wrong_rows.items():
        for c in cells:
            preds[r, c] = wrong_token(labels[r], c, *vocab)
    segs = np.repeat(preds[:, None, :], segments, axis=1)
    for k in range(segments - 1):
        extra = segments - 1 - k
        for r in range(len(labels)):
            for c in scored[r][:extra]:
                segs[r, k, c] = wrong_token(labels[r], c, *vocab)
    exact = ~((preds != labels) & (labels != IGNORE_LABEL_ID)).any(-1)
    arrays = {"inputs": inputs.astype(np.int32), "labels": labels.astype(np.int32), "puzzle_identifiers": pids.astype(np.int32),
              "preds": preds.astype(np.int32), "q_halt_logits": np.where(exact, 3.0, -2.0).astype(np.float32),
              "segment_preds": segs.astype(np.uint8), "segment_steps": np.full(len(labels), segments, np.int32)}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return arrays
