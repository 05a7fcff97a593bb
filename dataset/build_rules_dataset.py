"""Generate small ARC-like tasks with hidden rules, offline and reproducibly, for in-context vs puzzle-id study.

    python -m dataset.build_rules_dataset --output-dir data/rules-context --format context
    python -m dataset.build_rules_dataset --output-dir data/rules-puzzle-id --format puzzle_id

A task draws a hidden rule, k demonstration pairs and one query pair; every grid of a task has one size
(h, w in --min-size..--max-size, before the rule: flips/rotations may swap h and w), sparse random cells
(background 0) in a palette of 1-3 colours. Rule families (`--families`, default all):

    colour_map     (a, b): every cell of colour a becomes b                      72 instances
    dihedral       tid 1..7 of dataset.common.dihedral_transform                  7
    translate      (dy, dx) in [-2, 2]^2 minus (0, 0), cells shifted out are lost, 0 fills in   24
    gravity        down | up | left | right: the non-zero cells of each column (row) slide to that side,
                   keeping their order                                            4
    size_recolour  (c1, c2, c3): each 4-connected object of non-zero cells is recoloured by its size,
                   1 -> c1, 2 -> c2, >= 3 -> c3                                    504

and compositions `second(first(grid))` of two different families. Each family's instances are split once
(seeded) into train and held-out instances (--held-out-fraction, at least one held out). Splits:

    train                  singles and compositions of the seen family pairs, train instances only
    test / instances       the same families and pairs, held-out instances only
    test / compositions    the family pairs of --held-out-pairs (never in train, either order), train instances

A task is redrawn until its rule changes every grid (a rule that leaves its query unchanged shows
nothing). Each task draws from its own generator, seeded by (seed, split, index): byte-identical output.

Formats: `context` (dataset/context.py: leave-one-out rows over the k + 1 pairs of each train task; one row
of k demonstrations + the query per test task; no puzzle ids) or `puzzle_id` (the original ARC encoding on
a side x side canvas, side = --max-size, one example per pair, one puzzle id per task; with
--test-demos-in-train, the default and the original ARC recipe, the test tasks' demonstrations are train
examples under their id, since an id never trained on carries nothing). tasks.json lists every task's rule
(split/set -> per task [[family, params], ...], in application order).
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass

import numpy as np
from utils.progress import track

from dataset.common import (ARC_COLOR_OFFSET, BLANK_IDENTIFIER, DatasetError, PuzzleSetArrays, dihedral_transform,
                            encode_arc_canvas, exit_on_dataset_error, split_metadata, write_puzzle_dataset)
from dataset.context import CONTEXT_VOCAB_SIZE, encode_context, pad_rows

GRAVITY = ("down", "up", "left", "right")


# ---------------------------------------------------------------------------------------------------
# Rules: each applies to a stack of same-shape grids [n, h, w] at once


def colour_map(g: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.where(g == a, b, g).astype(g.dtype)


def dihedral(g: np.ndarray, tid: int) -> np.ndarray:
    return np.ascontiguousarray(dihedral_transform(g, tid))


def translate(g: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(g)
    h, w = g.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        g[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def gravity(g: np.ndarray, direction: str) -> np.ndarray:
    axis = 1 if direction in ("down", "up") else 2
    # A stable sort on "is background" keeps the cells' order; down/right put the background first.
    key = (g != 0) if direction in ("down", "right") else (g == 0)
    return np.take_along_axis(g, np.argsort(key, axis=axis, kind="stable"), axis=axis)


def component_sizes(g: np.ndarray) -> np.ndarray:
    """Size of the 4-connected object of non-zero cells each cell belongs to (0 on background), [n, h, w].
    Labels propagate the maximum cell index over neighbours until stable (vectorised over the stack)."""
    n, h, w = g.shape
    fg = g != 0
    lab = np.where(fg, np.arange(1, h * w + 1).reshape(1, h, w), 0)
    while True:
        p = np.pad(lab, ((0, 0), (1, 1), (1, 1)))
        nb = np.maximum.reduce([p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:], lab])
        new = np.where(fg, nb, 0)
        if np.array_equal(new, lab):
            break
        lab = new
    flat = lab.reshape(n, -1) + (h * w + 1) * np.arange(n)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n * (h * w + 1))
    return np.where(fg, counts[flat].reshape(n, h, w), 0)


def size_recolour(g: np.ndarray, c1: int, c2: int, c3: int) -> np.ndarray:
    s = component_sizes(g)
    return np.select([s == 1, s == 2, s >= 3], [c1, c2, c3], 0).astype(g.dtype)


@dataclass(frozen=True)
class Family:
    fn: object
    instances: tuple  # every parameter tuple of the family, in a fixed order

    def apply(self, g: np.ndarray, params: tuple) -> np.ndarray:
        return self.fn(g, *params)


FAMILIES = {
    "colour_map": Family(colour_map, tuple((a, b) for a in range(1, 10) for b in range(1, 10) if a != b)),
    "dihedral": Family(dihedral, tuple((t,) for t in range(1, 8))),
    "translate": Family(translate, tuple((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0))),
    "gravity": Family(gravity, tuple((d,) for d in GRAVITY)),
    "size_recolour": Family(size_recolour, tuple(itertools.permutations(range(1, 10), 3))),
}
DEFAULT_HELD_OUT_PAIRS = ("dihedral+gravity", "translate+size_recolour", "colour_map+dihedral")

Rule = tuple[tuple[str, tuple], ...]  # ((family, params), ...) applied in order


def apply_rule(rule: Rule, g: np.ndarray) -> np.ndarray:
    for fam, params in rule:
        g = FAMILIES[fam].apply(g, params)
    return g


def check_family(name: str) -> str:
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DatasetError(f"unknown rule family '{name}'{hint} (families: {', '.join(FAMILIES)})")
    return name


def parse_pairs(specs: list[str], families: list[str]) -> set[frozenset]:
    pairs = set()
    for spec in specs:
        parts = spec.split("+")
        if len(parts) != 2 or parts[0] == parts[1]:
            raise DatasetError(f"--held-out-pairs: '{spec}' must be two different families joined by '+'")
        for p in parts:
            check_family(p)
            if p not in families:
                raise DatasetError(f"--held-out-pairs: '{spec}' names '{p}', which is not in --families")
        pairs.add(frozenset(parts))
    return pairs


# ---------------------------------------------------------------------------------------------------
# Tasks


def _generator(seed: int, *key) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")]))


def split_instances(families: list[str], held_out_fraction: float, seed: int) -> dict[str, tuple[list, list]]:
    """family -> (train instances, held-out instances): a seeded partition, at least one in each."""
    out = {}
    for f in families:
        inst = list(FAMILIES[f].instances)
        order = _generator(seed, "instances", f).permutation(len(inst))
        n_held = min(len(inst) - 1, max(1, math.ceil(held_out_fraction * len(inst))))
        out[f] = ([inst[i] for i in sorted(order[n_held:])], [inst[i] for i in sorted(order[:n_held])])
    return out


def draw_task(rng: np.random.Generator, kinds: list[tuple[str, ...]], pool: dict[str, list], n_pairs: int,
              min_size: int, max_size: int) -> tuple[Rule, list[tuple[np.ndarray, np.ndarray]]]:
    """One task: a rule kind (1 or 2 families, in order), its instances from `pool`, n_pairs pairs."""
    for _ in range(100):
        kind = kinds[int(rng.integers(len(kinds)))]
        rule = tuple((f, pool[f][int(rng.integers(len(pool[f])))]) for f in kind)
        h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        palette = rng.choice(np.arange(1, 10), size=int(rng.integers(1, 4)), replace=False)
        if kind[0] == "colour_map":
            palette[0] = rule[0][1][0]  # the mapped colour must occur for the rule to show
        density = rng.uniform(0.2, 0.5)
        cells = rng.random((n_pairs, h, w)) < density
        colours = palette[rng.integers(len(palette), size=(n_pairs, h, w))]
        grids = np.where(cells, colours, 0).astype(np.uint8)
        outs = apply_rule(rule, grids)
        if outs.shape == grids.shape and np.any(np.all(outs == grids, axis=(1, 2))):
            continue  # the rule leaves some grid unchanged
        return rule, [(grids[i], outs[i]) for i in range(n_pairs)]
    raise DatasetError(f"could not draw a task whose rule changes every grid after 100 tries (rule kinds "
                       f"{kinds[:3]}...); widen --min-size/--max-size")


def make_tasks(args: argparse.Namespace) -> dict[str, list]:
    families = [check_family(f) for f in args.families]
    if len(set(families)) != len(families):
        raise DatasetError(f"--families lists a family twice: {' '.join(families)}")
    held_pairs = parse_pairs(args.held_out_pairs, families)
    inst = split_instances(families, args.held_out_fraction, args.seed)
    train_pool = {f: inst[f][0] for f in families}
    held_pool = {f: inst[f][1] for f in families}
    pairs = [p for p in itertools.permutations(families, 2)]
    seen_kinds = [(f,) for f in families] + [p for p in pairs if frozenset(p) not in held_pairs]
    unseen_kinds = [p for p in pairs if frozenset(p) in held_pairs]
    plan = [("train", "all", seen_kinds, train_pool, args.train_tasks),
            ("test", "instances", seen_kinds, held_pool, args.test_tasks)]
    if unseen_kinds:
        plan.append(("test", "compositions", unseen_kinds, train_pool, args.test_tasks))
    tasks = {}
    for split, set_name, kinds, pool, n in plan:
        tasks[f"{split}/{set_name}"] = [
            draw_task(_generator(args.seed, split, set_name, i), kinds, pool, args.demos + 1, args.min_size,
                      args.max_size)
            for i in track(range(n), desc=f"generate {split}/{set_name}", unit="task", leave=False)]
    return tasks


# ---------------------------------------------------------------------------------------------------
# Encodings


def _csr(sizes: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)


def _arrays(inputs, labels, pids, puzzle_sizes, seq_len) -> PuzzleSetArrays:
    return PuzzleSetArrays(inputs=pad_rows(inputs, seq_len), labels=pad_rows(labels, seq_len),
                           puzzle_identifiers=np.asarray(pids, dtype=np.int32), puzzle_indices=_csr(puzzle_sizes),
                           group_indices=np.arange(len(pids) + 1, dtype=np.int32))


def encode_context_splits(tasks: dict[str, list], side: int) -> tuple[dict, list[str]]:
    rows = {}
    for key, ts in tasks.items():
        inputs, labels, sizes = [], [], []
        for _, pairs in ts:
            if key.startswith("train"):
                examples = [(pairs[:j] + pairs[j + 1:], pairs[j]) for j in range(len(pairs))]
            else:
                examples = [(pairs[:-1], pairs[-1])]
            for demos, (q_in, q_out) in examples:
                i, l = encode_context(demos, q_in, q_out, side)
                inputs.append(i)
                labels.append(l)
            sizes.append(len(examples))
        rows[key] = (inputs, labels, [0] * len(ts), sizes)
    seq_len = -(-max(len(r) for v in rows.values() for r in v[0]) // 8) * 8
    return _finish(rows, seq_len, CONTEXT_VOCAB_SIZE, 1), [BLANK_IDENTIFIER]


def encode_puzzle_id_splits(tasks: dict[str, list], side: int, test_demos_in_train: bool) -> tuple[dict, list[str]]:
    names = [BLANK_IDENTIFIER]
    ids = {}
    for key, ts in tasks.items():
        for t in range(len(ts)):
            ids[(key, t)] = len(names)
            names.append(f"{key.replace('/', '-')}-{t:05d}")
    canvas = lambda g: encode_arc_canvas(g, 0, 0, side)  # noqa: E731
    rows = {}
    train_in, train_lab, train_pids, train_sizes = [], [], [], []
    for key, ts in tasks.items():
        is_train = key.startswith("train")
        test_in, test_lab, test_pids, test_sizes = [], [], [], []
        for t, (_, pairs) in enumerate(ts):
            in_train = pairs if is_train else (pairs[:-1] if test_demos_in_train else [])
            if in_train:
                train_in += [canvas(i) for i, _ in in_train]
                train_lab += [canvas(o) for _, o in in_train]
                train_pids.append(ids[(key, t)])
                train_sizes.append(len(in_train))
            if not is_train:
                test_in.append(canvas(pairs[-1][0]))
                test_lab.append(canvas(pairs[-1][1]))
                test_pids.append(ids[(key, t)])
                test_sizes.append(1)
        if not is_train:
            rows[key] = (test_in, test_lab, test_pids, test_sizes)
    rows = {"train/all": (train_in, train_lab, train_pids, train_sizes), **rows}
    return _finish(rows, side * side, ARC_COLOR_OFFSET + 10, len(names)), names


def _finish(rows: dict, seq_len: int, vocab: int, num_ids: int) -> dict:
    splits: dict[str, dict] = {}
    for key, (i, l, p, s) in rows.items():
        split, set_name = key.split("/")
        splits.setdefault(split, {})[set_name] = _arrays(i, l, p, s, seq_len)
    return {split: (split_metadata(sets, vocab_size=vocab, seq_len=seq_len, num_puzzle_identifiers=num_ids), sets)
            for split, sets in splits.items()}


def build(args: argparse.Namespace) -> dict:
    for key, lo in (("train_tasks", 1), ("test_tasks", 1), ("demos", 1), ("min_size", 1)):
        if getattr(args, key) < lo:
            raise DatasetError(f"--{key.replace('_', '-')} must be >= {lo}, got {getattr(args, key)}")
    if not args.min_size <= args.max_size <= 30:
        raise DatasetError(f"need --min-size <= --max-size <= 30, got {args.min_size} and {args.max_size}")
    if not 0 < args.held_out_fraction < 1:
        raise DatasetError(f"--held-out-fraction must be in (0, 1), got {args.held_out_fraction}")
    tasks = make_tasks(args)
    side = args.max_size
    if args.format == "context":
        splits, names = encode_context_splits(tasks, side)
    else:
        splits, names = encode_puzzle_id_splits(tasks, side, args.test_demos_in_train)
    listing = {key: [[[f, list(params)] for f, params in r] for r, _ in ts] for key, ts in tasks.items()}
    write_puzzle_dataset(args.output_dir, splits, names, extra_files={"tasks.json": listing})
    meta = splits["train"][0]
    return {"seq_len": meta.seq_len, "ids": meta.num_puzzle_identifiers,
            "examples": {f"{sp}/{st}": len(a.inputs) for sp, (_, sets) in splits.items() for st, a in sets.items()},
            "tasks": {k: len(v) for k, v in tasks.items()}}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataset.build_rules_dataset",
                                description="Generate ARC-like hidden-rule tasks (context or puzzle-id format).")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--format", choices=("context", "puzzle_id"), default="context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), help=f"rule families (default: {' '.join(FAMILIES)})")
    p.add_argument("--held-out-pairs", nargs="*", default=list(DEFAULT_HELD_OUT_PAIRS),
                   help="family pairs a+b whose compositions appear only in test/compositions "
                        f"(default: {' '.join(DEFAULT_HELD_OUT_PAIRS)})")
    p.add_argument("--held-out-fraction", type=float, default=0.25,
                   help="fraction of each family's instances held out for test/instances (default 0.25)")
    p.add_argument("--train-tasks", type=int, default=4000)
    p.add_argument("--test-tasks", type=int, default=200, help="tasks per test set (default 200)")
    p.add_argument("--demos", type=int, default=3, help="demonstration pairs per task (default 3)")
    p.add_argument("--min-size", type=int, default=3)
    p.add_argument("--max-size", type=int, default=10, help="largest grid side; also the answer canvas side")
    p.add_argument("--test-demos-in-train", action=argparse.BooleanOptionalAction, default=True,
                   help="puzzle_id format: the test tasks' demonstrations are train examples under their id "
                        "(the original ARC recipe; default on)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    t0 = time.perf_counter()
    with exit_on_dataset_error():
        s = build(args)
    ex = ", ".join(f"{k} {v}" for k, v in s["examples"].items())
    print(f"rules ({args.format}): tasks {s['tasks']}, examples {ex}, seq_len {s['seq_len']}, {s['ids']} puzzle ids, "
          f"written to {args.output_dir} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
