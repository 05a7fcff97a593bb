"""Build a maze puzzle dataset (the original's Maze-30x30-hard encoding), seeded.

Sources:
  --source DIR     DIR/train.csv and DIR/test.csv: a header, then `source,question,answer,rating`;
                   question/answer are side*side characters of '#' wall, ' ' open, 'S' start, 'G' goal,
                   and in the answer 'o' marks the shortest path.
  --generate N     N training and --test-size M test mazes of side --size: a depth-first (recursive
                   backtracker) maze on the odd cells, optionally with --braid of its dead-end walls
                   knocked out so several routes exist, S and G placed far apart, the shortest S->G route
                   found by breadth-first search and marked 'o' in the answer.

Tokens: PAD 0, '#' 1, ' ' 2, 'S' 3, 'G' 4, 'o' 5; vocab 6, seq_len = side^2. One example per puzzle, all
puzzle ids 0. With --aug every training maze becomes a group of its 8 dihedral transforms.
"""
from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path

import numpy as np
from utils.progress import Progress

from dataset.common import (BLANK_IDENTIFIER, DatasetError, PuzzleSetArrays, dihedral_transform,
                            exit_on_dataset_error, iter_puzzle_csv, split_metadata, write_puzzle_dataset)

CHARSET = "# SGo"  # token = index + 1
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
VOCAB_SIZE = len(CHARSET) + 1


# ---------------------------------------------------------------------------------------------------
# CSV source


def read_maze_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (questions, answers) as uint8 tokens [N, side*side]."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected a maze CSV)")
    lut = np.zeros(256, dtype=np.uint8)
    for i, ch in enumerate(CHARSET):
        lut[ord(ch)] = i + 1
    qs, as_, cells = [], [], None
    for line, (_, q, a, _) in iter_puzzle_csv(path):
        if cells is None:
            cells = len(q)
            side = int(round(cells ** 0.5))
            if side * side != cells or cells == 0:
                raise DatasetError(f"{path}:{line}: question has {cells} characters; expected a square grid")
        for name, s in (("question", q), ("answer", a)):
            if len(s) != cells:
                raise DatasetError(f"{path}:{line}: {name} has {len(s)} characters; expected {cells}")
            bad = next((ch for ch in s if ch not in CHARSET), None)
            if bad is not None:
                raise DatasetError(f"{path}:{line}: {name} holds the character {bad!r}; expected one of '#', ' ', 'S', 'G', 'o'")
        qt = lut[np.frombuffer(q.encode(), dtype=np.uint8)]
        at = lut[np.frombuffer(a.encode(), dtype=np.uint8)]
        diff = qt != at
        if (diff & ~((qt == OPEN) & (at == PATH))).any():
            cell = int(np.argmax(diff & ~((qt == OPEN) & (at == PATH))))
            raise DatasetError(f"{path}:{line}: answer contradicts the question at cell {cell} (question "
                               f"{q[cell]!r}, answer {a[cell]!r}); only ' ' may become 'o'")
        qs.append(qt)
        as_.append(at)
    if not qs:
        raise DatasetError(f"{path}: no maze rows after the header")
    return np.stack(qs), np.stack(as_)


# ---------------------------------------------------------------------------------------------------
# Generator


def carve_maze(side: int, rng: np.random.Generator, braid: float) -> np.ndarray:
    """[side, side] of WALL/OPEN: a perfect maze on odd coordinates, then `braid` of the walls that
    separate two open cells removed (creates loops, so the shortest path is not the only path)."""
    g = np.full((side, side), WALL, dtype=np.uint8)
    n = (side - 1) // 2  # cells per axis at odd coordinates 1, 3, ...
    if n < 2:
        raise DatasetError(f"--size must be at least 5, got {side}")
    visited = np.zeros((n, n), dtype=bool)
    start = (int(rng.integers(n)), int(rng.integers(n)))
    visited[start] = True
    g[2 * start[0] + 1, 2 * start[1] + 1] = OPEN
    stack = [start]
    steps = ((0, 1), (1, 0), (0, -1), (-1, 0))
    while stack:
        r, c = stack[-1]
        nbrs = [(r + dr, c + dc) for dr, dc in steps if 0 <= r + dr < n and 0 <= c + dc < n and not visited[r + dr, c + dc]]
        if not nbrs:
            stack.pop()
            continue
        nr, nc = nbrs[int(rng.integers(len(nbrs)))]
        visited[nr, nc] = True
        g[2 * nr + 1, 2 * nc + 1] = OPEN
        g[r + nr + 1, c + nc + 1] = OPEN  # the wall between the two cells
        stack.append((nr, nc))
    if braid > 0:
        inner = g[1:-1, 1:-1]
        horiz = (inner == WALL) & (np.roll(g, 1, 1)[1:-1, 1:-1] == OPEN) & (np.roll(g, -1, 1)[1:-1, 1:-1] == OPEN)
        vert = (inner == WALL) & (np.roll(g, 1, 0)[1:-1, 1:-1] == OPEN) & (np.roll(g, -1, 0)[1:-1, 1:-1] == OPEN)
        cand = np.argwhere(horiz | vert) + 1
        knock = cand[rng.random(len(cand)) < braid]
        g[knock[:, 0], knock[:, 1]] = OPEN
    return g


def bfs(g: np.ndarray, src: tuple[int, int]) -> np.ndarray:
    """Distances from src over non-wall cells (-1 = unreachable)."""
    side = g.shape[0]
    dist = np.full(g.shape, -1, dtype=np.int64)
    dist[src] = 0
    q = deque([src])
    while q:
        r, c = q.popleft()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < side and 0 <= nc < side and g[nr, nc] != WALL and dist[nr, nc] < 0:
                dist[nr, nc] = dist[r, c] + 1
                q.append((nr, nc))
    return dist


def make_maze(side: int, rng: np.random.Generator, braid: float) -> tuple[np.ndarray, np.ndarray]:
    """-> (question, answer) tokens [side*side]. S and G: G drawn among the farthest quarter of cells from S."""
    g = carve_maze(side, rng, braid)
    open_cells = np.argwhere(g == OPEN)
    s = tuple(open_cells[int(rng.integers(len(open_cells)))])
    dist = bfs(g, s)
    far = np.argwhere(dist >= np.quantile(dist[dist > 0], 0.75))
    goal = tuple(far[int(rng.integers(len(far)))])
    # walk back from G along strictly decreasing distance (a shortest path), choosing randomly on ties
    path = []
    cur = goal
    while dist[cur] > 1:
        r, c = cur
        prev = [(nr, nc) for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1))
                if 0 <= nr < side and 0 <= nc < side and dist[nr, nc] == dist[cur] - 1]
        cur = prev[int(rng.integers(len(prev)))]
        path.append(cur)
    q = g.copy()
    q[s], q[goal] = START, GOAL
    a = q.copy()
    for cell in path:
        a[cell] = PATH
    return q.reshape(-1), a.reshape(-1)


def generate_mazes(count: int, side: int, rng: np.random.Generator, braid: float, seen: set, desc: str):
    qs, as_ = [], []
    with Progress(count, desc=desc, unit="maze", leave=False) as bar:  # no bar in logs
        tries = 0
        while len(qs) < count:
            tries += 1
            if tries > 10 * count + 100:
                raise DatasetError(f"only {len(qs)} distinct {side}x{side} mazes found for {desc}")
            q, a = make_maze(side, rng, braid)
            if q.tobytes() in seen:
                continue
            seen.add(q.tobytes())
            qs.append(q)
            as_.append(a)
            bar.update(1)
    cells = side * side
    return (np.stack(qs) if qs else np.zeros((0, cells), np.uint8),
            np.stack(as_) if as_ else np.zeros((0, cells), np.uint8))


# ---------------------------------------------------------------------------------------------------
# Build


def dihedral_group(q: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, side^2] -> [N*8, side^2], group-major, transform id 0..7 inside each group."""
    n, cells = q.shape
    side = int(round(cells ** 0.5))
    qg, ag = q.reshape(n, side, side), a.reshape(n, side, side)
    qo = np.stack([dihedral_transform(qg, t) for t in range(8)], axis=1).reshape(n * 8, cells)
    ao = np.stack([dihedral_transform(ag, t) for t in range(8)], axis=1).reshape(n * 8, cells)
    return np.ascontiguousarray(qo), np.ascontiguousarray(ao)


def split_arrays(q: np.ndarray, a: np.ndarray, per_group: int) -> PuzzleSetArrays:
    n = len(q)
    return PuzzleSetArrays(inputs=q.astype(np.uint8), labels=a.astype(np.uint8),
                           puzzle_identifiers=np.zeros(n, dtype=np.int32),
                           puzzle_indices=np.arange(n + 1, dtype=np.int32),
                           group_indices=np.arange(0, n + 1, per_group, dtype=np.int32))


def build(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    if args.source is not None:
        q_tr, a_tr = read_maze_csv(Path(args.source) / "train.csv")
        q_te, a_te = read_maze_csv(Path(args.source) / "test.csv")
        if q_tr.shape[1] != q_te.shape[1]:
            raise DatasetError(f"{args.source}: train and test mazes differ in size ({q_tr.shape[1]} vs {q_te.shape[1]} cells)")
    else:
        seen: set = set()
        q_tr, a_tr = generate_mazes(args.generate, args.size, rng, args.braid, seen, "train mazes")
        q_te, a_te = generate_mazes(args.test_size, args.size, rng, args.braid, seen, "test mazes")
    if args.subsample_size is not None and args.subsample_size < len(q_tr):
        keep = np.sort(rng.choice(len(q_tr), size=args.subsample_size, replace=False))
        q_tr, a_tr = q_tr[keep], a_tr[keep]
    per = 1
    if args.aug:
        q_tr, a_tr = dihedral_group(q_tr, a_tr)
        per = 8
    splits = {}
    for split, (q, a, p) in {"train": (q_tr, a_tr, per), "test": (q_te, a_te, 1)}.items():
        sets = {"all": split_arrays(q, a, p)}
        splits[split] = (split_metadata(sets, vocab_size=VOCAB_SIZE, seq_len=q.shape[1], num_puzzle_identifiers=1,
                                        mean_puzzle_examples=1), sets)
    write_puzzle_dataset(args.output_dir, splits, [BLANK_IDENTIFIER])
    return {"train_groups": len(q_tr) // per, "train_examples": len(q_tr), "test_examples": len(q_te),
            "side": int(round(q_tr.shape[1] ** 0.5))}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataset.build_maze_dataset",
                                description="Build a maze puzzle dataset (HRM on-disk format), seeded.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="directory with train.csv and test.csv (Maze-30x30-hard layout)")
    src.add_argument("--generate", type=int, metavar="N", help="generate N training mazes offline")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=30, help="side of generated mazes (default 30)")
    p.add_argument("--test-size", type=int, default=100, help="test mazes with --generate (default 100)")
    p.add_argument("--braid", type=float, default=0.1,
                   help="fraction of removable inner walls knocked out in generated mazes (default 0.1)")
    p.add_argument("--subsample-size", type=int, default=None, help="keep this many training mazes (seeded)")
    p.add_argument("--aug", action="store_true", help="8 dihedral transforms per training maze")
    return p


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    t0 = time.perf_counter()
    with exit_on_dataset_error():
        if args.generate is not None and (args.generate < 1 or args.test_size < 0):
            raise DatasetError("--generate must be >= 1 and --test-size >= 0")
        if not 0.0 <= args.braid <= 1.0:
            raise DatasetError(f"--braid must be in [0, 1], got {args.braid}")
        s = build(args)
    print(f"maze {s['side']}x{s['side']}: {s['train_groups']} train mazes -> {s['train_examples']} examples, "
          f"{s['test_examples']} test examples, written to {args.output_dir} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
