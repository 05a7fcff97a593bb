"""Build a Sudoku puzzle dataset, seeded and vectorised.

Sources:
  --source DIR     DIR/train.csv and DIR/test.csv in the Sudoku-Extreme layout: a header, then
                   `source,question,answer,rating`; question uses '.' (or '0') for blanks.
  --generate N     N training and --test-size M test puzzles made offline: a random solved grid (a base
                   pattern shuffled by digits, bands, rows, stacks, columns), then cells removed in random
                   order while a bitmask solver still finds exactly one solution, until --blanks are blank.

Grids: --grid 9 (3x3 boxes, the original), 6 (2-row x 3-column boxes) or 4 (2x2 boxes).
Tokens: 0 = PAD, 1 = blank, 2..grid+1 = digits 1..grid; vocab = grid + 2, seq_len = grid^2. Labels never
hold 0, so every cell is supervised (as the original). Inputs/labels are written as uint8 (the original
wrote int64 when augmenting; the loader reads both).

Augmentation (train only, --num-aug A): every puzzle becomes a group of 1 + A one-example puzzles, the
first unchanged; each augmentation permutes the digits, transposes with probability 1/2 (square boxes
only), shuffles the bands and the rows inside each band, and the stacks and the columns inside each stack.
All A augmentations of all puzzles are built as index arrays and applied with one gather per chunk.

Example:  python -m dataset.build_sudoku_dataset --source data/raw/sudoku-extreme \\
              --output-dir data/sudoku-extreme-1k-aug-1000 --subsample-size 1000 --num-aug 1000 --seed 0
          python -m dataset.build_sudoku_dataset --grid 6 --generate 3000 --test-size 500 --blanks 10..16 \\
              --num-aug 20 --output-dir data/sudoku6-demo
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from utils.progress import Progress, track

from dataset.common import (BLANK_IDENTIFIER, DatasetError, PuzzleSetArrays, exit_on_dataset_error,
                            iter_puzzle_csv, split_metadata, write_puzzle_dataset)

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # grid -> (box rows, box columns)
AUG_CHUNK = 1 << 15  # augmentations drawn and gathered per chunk (bounds memory; fixed for determinism)


# ---------------------------------------------------------------------------------------------------
# Validation


def box_view(vals: np.ndarray, grid: int) -> np.ndarray:
    """[N, grid, grid] -> [N, grid boxes, grid cells] (box-major)."""
    br, bc = BOXES[grid]
    n = len(vals)
    return vals.reshape(n, grid // br, br, grid // bc, bc).transpose(0, 1, 3, 2, 4).reshape(n, grid, grid)


def invalid_solution_rows(sol: np.ndarray, grid: int) -> np.ndarray:
    """Boolean [N]: solution grids (values 1..grid, shape [N, grid*grid]) that break a Sudoku rule."""
    v = sol.reshape(-1, grid, grid)
    target = np.arange(1, grid + 1)
    bad = np.zeros(len(v), dtype=bool)
    for units in (v, v.transpose(0, 2, 1), box_view(v, grid)):
        bad |= ~(np.sort(units, axis=-1) == target).all(axis=(1, 2))
    return bad


def check_puzzles(q: np.ndarray, a: np.ndarray, grid: int, where: str, line_numbers: np.ndarray) -> None:
    """q: values 0 (blank) or 1..grid; a: values 1..grid. Raise on the first bad row."""
    bad = invalid_solution_rows(a, grid)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(f"{where}:{line_numbers[i]}: answer breaks a Sudoku rule (a row, column or box "
                           f"repeats a digit)")
    contra = ((q != 0) & (q != a)).any(axis=1)
    if contra.any():
        i = int(np.argmax(contra))
        cell = int(np.argmax((q[i] != 0) & (q[i] != a[i])))
        raise DatasetError(f"{where}:{line_numbers[i]}: answer contradicts the question at cell {cell} "
                           f"(question {q[i, cell]}, answer {a[i, cell]})")


# ---------------------------------------------------------------------------------------------------
# CSV source


def read_sudoku_csv(path: Path, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (questions [N, grid^2] uint8 with 0 = blank, answers [N, grid^2] uint8, ratings float64 [N])."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected a Sudoku-Extreme style CSV)")
    cells = grid * grid
    digits = "".join(str(d) for d in range(1, grid + 1))
    lut_q = np.full(256, 255, dtype=np.uint8)
    lut_a = np.full(256, 255, dtype=np.uint8)
    for d in range(1, grid + 1):
        lut_q[ord(str(d))] = lut_a[ord(str(d))] = d
    lut_q[ord(".")] = lut_q[ord("0")] = 0
    qs, as_, ratings, lines = [], [], [], []
    for line, (_, q, a, rating) in iter_puzzle_csv(path):
        for name, s in (("question", q), ("answer", a)):
            if len(s) != cells:
                raise DatasetError(f"{path}:{line}: {name} has {len(s)} characters; expected {cells} "
                                   f"for a {grid}x{grid} grid")
        try:
            ratings.append(float(rating))
        except ValueError:
            raise DatasetError(f"{path}:{line}: rating {rating!r} is not a number") from None
        qs.append(q)
        as_.append(a)
        lines.append(line)
    if not qs:
        raise DatasetError(f"{path}: no puzzle rows after the header")
    lines = np.asarray(lines)

    def decode(strings, lut, name, allowed):
        raw = np.frombuffer("".join(strings).encode("utf-8", "replace"), dtype=np.uint8)
        if len(raw) != len(strings) * cells:  # a multi-byte character slipped in
            for s, ln in zip(strings, lines):
                if len(s.encode("utf-8", "replace")) != cells:
                    raise DatasetError(f"{path}:{ln}: {name} holds a non-ASCII character; expected {allowed}")
        vals = lut[raw].reshape(len(strings), cells)
        bad = (vals == 255).any(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            ch = strings[i][int(np.argmax(vals[i] == 255))]
            raise DatasetError(f"{path}:{lines[i]}: {name} holds the character {ch!r}; expected {allowed}")
        return vals

    q = decode(qs, lut_q, "question", f"'.', '0' or {digits}")
    a = decode(as_, lut_a, "answer", digits)
    check_puzzles(q, a, grid, str(path), lines)
    return q, a, np.asarray(ratings)


# ---------------------------------------------------------------------------------------------------
# Offline generator


def count_solutions(vals: list[int], grid: int, limit: int = 2) -> int:
    """Number of solutions of a puzzle (0 = blank), counting up to `limit`. Bitmask backtracking that
    always branches on the blank cell with the fewest candidates."""
    br, bc = BOXES[grid]
    full = (1 << grid) - 1
    rows, cols, boxes = [0] * grid, [0] * grid, [0] * grid
    blanks = []
    for i, v in enumerate(vals):
        r, c = divmod(i, grid)
        b = (r // br) * (grid // bc) + c // bc
        if v:
            bit = 1 << (v - 1)
            if rows[r] & bit or cols[c] & bit or boxes[b] & bit:
                return 0
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            blanks.append((r, c, b))
    found = 0

    def solve(todo: list) -> None:
        nonlocal found
        if not todo:
            found += 1
            return
        best_k, best_free, best_n = -1, 0, grid + 1
        for k, (r, c, b) in enumerate(todo):
            free = full & ~(rows[r] | cols[c] | boxes[b])
            n = bin(free).count("1")
            if n < best_n:
                best_k, best_free, best_n = k, free, n
                if n <= 1:
                    break
        if best_n == 0:
            return
        r, c, b = todo[best_k]
        rest = todo[:best_k] + todo[best_k + 1:]
        free = best_free
        while free and found < limit:
            bit = free & -free
            free ^= bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            solve(rest)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit

    solve(blanks)
    return found


def random_solution(grid: int, rng: np.random.Generator) -> np.ndarray:
    """A random solved grid [grid*grid] (values 1..grid): a base pattern with shuffled digits, bands,
    rows within bands, stacks, columns within stacks (and a transpose for square boxes)."""
    br, bc = BOXES[grid]
    r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    base = (bc * (r % br) + r // br + c) % grid  # valid for boxes of br rows x bc columns
    rows = np.concatenate([band * br + rng.permutation(br) for band in rng.permutation(grid // br)])
    cols = np.concatenate([stack * bc + rng.permutation(bc) for stack in rng.permutation(grid // bc)])
    g = base[rows][:, cols]
    if br == bc and rng.random() < 0.5:
        g = g.T
    return (rng.permutation(grid) + 1)[g].reshape(-1)


def make_puzzle(grid: int, blanks: int, rng: np.random.Generator, max_tries: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """A puzzle with exactly `blanks` blank cells and a unique solution -> (question, answer), values 0..grid."""
    for _ in range(max_tries):
        sol = random_solution(grid, rng)
        q = sol.tolist()
        removed = 0
        for cell in rng.permutation(grid * grid):
            if removed == blanks:
                break
            keep = q[cell]
            q[cell] = 0
            if count_solutions(q, grid, limit=2) == 1:
                removed += 1
            else:
                q[cell] = keep
        if removed == blanks:
            return np.asarray(q, dtype=np.uint8), sol.astype(np.uint8)
    raise DatasetError(f"could not make a {grid}x{grid} puzzle with {blanks} blanks and a unique solution "
                       f"in {max_tries} tries; ask for fewer blanks")


def generate_puzzles(count: int, grid: int, blanks: tuple[int, int], rng: np.random.Generator,
                     exclude: set | None = None, desc: str = "generate") -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct puzzles (none in `exclude`, which is updated), blanks uniform in [lo, hi]."""
    seen = exclude if exclude is not None else set()
    qs, as_ = [], []
    misses = 0
    with Progress(count, desc=desc, unit="puzzle", leave=False) as bar:  # no bar in logs
        while len(qs) < count:
            k = int(rng.integers(blanks[0], blanks[1] + 1))
            q, a = make_puzzle(grid, k, rng)
            key = q.tobytes()
            if key in seen:
                misses += 1
                if misses > 20 * count + 1000:
                    raise DatasetError(f"only {len(qs)} distinct {grid}x{grid} puzzles found for {desc}; "
                                       f"ask for fewer puzzles or more blanks")
                continue
            seen.add(key)
            qs.append(q)
            as_.append(a)
            bar.update(1)
    cells = grid * grid
    return (np.stack(qs) if qs else np.zeros((0, cells), np.uint8),
            np.stack(as_) if as_ else np.zeros((0, cells), np.uint8))


# ---------------------------------------------------------------------------------------------------
# Augmentation


def _permutations(rng: np.random.Generator, shape: tuple, k: int) -> np.ndarray:
    """Independent random permutations of range(k) along the last axis; shape + (k,)."""
    return rng.permuted(np.broadcast_to(np.arange(k, dtype=np.int64), shape + (k,)), axis=-1)


def augment_tokens(q_tok: np.ndarray, a_tok: np.ndarray, num_aug: int, grid: int, rng: np.random.Generator,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token arrays [N, grid^2] -> [N*(1+num_aug), grid^2], group-major; row i*(1+A) is puzzle i unchanged."""
    br, bc = BOXES[grid]
    n, cells = q_tok.shape
    per = 1 + num_aug
    out_q = np.empty((n * per, cells), dtype=np.uint8)
    out_a = np.empty((n * per, cells), dtype=np.uint8)
    out_q[::per] = q_tok
    out_a[::per] = a_tok
    if num_aug == 0 or n == 0:
        return out_q, out_a
    # Augmented rows are all rows r with r % per != 0; their source puzzle is r // per.
    total = n * num_aug
    aug_rows = (np.arange(total) // num_aug) * per + 1 + np.arange(total) % num_aug
    flat_q, flat_a = q_tok.reshape(-1), a_tok.reshape(-1)
    rr, cc = np.divmod(np.arange(cells), grid)
    for s in track(range(0, total, AUG_CHUNK), desc="augment", unit="chunk", leave=False, enabled=progress):
        k = min(AUG_CHUNK, total - s)
        src_puzzle = aug_rows[s:s + k] // per
        # token map: PAD and blank fixed, digits permuted
        tok_map = np.empty((k, grid + 2), dtype=np.uint8)
        tok_map[:, :2] = (0, 1)
        tok_map[:, 2:] = _permutations(rng, (k,), grid) + 2
        transpose = rng.random(k) < 0.5 if br == bc else np.zeros(k, dtype=bool)
        rows = (_permutations(rng, (k,), grid // br)[:, :, None] * br + _permutations(rng, (k, grid // br), br)).reshape(k, grid)
        cols = (_permutations(rng, (k,), grid // bc)[:, :, None] * bc + _permutations(rng, (k, grid // bc), bc)).reshape(k, grid)
        # output cell (r, c) reads board cell (rows[r], cols[c]), or (cols[c], rows[r]) when transposed
        R, C = rows[:, rr], cols[:, cc]
        src = np.where(transpose[:, None], C * grid + R, R * grid + C) + src_puzzle[:, None] * cells
        map_base = (np.arange(k) * (grid + 2))[:, None]
        tm = tok_map.reshape(-1)
        out_q[aug_rows[s:s + k]] = tm[flat_q[src] + map_base]
        out_a[aug_rows[s:s + k]] = tm[flat_a[src] + map_base]
    return out_q, out_a


# ---------------------------------------------------------------------------------------------------
# Build


def to_tokens(vals: np.ndarray) -> np.ndarray:
    return (vals + 1).astype(np.uint8)  # 0 blank -> 1, digit d -> d + 1; PAD 0 is never stored


def split_arrays(q_tok: np.ndarray, a_tok: np.ndarray, per_group: int) -> PuzzleSetArrays:
    n = len(q_tok)
    return PuzzleSetArrays(inputs=q_tok, labels=a_tok,
                           puzzle_identifiers=np.zeros(n, dtype=np.int32),
                           puzzle_indices=np.arange(n + 1, dtype=np.int32),
                           group_indices=np.arange(0, n + 1, per_group, dtype=np.int32))


def build(args: argparse.Namespace) -> dict:
    grid = args.grid
    rng = np.random.default_rng(args.seed)
    if args.source is not None:
        src = Path(args.source)
        q_tr, a_tr, rt_tr = read_sudoku_csv(src / "train.csv", grid)
        q_te, a_te, rt_te = read_sudoku_csv(src / "test.csv", grid)
        if args.min_difficulty is not None:
            q_tr, a_tr = q_tr[rt_tr >= args.min_difficulty], a_tr[rt_tr >= args.min_difficulty]
            q_te, a_te = q_te[rt_te >= args.min_difficulty], a_te[rt_te >= args.min_difficulty]
    else:
        lo, hi = args.blanks
        seen: set = set()
        q_tr, a_tr = generate_puzzles(args.generate, grid, (lo, hi), rng, seen, desc="train puzzles")
        q_te, a_te = generate_puzzles(args.test_size, grid, (lo, hi), rng, seen, desc="test puzzles")
    if args.subsample_size is not None and args.subsample_size < len(q_tr):
        keep = np.sort(rng.choice(len(q_tr), size=args.subsample_size, replace=False))
        q_tr, a_tr = q_tr[keep], a_tr[keep]
    if len(q_tr) == 0:
        raise DatasetError("no training puzzles left (check --min-difficulty / --subsample-size)")
    tq, ta = augment_tokens(to_tokens(q_tr), to_tokens(a_tr), args.num_aug, grid, rng)
    splits = {}
    for split, (inp, lab, per) in {"train": (tq, ta, 1 + args.num_aug),
                                    "test": (to_tokens(q_te), to_tokens(a_te), 1)}.items():
        sets = {"all": split_arrays(inp, lab, per)}
        meta = split_metadata(sets, vocab_size=grid + 2, seq_len=grid * grid, num_puzzle_identifiers=1,
                              mean_puzzle_examples=1)
        splits[split] = (meta, sets)
    write_puzzle_dataset(args.output_dir, splits, [BLANK_IDENTIFIER])
    return {"train_groups": len(q_tr), "train_examples": len(tq), "test_examples": len(q_te)}


def parse_blanks(text: str) -> tuple[int, int]:
    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split("..", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or LO..HI, got {text!r}") from None
    if lo < 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return lo, hi


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataset.build_sudoku_dataset",
                                description="Build a Sudoku puzzle dataset (HRM on-disk format), seeded.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="directory with train.csv and test.csv (Sudoku-Extreme layout)")
    src.add_argument("--generate", type=int, metavar="N", help="generate N training puzzles offline")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, choices=sorted(BOXES), default=9)
    p.add_argument("--test-size", type=int, default=100, help="test puzzles with --generate (default 100)")
    p.add_argument("--blanks", type=parse_blanks, default=None,
                   help="blank cells per generated puzzle: K or LO..HI (uniform); required with --generate")
    p.add_argument("--subsample-size", type=int, default=None, help="keep this many training puzzles (seeded)")
    p.add_argument("--min-difficulty", type=float, default=None, help="keep CSV rows with rating >= this")
    p.add_argument("--num-aug", type=int, default=0, help="augmentations per training puzzle")
    return p


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    t0 = time.perf_counter()
    with exit_on_dataset_error():
        if args.generate is not None:
            if args.blanks is None:
                raise DatasetError("--generate needs --blanks K (or LO..HI)")
            if args.blanks[1] >= args.grid * args.grid:
                raise DatasetError(f"--blanks must be below {args.grid * args.grid} for a {args.grid}x{args.grid} grid")
            if args.generate < 1 or args.test_size < 0:
                raise DatasetError("--generate must be >= 1 and --test-size >= 0")
        if args.num_aug < 0:
            raise DatasetError("--num-aug must be >= 0")
        stats = build(args)
    print(f"sudoku {args.grid}x{args.grid}: {stats['train_groups']} train puzzles -> {stats['train_examples']} "
          f"examples, {stats['test_examples']} test examples, written to {args.output_dir} in "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
