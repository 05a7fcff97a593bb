"""ARC scoring: undo each augmentation, vote across augmentations, pass@K, ARC-Prize submission.

Rules (those of the original's arc_eval notebook):
- every prediction (argmax tokens of one test input of one augmented variant) is cropped to its grid and
  de-augmented (inverse dihedral transform, then inverse colour map);
- candidates for one test input (task, de-augmented input grid) are ranked by vote count, then by the
  mean sigmoid(q_halt) confidence of the votes;
- a test input is right at K if its true output is among the top K candidates; a task counts only if ALL
  its test inputs are right; pass@K = solved tasks / tasks.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from dataset import context
from dataset.common import arc_grid_from_tokens, invert_arc_augmentation, parse_arc_identifier

DEFAULT_KS = (1, 2, 10)


def _key(grid: np.ndarray) -> tuple:
    grid = np.asarray(grid)
    return (grid.shape, grid.astype(np.int64).tobytes())


@dataclass
class Candidate:
    grid: np.ndarray
    votes: int = 0
    q_sum: float = 0.0

    @property
    def q_mean(self) -> float:
        return self.q_sum / max(self.votes, 1)


@dataclass
class TestInput:
    """One test input of one task: its true output (from the un-augmented copy) and the votes."""
    order: int
    label: np.ndarray | None = None
    candidates: dict = field(default_factory=dict)

    def ranked(self) -> list[Candidate]:
        return sorted(self.candidates.values(), key=lambda c: (-c.votes, -c.q_mean))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _vote_rows(rows, total: int | None = None) -> dict[str, dict[tuple, TestInput]]:
    """rows: (variant name, input grid, label grid, predicted grid, confidence), all grids still augmented."""
    tasks: dict[str, dict[tuple, TestInput]] = defaultdict(dict)
    n_order = 0
    from utils.progress import track
    for name, inp, lab, pred, conf in track(rows, total=total, desc="ARC voting", unit="row", leave=False):
        task, _, _ = parse_arc_identifier(name)
        inp = invert_arc_augmentation(inp, name)
        ti = tasks[task].get(_key(inp))
        if ti is None:
            ti = tasks[task][_key(inp)] = TestInput(order=n_order)
            n_order += 1
        if ti.label is None:
            ti.label = invert_arc_augmentation(lab, name)
        pred = invert_arc_augmentation(pred, name)
        cand = ti.candidates.get(_key(pred))
        if cand is None:
            cand = ti.candidates[_key(pred)] = Candidate(grid=pred)
        cand.votes += 1
        cand.q_sum += float(conf)
    return tasks


def vote(inputs: np.ndarray, labels: np.ndarray, preds: np.ndarray, puzzle_identifiers: np.ndarray,
         q_halt_logits: np.ndarray, identifiers: list[str]) -> dict[str, dict[tuple, TestInput]]:
    """Group de-augmented predictions by (task, input). Arrays are row-aligned token arrays [N, 900]
    (labels may hold -100 for ignored cells); rows with puzzle id 0 (blank/padding) are skipped."""
    confidence = _sigmoid(q_halt_logits)
    keep = [i for i in range(len(puzzle_identifiers)) if int(puzzle_identifiers[i]) != 0]
    return _vote_rows(((identifiers[int(puzzle_identifiers[i])], arc_grid_from_tokens(inputs[i]),
                       arc_grid_from_tokens(np.where(np.asarray(labels[i]) < 0, 0, labels[i])),  # -100 reads as PAD
                       arc_grid_from_tokens(preds[i]), confidence[i]) for i in keep), total=len(keep))


def vote_context(inputs: np.ndarray, labels: np.ndarray, preds: np.ndarray, q_halt_logits: np.ndarray,
                 names: list[str]) -> dict[str, dict[tuple, TestInput]]:
    """`vote` for the context format (dataset/context.py): the query grid is read from the context, the answer
    from the answer canvas; `names[i]` is row i's variant name (from <set>__example_names.npy)."""
    confidence = _sigmoid(q_halt_logits)
    return _vote_rows(((names[i], context.query_grid(inputs[i]),
                       context.answer_grid(inputs[i], np.where(np.asarray(labels[i]) < 0, 0, labels[i])),
                       context.answer_grid(inputs[i], preds[i]), confidence[i]) for i in range(len(names))),
                      total=len(names))


def pass_at_k(tasks: dict[str, dict[tuple, TestInput]], ks=DEFAULT_KS) -> dict[str, float]:
    out = {}
    for k in ks:
        solved = 0
        for inputs in tasks.values():
            ok = all(ti.label is not None and any(_key(c.grid) == _key(ti.label) for c in ti.ranked()[:k])
                     for ti in inputs.values())
            solved += int(ok and len(inputs) > 0)
        out[f"pass@{k}"] = solved / max(len(tasks), 1)
    out["num_tasks"] = float(len(tasks))
    return out


def submission(tasks: dict[str, dict[tuple, TestInput]], attempts: int = 2) -> dict:
    """ARC-Prize format: {task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]} per test input.

    Only valid grids are submitted: a prediction that crops to nothing (no colour cell at the top left) is
    skipped in favour of the next-ranked candidate; with no valid candidate left the attempt is a 1x1 [[0]]."""
    out = {}
    for task, inputs in sorted(tasks.items()):
        rows = []
        for ti in sorted(inputs.values(), key=lambda t: t.order):
            ranked = [c for c in ti.ranked() if np.asarray(c.grid).ndim == 2 and np.asarray(c.grid).size > 0]
            entry = {}
            for a in range(attempts):
                grid = ranked[min(a, len(ranked) - 1)].grid if ranked else np.zeros((1, 1), np.int64)
                entry[f"attempt_{a + 1}"] = np.asarray(grid).astype(int).tolist()
            rows.append(entry)
        out[task] = rows
    return out


def submission_errors(sub: dict) -> list[str]:
    """Where `sub` breaks the ARC Prize submission format: {task_id: [{"attempt_1": grid, "attempt_2": grid},
    ...]}, each grid a non-empty rectangular list of rows of ints 0-9, at most 30x30. Empty = valid."""
    errors = []
    if not isinstance(sub, dict):
        return ["the submission is not a JSON object"]
    for task, rows in sub.items():
        if not isinstance(rows, list) or not rows:
            errors.append(f"{task}: expected a non-empty list of test-input entries")
            continue
        for i, entry in enumerate(rows):
            if not isinstance(entry, dict) or set(entry) != {"attempt_1", "attempt_2"}:
                errors.append(f"{task}[{i}]: expected keys attempt_1 and attempt_2")
                continue
            for name, grid in entry.items():
                where = f"{task}[{i}].{name}"
                if not isinstance(grid, list) or not grid or not all(isinstance(r, list) and r for r in grid):
                    errors.append(f"{where}: not a non-empty list of non-empty rows")
                elif len({len(r) for r in grid}) != 1 or len(grid) > 30 or len(grid[0]) > 30:
                    errors.append(f"{where}: not a rectangle of at most 30x30")
                elif not all(type(v) is int and 0 <= v <= 9 for r in grid for v in r):
                    errors.append(f"{where}: cells must be ints 0-9")
    return errors


def load_identifiers(data_path: str) -> list[str]:
    with open(f"{data_path}/identifiers.json") as f:
        return json.load(f)
