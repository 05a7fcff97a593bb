"""The puzzle-dataset format shared by every builder and by `puzzle_dataset.PuzzleDataset`.

On disk (identical to the original sapientinc/HRM builders, so their outputs load unchanged):

    <data_path>/identifiers.json                 list: puzzle id -> name, [0] = "<blank>"
    <data_path>/{train,test}/dataset.json        PuzzleDatasetMetadata
    <data_path>/{train,test}/<set>__inputs.npy              int  [N_examples, seq_len]
    <data_path>/{train,test}/<set>__labels.npy              int  [N_examples, seq_len]
    <data_path>/{train,test}/<set>__puzzle_identifiers.npy  int32 [N_puzzles]
    <data_path>/{train,test}/<set>__puzzle_indices.npy      int32 [N_puzzles + 1]  CSR: puzzle -> examples
    <data_path>/{train,test}/<set>__group_indices.npy       int32 [N_groups + 1]   CSR: group -> puzzles

example = one input/label pair; puzzle = examples sharing one puzzle id; group = an original puzzle plus
its augmentations (training draws one puzzle per group per epoch).

The original wrote inputs/labels as uint8 (ARC, Maze, plain Sudoku) or int64 (augmented Sudoku); our
builders always write uint8 (every vocab here is < 256) and the loader accepts any integer dtype.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

# Label value the loss ignores; models/losses.py defines the same constant for the model side.
IGNORE_LABEL_ID = -100

SPLITS = ("train", "test")
ARRAY_FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
BLANK_IDENTIFIER = "<blank>"


class DatasetError(ValueError):
    """Bad dataset input or on-disk data. The message is one user-facing line naming the file/row."""


def iter_puzzle_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Rows of a puzzle CSV in the layout of the original's sources (Sudoku-Extreme, Maze-30x30-hard): a header
    row, then `source,question,answer,rating`. Yields (line number, the 4 fields); blank lines are skipped."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            if next(reader, None) is None:
                raise DatasetError(f"{path}: empty file (expected a header row then source,question,answer,rating)")
            for row in reader:
                if not row:
                    continue
                if len(row) != 4:
                    raise DatasetError(f"{path}:{reader.line_num}: expected 4 columns (source,question,answer,rating), "
                                       f"got {len(row)}")
                yield reader.line_num, row
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}:{_first_undecodable_line(path)}: not UTF-8 text ({e.reason}); save the CSV "
                               f"as UTF-8") from None


def _first_undecodable_line(path: Path) -> int:
    """Decoding runs ahead of the csv reader in blocks, so find the offending line by re-reading the bytes."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


@contextlib.contextmanager
def exit_on_dataset_error():
    """The CLI boundary of every dataset command: a DatasetError becomes one `error: ...` line on stderr and
    exit status 2, never a traceback."""
    try:
        yield
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------
# Metadata (dataset.json)


@dataclass
class PuzzleDatasetMetadata:
    pad_id: int
    ignore_label_id: int | None
    blank_identifier_id: int
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    total_groups: int
    mean_puzzle_examples: float
    sets: list[str] = field(default_factory=lambda: ["all"])

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "dataset.json") -> "PuzzleDatasetMetadata":
        if not isinstance(d, Mapping):
            raise DatasetError(f"{where}: expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise DatasetError(f"{where}: missing key(s) {', '.join(missing)}")
        unknown = [k for k in d if k not in names]
        if unknown:
            raise DatasetError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; expected {', '.join(names)}")

        def _int(key, allow_none=False):
            v = d[key]
            if v is None and allow_none:
                return None
            if isinstance(v, bool) or not isinstance(v, int):
                raise DatasetError(f"{where}: '{key}' must be an integer, got {v!r}")
            return v

        mean = d["mean_puzzle_examples"]
        if isinstance(mean, bool) or not isinstance(mean, (int, float)):
            raise DatasetError(f"{where}: 'mean_puzzle_examples' must be a number, got {mean!r}")
        sets = d["sets"]
        if not isinstance(sets, list) or not sets or not all(isinstance(s, str) and s for s in sets):
            raise DatasetError(f"{where}: 'sets' must be a non-empty list of names, got {sets!r}")
        meta = cls(pad_id=_int("pad_id"), ignore_label_id=_int("ignore_label_id", True),
                   blank_identifier_id=_int("blank_identifier_id"), vocab_size=_int("vocab_size"),
                   seq_len=_int("seq_len"), num_puzzle_identifiers=_int("num_puzzle_identifiers"),
                   total_groups=_int("total_groups"), mean_puzzle_examples=float(mean), sets=list(sets))
        if meta.vocab_size < 1 or meta.seq_len < 1 or meta.num_puzzle_identifiers < 1:
            raise DatasetError(f"{where}: vocab_size, seq_len and num_puzzle_identifiers must be >= 1")
        if not 0 <= meta.pad_id < meta.vocab_size:
            raise DatasetError(f"{where}: pad_id {meta.pad_id} outside [0, vocab_size={meta.vocab_size})")
        if not 0 <= meta.blank_identifier_id < meta.num_puzzle_identifiers:
            raise DatasetError(f"{where}: blank_identifier_id {meta.blank_identifier_id} outside "
                               f"[0, num_puzzle_identifiers={meta.num_puzzle_identifiers})")
        return meta

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PuzzleDatasetMetadata":
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: file not found (expected the split's dataset.json)")
        try:
            with open(path, "r") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        # Same key order and default separators as the original's json.dump(model_dump()).
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Puzzle kinds (what a dataset's tokens mean; the inspector, the viewer and the PNG panels read them)

PUZZLE_KINDS = ("sudoku", "maze", "arc", "grid")


def sudoku_box(side: int) -> tuple[int, int]:
    """(box rows, box columns) of a side x side Sudoku: 4 -> 2x2, 6 -> 2x3, 9 -> 3x3 (the builder's BOXES)."""
    rows = max(d for d in range(1, int(side ** 0.5) + 1) if side % d == 0)
    return rows, side // rows


def puzzle_kind(vocab_size: int, seq_len: int, num_puzzle_identifiers: int | None = None,
                sample_label: np.ndarray | None = None) -> str:
    """sudoku | maze | arc | context | grid from a format's vocabulary and length (the builders' encodings).
    ARC is 30x30 canvases over 12 tokens (with more than the blank puzzle id, when the count is known); a
    Sudoku an n x n grid over n + 2 tokens (PAD, blank, digits); a maze a square grid over the maze
    builder's 6 tokens (PAD # ' ' S G o). The one overlap is 16 cells over 6 tokens: one label row tells a
    4x4 maze from a 4x4 Sudoku; without one it is taken as the Sudoku (generated mazes are larger)."""
    from dataset.context import CONTEXT_VOCAB_SIZE  # dataset.context imports this module
    if vocab_size == CONTEXT_VOCAB_SIZE:
        return "context"
    side = int(round(seq_len ** 0.5))
    square = side * side == seq_len
    if vocab_size == 12 and seq_len == ARC_GRID * ARC_GRID and (num_puzzle_identifiers is None
                                                                 or num_puzzle_identifiers > 1):
        return "arc"
    sudoku = square and vocab_size == side + 2
    maze = square and vocab_size == 6
    if sudoku and maze:
        if sample_label is None:
            return "sudoku"
        first_row = np.sort(np.asarray(sample_label).reshape(side, side)[0])
        return "sudoku" if np.array_equal(first_row, np.arange(2, side + 2)) else "maze"
    if maze:
        return "maze"
    return "sudoku" if sudoku else "grid"


def guess_kind(meta: PuzzleDatasetMetadata, sample_label: np.ndarray | None = None) -> str:
    """puzzle_kind() of a dataset split's metadata."""
    return puzzle_kind(meta.vocab_size, meta.seq_len, meta.num_puzzle_identifiers, sample_label)


# ---------------------------------------------------------------------------------------------------
# Dihedral group (the original's transform ids; tid 1 = np.rot90 k=1, i.e. counter-clockwise)

DIHEDRAL_INVERSE = [0, 3, 2, 1, 4, 5, 6, 7]


def dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    """One of the 8 symmetries of the square on the last two axes:
    0 identity, 1 rot90, 2 rot180, 3 rot270, 4 flip left-right, 5 flip up-down, 6 transpose,
    7 anti-transpose (reflection about the anti-diagonal)."""
    arr = np.asarray(arr)
    ax = (arr.ndim - 2, arr.ndim - 1)
    if tid == 0:
        return arr
    if tid in (1, 2, 3):
        return np.rot90(arr, k=tid, axes=ax)
    if tid == 4:
        return np.flip(arr, axis=ax[1])
    if tid == 5:
        return np.flip(arr, axis=ax[0])
    if tid == 6:
        return np.swapaxes(arr, *ax)
    if tid == 7:
        return np.swapaxes(np.flip(arr, axis=ax), *ax)
    raise ValueError(f"dihedral transform id must be 0..7, got {tid}")


def inverse_dihedral_transform(arr: np.ndarray, tid: int) -> np.ndarray:
    return dihedral_transform(arr, DIHEDRAL_INVERSE[tid])


# ---------------------------------------------------------------------------------------------------
# ARC identifiers and decoding (used by the ARC builder and the evaluator's voting)

ARC_GRID = 30  # canvas side of the original ARC encoding
ARC_PAD, ARC_EOS, ARC_COLOR_OFFSET = 0, 1, 2
_ARC_NAME_RE = re.compile(r"^(?P<task>.+)_t(?P<tid>[0-7])_(?P<cmap>\d{10})$")


def arc_identifier(task: str, tid: int, color_map: np.ndarray) -> str:
    """Name of an augmented ARC variant; the identity variant keeps the bare task name (as the original)."""
    color_map = np.asarray(color_map)
    if tid == 0 and np.array_equal(color_map, np.arange(10)):
        return task
    return f"{task}_t{tid}_{''.join(str(int(c)) for c in color_map)}"


def parse_arc_identifier(name: str) -> tuple[str, int, np.ndarray]:
    """`"<task>_t<tid>_<10-digit colour map>"` or a bare task name -> (task, tid, color_map[10]).
    color_map[c] is the colour that original colour c was mapped to (applied before the transform)."""
    m = _ARC_NAME_RE.match(name)
    if m is None:
        return name, 0, np.arange(10)
    cmap = np.array([int(ch) for ch in m["cmap"]])
    if sorted(cmap.tolist()) != list(range(10)):
        raise DatasetError(f"ARC identifier {name!r}: colour map {m['cmap']} is not a permutation of 0..9")
    return m["task"], int(m["tid"]), cmap


def invert_arc_augmentation(grid: np.ndarray, name: str) -> np.ndarray:
    """Undo a variant's augmentation on a colour grid (values 0..9): inverse transform, then inverse colours."""
    _, tid, cmap = parse_arc_identifier(name)
    return np.argsort(cmap)[inverse_dihedral_transform(np.asarray(grid), tid)]


def encode_arc_canvas(grid: np.ndarray, pad_r: int = 0, pad_c: int = 0, side: int = ARC_GRID) -> np.ndarray:
    """A colour grid -> side*side tokens on a side x side canvas at offset (pad_r, pad_c): colour c -> c + 2,
    EOS on the row under the grid and the column right of it (not the corner), PAD elsewhere. side=30 is
    the original ARC encoding."""
    nr, nc = grid.shape
    canvas = np.zeros((side, side), dtype=np.uint8)
    canvas[pad_r:pad_r + nr, pad_c:pad_c + nc] = grid + ARC_COLOR_OFFSET
    if pad_r + nr < side:
        canvas[pad_r + nr, pad_c:pad_c + nc] = ARC_EOS
    if pad_c + nc < side:
        canvas[pad_r:pad_r + nr, pad_c + nc] = ARC_EOS
    return canvas.reshape(-1)


def arc_grid_extent(tokens: np.ndarray, side: int = ARC_GRID) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the scored grid of each side*side-token ARC canvas in `tokens` [..., side*side], by
    the original evaluator's rule: the largest-area top-left rectangle whose every cell is a colour token,
    where each row's run of colours is measured from the left and may only shrink going down. (0, 0) if none."""
    g = np.asarray(tokens).reshape(*np.shape(tokens)[:-1], side, side)
    is_color = (g >= ARC_COLOR_OFFSET) & (g < ARC_COLOR_OFFSET + 10)
    run = np.where(is_color.all(axis=-1), side, np.argmin(is_color, axis=-1))
    width = np.minimum.accumulate(run, axis=-1)
    area = width * np.arange(1, side + 1)
    best = np.argmax(area, axis=-1)  # first maximum, as a strict '>' scan would keep
    best_area = np.take_along_axis(area, best[..., None], axis=-1)[..., 0]
    cols = np.take_along_axis(width, best[..., None], axis=-1)[..., 0]
    return np.where(best_area > 0, best + 1, 0), np.where(best_area > 0, cols, 0)


def arc_grid_from_tokens(tokens: np.ndarray, side: int = ARC_GRID) -> np.ndarray:
    """Crop a side*side-token ARC canvas (900 tokens by default) to its colour grid (values 0..9) by
    `arc_grid_extent`'s rule; shape (0, 0) if none."""
    rows, cols = (int(x) for x in arc_grid_extent(np.asarray(tokens).reshape(-1), side))
    g = np.asarray(tokens).reshape(side, side)
    return g[:rows, :cols].astype(np.int64) - ARC_COLOR_OFFSET


# ---------------------------------------------------------------------------------------------------
# Writer


@dataclass
class PuzzleSetArrays:
    """One set of one split, in memory, before writing."""
    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray
    puzzle_indices: np.ndarray
    group_indices: np.ndarray
    # Optional per-example arrays written beside the standard ones as <set>__<key>.npy (the loader ignores
    # them), e.g. the context format's example names.
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ARRAY_FIELDS}


def split_metadata(sets: Mapping[str, PuzzleSetArrays], *, vocab_size: int, seq_len: int,
                   num_puzzle_identifiers: int, mean_puzzle_examples: float | None = None,
                   pad_id: int = 0, ignore_label_id: int | None = 0, blank_identifier_id: int = 0
                   ) -> PuzzleDatasetMetadata:
    total_groups = sum(len(a.group_indices) - 1 for a in sets.values())
    if mean_puzzle_examples is None:
        n_ex = sum(len(a.inputs) for a in sets.values())
        n_pz = sum(len(a.puzzle_identifiers) for a in sets.values())
        mean_puzzle_examples = n_ex / n_pz if n_pz else 0.0
    return PuzzleDatasetMetadata(pad_id=pad_id, ignore_label_id=ignore_label_id,
                                 blank_identifier_id=blank_identifier_id, vocab_size=vocab_size,
                                 seq_len=seq_len, num_puzzle_identifiers=num_puzzle_identifiers,
                                 total_groups=total_groups, mean_puzzle_examples=float(mean_puzzle_examples),
                                 sets=list(sets))


def write_puzzle_dataset(output_dir: str | os.PathLike,
                         splits: Mapping[str, tuple[PuzzleDatasetMetadata, Mapping[str, PuzzleSetArrays]]],
                         identifiers: Sequence[str], extra_files: Mapping[str, object] | None = None) -> Path:
    """Write a whole dataset atomically: everything goes into a temporary sibling directory that is
    validated and then renamed onto `output_dir` (replacing an older build), so a crash or a bad
    array never leaves a half-written dataset behind. `extra_files`: name -> JSON-able object written
    at the top level (e.g. a generator's task listing)."""
    out = Path(output_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split, (meta, sets) in splits.items():
            sdir = tmp / split
            sdir.mkdir()
            meta.save(sdir / "dataset.json")
            for set_name, arrays in sets.items():
                for key, arr in arrays.extra.items():
                    if len(arr) != len(arrays.inputs):
                        raise DatasetError(f"{split}/{set_name}__{key}: {len(arr)} rows but {len(arrays.inputs)} "
                                           f"examples")
                for key, arr in {**arrays.as_dict(), **arrays.extra}.items():
                    np.save(sdir / f"{set_name}__{key}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        with open(tmp / "identifiers.json", "w") as f:
            json.dump(list(identifiers), f)
        for name, obj in (extra_files or {}).items():
            with open(tmp / name, "w") as f:
                json.dump(obj, f)
        validate_puzzle_dataset(tmp, splits=tuple(splits))
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------------
# Validation


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e) or "Python objects" in str(e):
            raise DatasetError(f"{path}: holds Python objects; expected a plain integer array") from None
        raise DatasetError(f"{path}: unreadable .npy ({e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: unreadable .npy ({e})") from None
    if arr.dtype.kind not in "iu":
        raise DatasetError(f"{path}: dtype {arr.dtype}; expected an integer array")
    return arr


def _check_csr(path: Path, offsets: np.ndarray, n_items: int, what: str) -> None:
    if offsets.ndim != 1 or len(offsets) < 1:
        raise DatasetError(f"{path}: expected a 1-D offsets array, got shape {offsets.shape}")
    if offsets[0] != 0:
        raise DatasetError(f"{path}: first offset is {offsets[0]}; expected 0")
    if offsets[-1] != n_items:
        raise DatasetError(f"{path}: last offset is {offsets[-1]} but there are {n_items} {what}")
    steps = np.diff(offsets.astype(np.int64))
    if len(steps) and steps.min() <= 0:
        bad = int(np.argmax(steps <= 0))
        raise DatasetError(f"{path}: offsets must strictly increase; entry {bad + 1} ({offsets[bad + 1]}) "
                           f"<= entry {bad} ({offsets[bad]})")


def _check_range(path: Path, arr: np.ndarray, lo: int, hi: int, what: str, also: int | None = None,
                 chunk: int = 1 << 16) -> None:
    for s in range(0, len(arr), chunk):
        block = np.asarray(arr[s:s + chunk])
        if block.size == 0:
            continue
        if also is not None:
            block = np.where(block == also, lo, block)
        mn, mx = block.min(), block.max()
        if mn < lo or mx >= hi:
            bad = np.argwhere((block < lo) | (block >= hi))[0]
            row = s + int(bad[0])
            val = block[tuple(bad)]
            raise DatasetError(f"{path}: row {row} holds {what} {val}; expected {lo} <= value < {hi}")


def validate_puzzle_dataset(data_path: str | os.PathLike, splits: Sequence[str] = SPLITS) -> None:
    """Check a dataset directory end to end (files, dtypes, shapes, CSR offsets, id ranges) and raise
    DatasetError with a one-line message at the first problem. Reads the arrays once, in chunks."""
    root = Path(data_path)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset directory not found")
    num_ids = None
    for split in splits:
        sdir = root / split
        if not sdir.is_dir():
            raise DatasetError(f"{sdir}: split directory not found (expected {', '.join(splits)})")
        meta = PuzzleDatasetMetadata.load(sdir / "dataset.json")
        num_ids = meta.num_puzzle_identifiers
        groups = 0
        for set_name in meta.sets:
            a = {k: _load_npy(sdir / f"{set_name}__{k}.npy") for k in ARRAY_FIELDS}
            p = lambda k: sdir / f"{set_name}__{k}.npy"  # noqa: E731
            for k in ("inputs", "labels"):
                if a[k].ndim != 2 or a[k].shape[1] != meta.seq_len:
                    raise DatasetError(f"{p(k)}: shape {a[k].shape}; expected [N, seq_len={meta.seq_len}]")
            if a["labels"].shape[0] != a["inputs"].shape[0]:
                raise DatasetError(f"{p('labels')}: {a['labels'].shape[0]} rows but inputs has "
                                   f"{a['inputs'].shape[0]}")
            if a["puzzle_identifiers"].ndim != 1:
                raise DatasetError(f"{p('puzzle_identifiers')}: expected 1-D, got shape {a['puzzle_identifiers'].shape}")
            n_ex, n_pz = a["inputs"].shape[0], a["puzzle_identifiers"].shape[0]
            pi, gi = np.asarray(a["puzzle_indices"]), np.asarray(a["group_indices"])
            if len(pi) != n_pz + 1:
                raise DatasetError(f"{p('puzzle_indices')}: length {len(pi)}; expected number of puzzles + 1 = {n_pz + 1}")
            _check_csr(p("puzzle_indices"), pi, n_ex, "examples")
            _check_csr(p("group_indices"), gi, n_pz, "puzzles")
            groups += len(gi) - 1
            _check_range(p("inputs"), a["inputs"], 0, meta.vocab_size, "token id")
            # Labels may also hold the ignore value, even one outside the vocabulary.
            _check_range(p("labels"), a["labels"], 0, meta.vocab_size, "label id", also=meta.ignore_label_id)
            _check_range(p("puzzle_identifiers"), a["puzzle_identifiers"], 0, meta.num_puzzle_identifiers,
                         "puzzle identifier")
        if groups != meta.total_groups:
            raise DatasetError(f"{sdir / 'dataset.json'}: total_groups is {meta.total_groups} but the group "
                               f"offsets hold {groups} groups")
    ident = root / "identifiers.json"
    if ident.exists():
        try:
            with open(ident) as f:
                names = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{ident}: not valid JSON ({e})") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{ident}: expected a JSON list of names")
        if num_ids is not None and len(names) < num_ids:
            raise DatasetError(f"{ident}: {len(names)} names but num_puzzle_identifiers is {num_ids}")
