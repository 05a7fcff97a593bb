"""Build an ARC puzzle dataset in the original HRM encoding, reproducibly.

Input: one or more --dataset-dirs. Each directory's own *.json files form a subset named after the
directory, and each immediate sub-directory with *.json files forms a subset named after it (so both
`ARC-AGI/data` (training/, evaluation/) and `arc-agi-1/training` work). Files are sorted by path.

Split rule (the original's): a task's `train` pairs go to the train split; its `test` pairs go to the
test split if its subset is named in --eval-subsets (default: evaluation), otherwise to train as well.

Encoding: each grid in a 30x30 canvas, PAD 0, EOS 1, colour c -> c + 2 (vocab 12, seq_len 900); EOS
marks the row under the grid and the column right of it (not the corner). Input and output of an
example share one offset; on the train split the offset is random per example (one example per
puzzle stays at (0, 0)); the test split always uses (0, 0).

Augmentation: per task up to 5 * --num-aug trials of (dihedral id 0..7, colour permutation fixing 0);
variants identical to an earlier one (SHA-256 over the sorted example hashes) are dropped; stop at
1 + num_aug variants. Each task draws from its own generator, seeded by (seed, SHA-256 of its name), so
a task's variants do not change when other tasks are added or removed.

Names: the unaugmented variant keeps the task name; others are `<task>_t<tid>_<colour map digits>`
(dataset.common.parse_arc_identifier / invert_arc_augmentation undo them). Ids start at 1 in order
train split, group (task, sorted), variant; a test puzzle shares the id of its train variant.

--mode context (dataset/context.py): each example holds the task's demonstrations and a query, puzzle ids
are all blank, evaluation-subset tasks are in the test split only and training tasks give leave-one-out
examples (see build_context).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from utils.progress import track

from dataset.common import (ARC_COLOR_OFFSET, ARC_EOS, ARC_GRID, BLANK_IDENTIFIER, DatasetError,
                            PuzzleSetArrays, arc_identifier, dihedral_transform, encode_arc_canvas, exit_on_dataset_error,
                            split_metadata, write_puzzle_dataset)
from dataset.context import (CONTEXT_VOCAB_SIZE, EXAMPLE_NAMES, demos_that_fit, encode_context, pad_rows)

VOCAB_SIZE = ARC_COLOR_OFFSET + 10  # PAD, EOS, 10 colours
SEQ_LEN = ARC_GRID * ARC_GRID


@dataclass
class ArcTask:
    name: str
    subset: str
    path: Path
    train: list[tuple[np.ndarray, np.ndarray]]
    test: list[tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------------------
# Loading and validation


def _grid(value, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise DatasetError(f"{where}: expected a non-empty list of rows")
    width = len(value[0])
    if width == 0 or any(len(r) != width for r in value):
        raise DatasetError(f"{where}: rows must be non-empty and of equal length")
    if len(value) > ARC_GRID or width > ARC_GRID:
        raise DatasetError(f"{where}: grid is {len(value)}x{width}; expected at most {ARC_GRID}x{ARC_GRID}")
    for r, row in enumerate(value):
        for c, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 9:
                raise DatasetError(f"{where}: cell ({r},{c}) is {v!r}; expected a colour 0..9")
    return np.asarray(value, dtype=np.uint8)


def load_task(path: Path, subset: str) -> ArcTask:
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'train' and 'test'")
    pairs = {}
    for key in ("train", "test"):
        if key not in d:
            raise DatasetError(f"{path}: task has no '{key}' list")
        if not isinstance(d[key], list) or not d[key]:
            what = " (the task's demonstrations)" if key == "train" else ""
            raise DatasetError(f"{path}: '{key}' must be a non-empty list of input/output pairs{what}")
        pairs[key] = []
        for i, ex in enumerate(d[key]):
            if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
                raise DatasetError(f"{path}: {key}[{i}] must have 'input' and 'output'")
            pairs[key].append((_grid(ex["input"], f"{path}: {key}[{i}].input"),
                               _grid(ex["output"], f"{path}: {key}[{i}].output")))
    name = d.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{path}: 'name' must be a non-empty string")
    return ArcTask(name=name, subset=subset, path=path, train=pairs["train"], test=pairs["test"])


def find_task_files(dataset_dirs: list[str]) -> list[tuple[str, Path]]:
    """(subset, file) for every task file, sorted, so ids never depend on directory listing order."""
    found = []
    for d in dataset_dirs:
        root = Path(d)
        if not root.is_dir():
            raise DatasetError(f"{root}: dataset directory not found")
        own = sorted(root.glob("*.json"))
        found += [(root.name, p) for p in own]
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            found += [(sub.name, p) for p in sorted(sub.glob("*.json"))]
    if not found:
        raise DatasetError(f"no *.json task files in {', '.join(dataset_dirs)}")
    return found


# ---------------------------------------------------------------------------------------------------
# Encoding and augmentation


def encode_grid(grid: np.ndarray, pad_r: int, pad_c: int) -> np.ndarray:
    """A colour grid -> 900 tokens on the 30x30 canvas at offset (pad_r, pad_c)."""
    return encode_arc_canvas(grid, pad_r, pad_c)


def _example_hash(inp: np.ndarray, out: np.ndarray) -> bytes:
    h = hashlib.sha256()
    for g in (inp, out):
        h.update(np.asarray(g.shape, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(g, dtype=np.uint8).tobytes())
    return h.digest()


def variant_hash(dests: dict[str, list]) -> bytes:
    return hashlib.sha256(b"".join(sorted(_example_hash(i, o) for exs in dests.values() for i, o in exs))).digest()


def task_generator(seed: int, name: str) -> np.random.Generator:
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


def augment_task(dests: dict[str, list], num_aug: int, rng: np.random.Generator, name: str
                 ) -> list[tuple[str, dict[str, list]]]:
    """-> [(variant name, {dest: [(inp, out), ...]})], the unaugmented task first."""
    variants = [(name, dests)]
    seen = {variant_hash(dests)}
    for _ in range(5 * num_aug):
        if len(variants) >= 1 + num_aug:
            break
        tid = int(rng.integers(0, 8))
        cmap = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)
        aug = {k: [(np.ascontiguousarray(dihedral_transform(cmap[i], tid)),
                    np.ascontiguousarray(dihedral_transform(cmap[o], tid))) for i, o in exs]
               for k, exs in dests.items()}
        h = variant_hash(aug)
        if h in seen:
            continue
        seen.add(h)
        variants.append((arc_identifier(name, tid, cmap), aug))
    return variants


class _SplitBuffer:
    def __init__(self):
        self.inputs, self.labels, self.pids, self.names = [], [], [], []
        self.puzzle_indices, self.group_indices = [0], [0]

    def add_puzzle(self, pid: int, examples: list[np.ndarray], name_id: int = 0) -> None:
        for inp, lab in examples:
            self.inputs.append(inp)
            self.labels.append(lab)
        self.names += [name_id] * len(examples)
        self.pids.append(pid)
        self.puzzle_indices.append(len(self.inputs))

    def end_group(self) -> None:
        if len(self.pids) > self.group_indices[-1]:
            self.group_indices.append(len(self.pids))

    def arrays(self, seq_len: int = SEQ_LEN, with_names: bool = False) -> PuzzleSetArrays:
        fixed = all(len(r) == seq_len for r in self.inputs)
        rows = (lambda rs: np.stack(rs)) if fixed and self.inputs else (lambda rs: pad_rows(rs, seq_len))
        extra = {EXAMPLE_NAMES: np.asarray(self.names, dtype=np.int32)} if with_names else {}
        return PuzzleSetArrays(inputs=rows(self.inputs), labels=rows(self.labels),
                               puzzle_identifiers=np.asarray(self.pids, dtype=np.int32),
                               puzzle_indices=np.asarray(self.puzzle_indices, dtype=np.int32),
                               group_indices=np.asarray(self.group_indices, dtype=np.int32), extra=extra)


def load_tasks(dataset_dirs: list[str]) -> list[ArcTask]:
    tasks, names = [], {}
    for subset, path in track(find_task_files(dataset_dirs), desc="load tasks", unit="task", leave=False):
        t = load_task(path, subset)
        if t.name in names:
            raise DatasetError(f"{path}: task name {t.name!r} already used by {names[t.name]}")
        names[t.name] = path
        tasks.append(t)
    return tasks


def build(args: argparse.Namespace) -> dict:
    tasks = load_tasks(args.dataset_dirs)
    if args.mode == "context":
        return build_context(args, tasks)
    eval_subsets = set(args.eval_subsets)
    ids: dict[str, int] = {}
    short = 0  # tasks too symmetric / too few colours to reach 1 + num_aug distinct variants
    split_buf = {"train": _SplitBuffer(), "test": _SplitBuffer()}
    for task in track(tasks, desc="augment", unit="task", leave=False):
        rng = task_generator(args.seed, task.name)
        dests = {"train": list(task.train), "test": []}
        dests["test" if task.subset in eval_subsets else "train"] += task.test
        variants = augment_task(dests, args.num_aug, rng, task.name)
        short += len(variants) < 1 + args.num_aug
        for vname, _ in variants:
            ids.setdefault(vname, len(ids) + 1)
        for split in ("train", "test"):
            buf = split_buf[split]
            for vname, vd in variants:
                exs = vd[split]
                if not exs:
                    continue
                if split == "train":
                    keep_origin = int(rng.integers(0, len(exs)))
                    encoded = []
                    for j, (i, o) in enumerate(exs):
                        pr = pc = 0
                        if j != keep_origin:
                            pr = int(rng.integers(0, ARC_GRID - max(i.shape[0], o.shape[0]) + 1))
                            pc = int(rng.integers(0, ARC_GRID - max(i.shape[1], o.shape[1]) + 1))
                        encoded.append((encode_grid(i, pr, pc), encode_grid(o, pr, pc)))
                else:
                    encoded = [(encode_grid(i, 0, 0), encode_grid(o, 0, 0)) for i, o in exs]
                buf.add_puzzle(ids[vname], encoded)
            buf.end_group()
    identifiers = [BLANK_IDENTIFIER] + [None] * len(ids)
    for n, i in ids.items():
        identifiers[i] = n
    splits = {}
    for split, buf in split_buf.items():
        sets = {"all": buf.arrays()}
        splits[split] = (split_metadata(sets, vocab_size=VOCAB_SIZE, seq_len=SEQ_LEN,
                                        num_puzzle_identifiers=len(identifiers)), sets)
    write_puzzle_dataset(args.output_dir, splits, identifiers)
    return {"mode": "canvas", "tasks": len(tasks), "ids": len(identifiers),
            "train_examples": len(split_buf["train"].inputs), "test_examples": len(split_buf["test"].inputs),
            "test_groups": len(split_buf["test"].group_indices) - 1, "short": short}


def build_context(args: argparse.Namespace, tasks: list[ArcTask]) -> dict:
    """The context format (dataset/context.py). A task of an --eval-subsets subset goes to the test split only
    (its `train` pairs as demonstrations, each `test` pair as one query); every other task goes to the train
    split only, one example per pair: that pair as the query, all its other pairs (train and test) as the
    demonstrations (leave-one-out). So no evaluation task, nor any augmentation of one, is in the train split.
    Augmentations as in the canvas mode, one (dihedral, colour map) per variant applied to every grid of it."""
    eval_subsets, side = set(args.eval_subsets), args.answer_side
    names = [BLANK_IDENTIFIER]
    split_buf = {"train": _SplitBuffer(), "test": _SplitBuffer()}
    dropped = dropped_rows = 0
    for task in track(tasks, desc="augment + serialise", unit="task", leave=False):
        rng = task_generator(args.seed, task.name)
        is_eval = task.subset in eval_subsets
        dests = {"demos": list(task.train), "queries": list(task.test)} if is_eval else {
            "pairs": list(task.train) + list(task.test)}
        buf = split_buf["test" if is_eval else "train"]
        for vname, vd in augment_task(dests, args.num_aug, rng, task.name):
            if is_eval:
                examples = [(vd["demos"], q) for q in vd["queries"]]
            else:
                ps = vd["pairs"]
                examples = [(ps[:j] + ps[j + 1:], ps[j]) for j in range(len(ps))]
            rows = []
            for demos, (q_in, q_out) in examples:
                if q_out.shape[0] > side or q_out.shape[1] > side:
                    raise DatasetError(f"{task.path}: answer grid {q_out.shape[0]}x{q_out.shape[1]} is larger than "
                                       f"the answer canvas --answer-side {side}")
                kept = demos_that_fit(demos, q_in, side, args.max_context, str(task.path))
                dropped += len(demos) - kept
                dropped_rows += kept < len(demos)
                rows.append(encode_context(demos[:kept], q_in, q_out, side))
            buf.add_puzzle(0, rows, name_id=len(names))
            names.append(vname)
        buf.end_group()
    longest = max(len(r) for b in split_buf.values() for r in b.inputs)
    seq_len = min(-(-longest // 8) * 8, args.max_context)  # a multiple of 8 where the cap allows
    splits = {}
    for split, buf in split_buf.items():
        sets = {"all": buf.arrays(seq_len, with_names=True)}
        splits[split] = (split_metadata(sets, vocab_size=CONTEXT_VOCAB_SIZE, seq_len=seq_len,
                                        num_puzzle_identifiers=1), sets)
    write_puzzle_dataset(args.output_dir, splits, names)
    return {"mode": "context", "tasks": len(tasks), "ids": 1, "seq_len": seq_len,
            "train_examples": len(split_buf["train"].inputs), "test_examples": len(split_buf["test"].inputs),
            "test_groups": len(split_buf["test"].group_indices) - 1, "dropped": dropped,
            "dropped_rows": dropped_rows}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataset.build_arc_dataset",
                                description="Build an ARC puzzle dataset (HRM on-disk format), seeded and sorted.")
    p.add_argument("--dataset-dirs", nargs="+", required=True, help="directories of ARC task JSON files")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-aug", type=int, default=1000, help="augmented variants per task (default 1000)")
    p.add_argument("--eval-subsets", nargs="+", default=["evaluation"],
                   help="subsets whose test pairs form the test split (default: evaluation)")
    p.add_argument("--mode", choices=("canvas", "context"), default="canvas",
                   help="canvas: the original encoding, one pair per 30x30 canvas, a puzzle id per variant; "
                        "context: demonstrations in the input, no ids (dataset/context.py)")
    p.add_argument("--max-context", type=int, default=8192,
                   help="context mode: longest row in tokens; demonstrations beyond it are dropped (default 8192)")
    p.add_argument("--answer-side", type=int, default=ARC_GRID,
                   help="context mode: side of the answer canvas (default 30, the largest ARC grid)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    t0 = time.perf_counter()
    with exit_on_dataset_error():
        if args.num_aug < 0:
            raise DatasetError("--num-aug must be >= 0")
        if args.max_context < 1 or not 1 <= args.answer_side <= ARC_GRID:
            raise DatasetError(f"--max-context must be >= 1 and --answer-side in 1..{ARC_GRID}")
        s = build(args)
    note = "" if s["test_examples"] else f" (test split empty: no subset named {' / '.join(args.eval_subsets)})"
    if s["mode"] == "context":
        print(f"arc (context): {s['tasks']} tasks, no puzzle ids, {s['train_examples']} train examples, "
              f"{s['test_examples']} test examples in {s['test_groups']} groups{note}, seq_len {s['seq_len']}, "
              f"{s['dropped']} demonstrations dropped by --max-context {args.max_context} (in {s['dropped_rows']} "
              f"rows), written to {args.output_dir} in {time.perf_counter() - t0:.1f} s")
        return
    print(f"arc: {s['tasks']} tasks, {s['ids']} puzzle ids, {s['train_examples']} train examples, "
          f"{s['test_examples']} test examples in {s['test_groups']} groups{note}, {s['short']} tasks with fewer "
          f"than {1 + args.num_aug} distinct variants, written to "
          f"{args.output_dir} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
