"""The context format: a task's demonstrations in the input instead of a memorised puzzle embedding.

One example = one query of one task as one flat token row, in the on-disk layout of `dataset/common.py`
(so the loader, sampler, resume and DDP need no second code path):

    IN g(demo_1 in) OUT g(demo_1 out) ... IN g(demo_k in) OUT g(demo_k out) IN g(query) OUT answer PAD...

g(grid) writes a grid at its real size: each row's colours (colour c -> c + 2), ROW after every row but the
last and END after the last (h * (w + 1) tokens). The answer region is a side x side canvas of ANS tokens
laid out the same way (ANS cells, ROW/END after each row: side * (side + 1) tokens). Its labels are the
answer on that canvas in the original ARC encoding (colours, EOS on the row below and the column right of
the grid, PAD elsewhere), so `arc_grid_from_tokens(.., side)` crops predictions exactly as the original
evaluator crops a 30x30 canvas. Every other label is PAD, which is the metadata's ignore_label_id (0, as
in the original ARC encoding): the loader turns it into -100, so the loss sees the answer region only.
puzzle_identifiers are all blank (0). Where the ARC builder needs names (inverse augmentation for voting)
it writes them per example in `<set>__example_names.npy` (int32 index into identifiers.json), which the
model never sees.

A row's length depends on its grids; the split is padded to the longest row of the dataset (seq_len).
`max_context` caps a row: demonstrations are dropped from the end until it fits, never the query.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from dataset.common import (ARC_COLOR_OFFSET, DatasetError, arc_grid_from_tokens, encode_arc_canvas)

# Token ids. 0..11 are those of the original ARC encoding (PAD, EOS, 10 colours).
PAD, EOS = 0, 1
ROW, END, IN, OUT, ANS = 12, 13, 14, 15, 16
CONTEXT_VOCAB_SIZE = 17
EXAMPLE_NAMES = "example_names"  # per-example array key (<set>__example_names.npy)

Grid = np.ndarray
Pair = tuple[np.ndarray, np.ndarray]


def serialized_len(shape: Sequence[int]) -> int:
    h, w = shape
    return h * (w + 1)


def _layout(cells: np.ndarray) -> np.ndarray:
    """[h, w] tokens -> h * (w + 1) tokens: ROW after each row, END after the last."""
    h = cells.shape[0]
    sep = np.full((h, 1), ROW, dtype=np.uint8)
    sep[-1, 0] = END
    return np.concatenate([cells.astype(np.uint8), sep], axis=1).reshape(-1)


def serialize_grid(grid: Grid) -> np.ndarray:
    return _layout(np.asarray(grid, dtype=np.uint8) + ARC_COLOR_OFFSET)


def answer_region(side: int) -> tuple[np.ndarray, np.ndarray]:
    """(input tokens, mask of the canvas cells) of an empty side x side answer canvas."""
    tokens = _layout(np.full((side, side), ANS, dtype=np.uint8))
    return tokens, tokens == ANS


def answer_labels(answer: Grid, side: int) -> np.ndarray:
    """The answer on the side x side canvas (original ARC encoding), PAD at the ROW/END positions."""
    canvas = encode_arc_canvas(np.asarray(answer, dtype=np.uint8), 0, 0, side).reshape(side, side)
    return np.concatenate([canvas, np.zeros((side, 1), np.uint8)], axis=1).reshape(-1)


def pair_len(pair: Pair) -> int:
    return 2 + serialized_len(pair[0].shape) + serialized_len(pair[1].shape)


def query_len(query: Grid, side: int) -> int:
    return 2 + serialized_len(query.shape) + side * (side + 1)


def demos_that_fit(demos: Sequence[Pair], query: Grid, side: int, max_context: int, where: str) -> int:
    """How many demonstrations (from the front) fit under max_context with the query and answer region.
    Raises DatasetError if there are none, or not even one fits."""
    if not demos:
        raise DatasetError(f"{where}: no demonstrations; the context format needs at least one input/output pair "
                           f"besides the query")
    total = query_len(query, side)
    kept = 0
    for d in demos:
        total += pair_len(d)
        if total > max_context:
            break
        kept += 1
    if kept == 0:
        need = query_len(query, side) + pair_len(demos[0])
        raise DatasetError(f"{where}: context does not fit even with one demonstration: {need} tokens "
                           f"(query {query.shape[0]}x{query.shape[1]}, answer canvas {side}x{side}, demonstration "
                           f"{demos[0][0].shape[0]}x{demos[0][0].shape[1]} -> {demos[0][1].shape[0]}x"
                           f"{demos[0][1].shape[1]}) > max_context {max_context}")
    return kept


def encode_context(demos: Sequence[Pair], query: Grid, answer: Grid, side: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (inputs, labels), both uint8 of the row's true length (unpadded)."""
    if answer.shape[0] > side or answer.shape[1] > side:
        raise DatasetError(f"answer grid {answer.shape[0]}x{answer.shape[1]} is larger than the answer canvas "
                           f"{side}x{side}")
    parts_in, parts_lab = [], []
    for inp, out in demos:
        for marker, g in ((IN, inp), (OUT, out)):
            s = serialize_grid(g)
            parts_in += [np.array([marker], np.uint8), s]
            parts_lab.append(np.zeros(1 + len(s), np.uint8))
    q = serialize_grid(query)
    region, _ = answer_region(side)
    parts_in += [np.array([IN], np.uint8), q, np.array([OUT], np.uint8), region]
    parts_lab += [np.zeros(2 + len(q), np.uint8), answer_labels(answer, side)]
    return np.concatenate(parts_in), np.concatenate(parts_lab)


def pad_rows(rows: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
    """Rows of varying length -> [N, seq_len] uint8, PAD-filled."""
    out = np.zeros((len(rows), seq_len), dtype=np.uint8)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


# ---------------------------------------------------------------------------------------------------
# Decoding (tests, voting, inspection)


def _parse_grid(tokens: np.ndarray) -> Grid:
    """Serialised grid tokens (ending in END) -> colour grid."""
    stops = np.flatnonzero((tokens == ROW) | (tokens == END))
    if len(stops) == 0 or tokens[stops[-1]] != END or stops[-1] != len(tokens) - 1:
        raise ValueError("a serialised grid must end in END")
    w = stops[0]
    if w == 0 or not np.array_equal(stops, np.arange(w, len(tokens), w + 1)):
        raise ValueError("rows of a serialised grid differ in width")
    cells = tokens.reshape(-1, w + 1)[:, :w].astype(np.int64) - ARC_COLOR_OFFSET
    if cells.min() < 0 or cells.max() > 9:
        raise ValueError("a serialised grid holds a non-colour token")
    return cells


def answer_side(inputs: np.ndarray) -> int:
    n = int((np.asarray(inputs) == ANS).sum())
    side = math.isqrt(n)
    if side * side != n or side == 0:
        raise ValueError(f"{n} answer cells do not form a square canvas")
    return side


def answer_grid(inputs: np.ndarray, tokens: np.ndarray) -> Grid:
    """Crop the answer canvas (labels or predicted tokens at the row's ANS positions) to its grid."""
    inputs = np.asarray(inputs)
    return arc_grid_from_tokens(np.asarray(tokens)[inputs == ANS], answer_side(inputs))


def decode_context(inputs: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """A row -> {"demos": [(in, out), ...], "query": grid, "answer": grid or None (without labels)}."""
    inputs = np.asarray(inputs)
    markers = np.flatnonzero((inputs == IN) | (inputs == OUT))
    kinds = inputs[markers]
    if len(markers) < 2 or len(markers) % 2 or not (np.all(kinds[0::2] == IN) and np.all(kinds[1::2] == OUT)):
        raise ValueError("a context row must alternate IN ... OUT ... markers")
    grids = []
    for i, m in enumerate(markers[:-1]):
        end = np.flatnonzero(inputs[m + 1:markers[i + 1]] == END)
        if len(end) != 1:
            raise ValueError(f"segment at {m} holds {len(end)} END tokens; expected 1")
        grids.append(_parse_grid(inputs[m + 1:m + 2 + end[0]]))
    demos = [(grids[i], grids[i + 1]) for i in range(0, len(grids) - 1, 2)]
    return {"demos": demos, "query": grids[-1], "answer": None if labels is None else answer_grid(inputs, labels)}


def query_grid(inputs: np.ndarray) -> Grid:
    """The query input of a row (the grid after the last IN)."""
    inputs = np.asarray(inputs)
    start = int(np.flatnonzero(inputs == IN)[-1]) + 1
    end = start + int(np.flatnonzero(inputs[start:] == END)[0])
    return _parse_grid(inputs[start:end + 1])


def is_context_dataset(data_path: str | Path, split: str = "test") -> bool:
    """A dataset in this format with per-example names (the ARC context build)."""
    import json
    meta = Path(data_path) / split / "dataset.json"
    if not meta.is_file():
        return False
    d = json.loads(meta.read_text())
    return d.get("vocab_size") == CONTEXT_VOCAB_SIZE and all(
        (Path(data_path) / split / f"{s}__{EXAMPLE_NAMES}.npy").is_file() for s in d.get("sets", []))
