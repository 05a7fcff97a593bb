"""Evaluation metrics beyond the loss head's: 95 % Wilson intervals, the maze optimal-path check, and the
task a puzzle dataset holds (so that task-specific metrics run where they apply).

Pure numpy/math: nothing here imports torch, so config validation and solve.py's checks stay light."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: float, trials: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion. Unlike the normal (Wald) interval it stays inside
    [0, 1] and does not collapse to zero width at 0 % or 100 %, which is where puzzle accuracies live.
    With no trials the proportion is unknown: (0, 1)."""
    n = float(trials)
    if n <= 0:
        return 0.0, 1.0
    p = min(max(float(successes) / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if p == 0 else max(0.0, centre - half)  # exact bounds at 0 % / 100 % (no rounding residue)
    high = 1.0 if p == 1 else min(1.0, centre + half)
    return low, high


def format_interval(value: float, low: float, high: float) -> str:
    """`87.4 % [86.9, 87.9]` (percent, one decimal)."""
    return f"{100 * value:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"


# ------------------------------------------------------------------------------------------------
# which task a dataset holds

def task_from_shape(vocab_size: int, seq_len: int) -> Optional[str]:
    """'arc', 'maze', 'sudoku' or None (no task metric applies): dataset.common.puzzle_kind, the one rule
    the inspector, the viewer and the panels use too."""
    from dataset.common import puzzle_kind  # numpy only; keeps this module free of torch
    kind = puzzle_kind(vocab_size, seq_len)
    return kind if kind in ("arc", "maze", "sudoku") else None


def dataset_task(data_path: str | Path) -> Optional[str]:
    """The task of a puzzle dataset (task_from_shape) from its train split's metadata alone, so the
    original's datasets are recognised too; ARC also needs its identifiers.json (for voting)."""
    root = Path(data_path)
    meta_file = root / "train" / "dataset.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        task = task_from_shape(int(meta["vocab_size"]), int(meta["seq_len"]))
    except (ValueError, KeyError, TypeError):
        return None
    return None if task == "arc" and not (root / "identifiers.json").is_file() else task


# ------------------------------------------------------------------------------------------------
# mazes (tokens of dataset/build_maze_dataset.py: PAD 0, '#' 1, ' ' 2, 'S' 3, 'G' 4, 'o' 5)

def maze_optimal_path(inputs: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """bool [N]: each predicted grid marks a shortest S->G path through open cells (check_maze_path).
    Under this metric an alternative shortest path counts as right; exact match to the reference does not."""
    inputs, preds = np.asarray(inputs), np.asarray(preds)
    return np.array([check_maze_path(q, p)[0] for q, p in zip(inputs, preds)], dtype=bool)


def check_maze_path(question: np.ndarray, pred: np.ndarray) -> tuple[bool, str]:
    """(ok, reason) for one maze (flat tokens). A prediction passes when (1) it keeps every wall, S and G
    of the question and marks 'o' only on open cells, (2) S reaches G through 'o' cells alone, and (3) it
    marks exactly d - 1 cells, d being the breadth-first S->G distance in the question. (2) and (3)
    together mean the 'o' cells ARE one shortest path: any S->G route through them uses at least d - 1."""
    from dataset.build_maze_dataset import GOAL, OPEN, PATH, START, WALL, bfs

    cells = int(np.asarray(question).size)
    side = math.isqrt(cells)
    if side * side != cells:
        raise ValueError(f"maze has {cells} cells; expected a square grid")
    q, p = np.asarray(question).reshape(side, side), np.asarray(pred).reshape(side, side)
    fixed = q != OPEN
    if (p[fixed] != q[fixed]).any():
        r, c = np.argwhere(fixed & (p != q))[0]
        return False, f"changes the maze at row {r + 1}, column {c + 1}"
    if not np.isin(p[~fixed], (OPEN, PATH)).all():
        r, c = np.argwhere(~fixed & ~np.isin(p, (OPEN, PATH)))[0]
        return False, f"puts a wall, S or G on the open cell at row {r + 1}, column {c + 1}"
    starts, goals = np.argwhere(q == START), np.argwhere(q == GOAL)
    if len(starts) != 1 or len(goals) != 1:
        return False, f"the maze has {len(starts)} S and {len(goals)} G cells; expected one each"
    s, g = tuple(starts[0]), tuple(goals[0])
    d = int(bfs(q, s)[g])
    marked = int((p == PATH).sum())
    if d < 0:
        return marked == 0, "no route exists" + ("" if marked == 0 else f", yet {marked} cells are marked")
    path_only = np.where((p == PATH) | (q == START) | (q == GOAL), OPEN, WALL)
    if bfs(path_only, s)[g] < 0:
        return False, f"the {marked} marked cells do not connect S to G"
    if marked != d - 1:
        return False, f"marks {marked} cells; a shortest path has {d - 1}"
    return True, f"a shortest S->G path ({d} steps)"


# ------------------------------------------------------------------------------------------------
# reporting

# (metric key under eval/ or arc/, label); rates are shown in percent with their interval when present
TABLE_ROWS = (("eval/exact_accuracy", "exact accuracy"), ("eval/accuracy", "token accuracy"),
              ("eval/maze_optimal_path", "maze optimal path"), ("eval/oracle_exact_accuracy", "any of K exact"),
              ("arc/pass@1", "ARC pass@1"), ("arc/pass@2", "ARC pass@2"), ("arc/pass@10", "ARC pass@10"),
              ("eval/q_halt_accuracy", "Q halt accuracy"), ("eval/lm_loss", "LM loss (per puzzle)"))


def interval_of(metrics: dict, key: str) -> Optional[tuple[float, float]]:
    """The 95 % interval of `key`: its `_ci_low/_ci_high` entries, or for ARC pass@K the Wilson interval
    over tasks."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is not None and high is not None:
        return low, high
    if key.startswith("arc/pass@") and "arc/num_tasks" in metrics:
        n = metrics["arc/num_tasks"]
        return wilson_interval(metrics[key] * n, n)
    return None


def summary_line(metrics: dict, prefix: str = "eval/") -> str:
    """`exact 87.4 % [86.9, 87.9], tokens 97.0 % [96.9, 97.1], 2.41 segments` (what exists of it)."""
    parts = []
    for key, label in (("exact_accuracy", "exact"), ("accuracy", "tokens"), ("maze_optimal_path", "optimal path")):
        ci = interval_of(metrics, prefix + key)
        if prefix + key in metrics and ci is not None:
            parts.append(f"{label} {format_interval(metrics[prefix + key], *ci)}")
    if prefix + "segments_mean" in metrics:
        parts.append(f"{metrics[prefix + 'segments_mean']:.2f} segments x {int(metrics.get(prefix + 'samples', 1))} samples")
    return ", ".join(parts)


def metrics_table(metrics: dict, dataset: str, checkpoint: str) -> str:
    """One table: metric, value, interval, segments used, samples, dataset, checkpoint."""
    segments = metrics.get("eval/segments_mean", metrics.get("eval/steps"))
    samples = int(metrics.get("eval/samples", 1))
    seg = f"{segments:.2f}" if segments is not None else "-"
    rows = [("metric", "value", "95 % interval", "segments", "samples", "dataset", "checkpoint")]
    for key, label in TABLE_ROWS:
        if key not in metrics:
            continue
        value = metrics[key]
        ci = interval_of(metrics, key)
        rate = key != "eval/lm_loss"
        shown = f"{100 * value:.1f} %" if rate else f"{value:.4g}"
        interval = f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci is not None else "-"
        rows.append((label, shown, interval, seg, str(samples), dataset, checkpoint))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
