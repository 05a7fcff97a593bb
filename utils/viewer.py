"""The puzzle and prediction viewer: one self-contained HTML page (data embedded, no server, no network)
built from a puzzle dataset split and, optionally, the predictions of `evaluate.py` (predictions.npz) or of
a training eval (a step dir's eval_outputs.npz). `visualize.py` is its command line.

The page (utils/viewer_template.html) decodes the embedded arrays once and renders only what is on
screen: one page of puzzle cards and the selected puzzle, so 10,000 puzzles stay responsive. Arrays
travel gzip-compressed and base64-encoded; the page inflates them with the browser's DecompressionStream.
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dataset.common import (ARRAY_FIELDS, IGNORE_LABEL_ID, PUZZLE_KINDS, ARC_GRID, DatasetError, PuzzleDatasetMetadata,
                            guess_kind, validate_puzzle_dataset)
from utils.puzzle_view import arc_boxes, exact_and_wrong, make_style, segment_exact_accuracy, sigmoid

TEMPLATE = Path(__file__).with_name("viewer_template.html")
SIZE_NOTE_BYTES = 50 * 2**20       # above this the size is stated before writing, with a limit=N hint
PREDICTION_FILES = ("predictions.npz", "eval_outputs.npz")  # evaluate.py's, then a training eval's
MAX_DEMOS = 10                     # ARC demo pairs shown per puzzle


class ViewerError(ValueError):
    """Bad input for the viewer; reported as one `error:` line."""


@dataclass
class SplitData:
    meta: PuzzleDatasetMetadata
    inputs: np.ndarray   # [N, L] int64
    labels: np.ndarray   # [N, L] int64, IGNORE_LABEL_ID where the loader ignores the label
    puzzle: np.ndarray   # [N] puzzle index of each example row (over the split's sets in order)
    pids: np.ndarray     # [N] puzzle identifier of each example row


def _set_arrays(sdir: Path, set_name: str) -> dict[str, np.ndarray]:
    return {k: np.load(sdir / f"{set_name}__{k}.npy", mmap_mode="r", allow_pickle=False) for k in ARRAY_FIELDS}


def load_split(root: Path, split: str) -> SplitData:
    """Every example row of one split (its sets concatenated in order, as the eval loader reads them)."""
    sdir = root / split
    meta = PuzzleDatasetMetadata.load(sdir / "dataset.json")
    parts = {"inputs": [], "labels": [], "puzzle": [], "pids": []}
    puzzle_base = 0
    for set_name in meta.sets:
        a = _set_arrays(sdir, set_name)
        pi = np.asarray(a["puzzle_indices"], dtype=np.int64)
        per_row = np.repeat(np.arange(len(pi) - 1), np.diff(pi))
        parts["inputs"].append(np.asarray(a["inputs"], dtype=np.int64))
        labels = np.asarray(a["labels"], dtype=np.int64)
        if meta.ignore_label_id is not None:
            labels = np.where(labels == meta.ignore_label_id, IGNORE_LABEL_ID, labels)
        parts["labels"].append(labels)
        parts["puzzle"].append(per_row + puzzle_base)
        parts["pids"].append(np.asarray(a["puzzle_identifiers"], dtype=np.int64)[per_row])
        puzzle_base += len(pi) - 1
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return SplitData(meta, cat["inputs"], cat["labels"], cat["puzzle"], cat["pids"])


def load_predictions(path: str | os.PathLike) -> tuple[Path, dict[str, np.ndarray]]:
    """An .npz file, or a directory holding predictions.npz (evaluate.py) or eval_outputs.npz (training)."""
    p = Path(path)
    if p.is_dir():
        found = next((p / f for f in PREDICTION_FILES if (p / f).is_file()), None)
        if found is None:
            raise ViewerError(f"predictions '{p}': the directory holds none of {', '.join(PREDICTION_FILES)}")
        p = found
    if not p.is_file():
        raise ViewerError(f"predictions '{p}': file not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ViewerError(f"predictions '{p}': not a readable .npz file ({str(e).splitlines()[0]})") from None
    if "preds" not in arrays:
        if "segment_preds" in arrays and arrays["segment_preds"].ndim == 3:
            arrays["preds"] = arrays["segment_preds"][:, -1]
        elif "logits" in arrays:
            arrays["preds"] = arrays["logits"].argmax(-1)
        else:
            raise ViewerError(f"predictions '{p}' hold no 'preds' (keys: {', '.join(sorted(arrays)) or 'none'}); "
                              f"evaluate.py writes them, or train with eval_save_outputs=[inputs,labels,puzzle_identifiers,"
                              f"preds,q_halt_logits]")
    return p, arrays


def match_rows(data: SplitData, pred: dict[str, np.ndarray], where: str, split_dir: str) -> np.ndarray:
    """Dataset row of each prediction row. With `inputs` saved, rows are matched by content (multi-rank
    evals store a permutation of dataset order; a max_eval_batches eval a prefix); without, the counts
    must agree exactly."""
    preds = pred["preds"]
    N, L = data.inputs.shape
    if preds.ndim != 2 or preds.shape[1] != L:
        raise ViewerError(f"predictions '{where}': preds have shape {tuple(preds.shape)} but {split_dir} has "
                          f"seq_len {L}; were they made on another dataset?")
    n = len(preds)
    if n > N:
        raise ViewerError(f"predictions '{where}': {n} rows but {split_dir} has only {N} examples; "
                          f"were they made on another dataset or split?")
    for key in ("segment_preds", "segment_steps", "q_halt_logits", "inputs", "puzzle_identifiers"):
        if key in pred and len(pred[key]) != n:
            raise ViewerError(f"predictions '{where}': '{key}' has {len(pred[key])} rows but 'preds' has {n}")
    if "inputs" not in pred:
        if n != N:
            raise ViewerError(f"predictions '{where}': {n} rows but {split_dir} has {N} examples (and no "
                              f"'inputs' to match them by)")
        return np.arange(N)
    inputs = pred["inputs"]
    if inputs.ndim != 2 or inputs.shape[1] != L:
        raise ViewerError(f"predictions '{where}': inputs have shape {tuple(inputs.shape)}; expected [N, {L}]")
    if np.array_equal(inputs.astype(np.int64), data.inputs[:n]):
        return np.arange(n)
    pids = pred.get("puzzle_identifiers")
    index: dict[bytes, list[int]] = {}
    for r in range(N - 1, -1, -1):  # reversed so that pop() hands out equal rows in dataset order
        index.setdefault(data.inputs[r].tobytes() + int(data.pids[r]).to_bytes(8, "little", signed=True), []).append(r)
    rows = np.empty(n, dtype=np.int64)
    for i in range(n):
        pid = int(pids[i]) if pids is not None else None
        key = inputs[i].astype(np.int64).tobytes()
        hits = index.get(key + pid.to_bytes(8, "little", signed=True)) if pid is not None else None
        if not hits and pids is None:
            hits = next((v for k, v in index.items() if k.startswith(key) and v), None)
        if not hits:
            raise ViewerError(f"predictions '{where}': row {i}'s input is not an example of {split_dir} "
                              f"(predictions of another dataset or split?)")
        rows[i] = hits.pop()
    return rows


def blob(arr: np.ndarray) -> dict:
    """An array for the page: dtype code, shape, base64 of its gzip-compressed little-endian bytes."""
    codes = {np.dtype(np.uint8): "u1", np.dtype(np.uint16): "u2", np.dtype(np.int32): "i4", np.dtype(np.float32): "f4"}
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in codes:
        raise TypeError(f"blob: unsupported dtype {arr.dtype}")
    # Level 1: 5-10x faster than the default on 100 MB of segment answers, and within ~20% of its size.
    raw = gzip.compress(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(), compresslevel=1, mtime=0)
    return {"dtype": codes[arr.dtype], "shape": list(arr.shape), "b64": base64.b64encode(raw).decode("ascii")}


def _tokens(arr: np.ndarray, dtype, ignore: int) -> np.ndarray:
    """Labels -> page tokens: IGNORE_LABEL_ID becomes `ignore` (the largest value of `dtype`)."""
    return np.where(arr == IGNORE_LABEL_ID, ignore, arr).astype(dtype)


def _answers(arr: np.ndarray, dtype, ignore: int) -> np.ndarray:
    """Predicted tokens -> page tokens (no copy when they already fit), never the `ignore` value."""
    if arr.dtype == dtype and (arr.size == 0 or arr.max() < ignore):
        return arr
    return np.clip(arr, 0, ignore - 1).astype(dtype)


def _arc_demos(root: Path, pids: np.ndarray, token_dtype) -> dict:
    """Demo pairs (the train split's examples) of each distinct puzzle id in `pids`."""
    sdir = root / "train"
    meta = PuzzleDatasetMetadata.load(sdir / "dataset.json")
    wanted = {int(p) for p in np.unique(pids)}
    found: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for set_name in meta.sets:
        a = _set_arrays(sdir, set_name)
        ids = np.asarray(a["puzzle_identifiers"])
        pi = np.asarray(a["puzzle_indices"])
        for p in np.flatnonzero(np.isin(ids, list(wanted))):
            rows = range(int(pi[p]), int(pi[p + 1]))
            lst = found.setdefault(int(ids[p]), [])
            for r in rows[:max(MAX_DEMOS - len(lst), 0)]:
                lst.append((np.asarray(a["inputs"][r], dtype=np.int64), np.asarray(a["labels"][r], dtype=np.int64)))
    slots = sorted(found)
    slot_of = {p: i for i, p in enumerate(slots)}
    start, count, inputs, labels = [], [], [], []
    for p in slots:
        start.append(len(inputs))
        count.append(len(found[p]))
        inputs += [i for i, _ in found[p]]
        labels += [o for _, o in found[p]]
    inputs_a = np.stack(inputs) if inputs else np.zeros((0, ARC_GRID * ARC_GRID), np.int64)
    labels_a = np.stack(labels) if labels else np.zeros((0, ARC_GRID * ARC_GRID), np.int64)
    item_slot = np.array([slot_of.get(int(p), -1) for p in pids], dtype=np.int32)
    return {"inputs": blob(inputs_a.astype(token_dtype)), "labels": blob(labels_a.astype(token_dtype)),
            "inBox": blob(arc_boxes(inputs_a, False)), "outBox": blob(arc_boxes(labels_a, False)),
            "start": blob(np.array(start, np.int32)), "count": blob(np.array(count, np.int32)),
            "itemSlot": blob(item_slot)}


def _arc_tasks(root: Path, data: SplitData, rows: np.ndarray, pred: dict[str, np.ndarray]) -> dict:
    """evaluate.py's de-augmented, voted answers per task (utils/arc_scoring.py), with pass@1 / pass@2."""
    from utils import arc_scoring
    ident_file = root / "identifiers.json"
    if not ident_file.is_file():
        raise ViewerError(f"{ident_file}: file not found (ARC voting needs the puzzle names)")
    identifiers = arc_scoring.load_identifiers(str(root))
    q = pred.get("q_halt_logits", np.zeros(len(rows)))
    try:
        tasks = arc_scoring.vote(data.inputs[rows], data.labels[rows], pred["preds"], data.pids[rows], q, identifiers)
    except (IndexError, DatasetError) as e:
        raise ViewerError(f"{ident_file}: does not fit the dataset's puzzle ids ({e})") from None
    out = []
    for name, inputs in sorted(tasks.items()):
        tests = []
        for ti in sorted(inputs.values(), key=lambda t: t.order):
            ranked = ti.ranked()
            label = ti.label.tolist() if ti.label is not None else []
            rank = next((k for k, c in enumerate(ranked) if ti.label is not None and np.array_equal(c.grid, ti.label)), -1)
            tests.append({"label": label, "rank": rank, "candidates": len(ranked),
                          "cands": [{"grid": c.grid.tolist(), "votes": c.votes, "q": round(float(c.q_mean), 4)}
                                    for c in ranked[:3]]})
        out.append({"name": name, "tests": tests,
                    "pass1": all(t["rank"] == 0 for t in tests), "pass2": all(0 <= t["rank"] < 2 for t in tests)})
    scores = arc_scoring.pass_at_k(tasks)
    return {"list": out, "pass@1": scores["pass@1"], "pass@2": scores["pass@2"], "pass@10": scores["pass@10"]}


def resolve_kind(kind: str, meta: PuzzleDatasetMetadata, sample_label: Optional[np.ndarray], split_dir: str) -> str:
    if kind == "auto":
        return guess_kind(meta, sample_label)
    if kind not in PUZZLE_KINDS:
        raise ViewerError(f"unknown puzzle type kind={kind!r}; choose auto, {', '.join(PUZZLE_KINDS)}")
    side = int(round(meta.seq_len ** 0.5))
    if kind in ("sudoku", "maze") and side * side != meta.seq_len:
        raise ViewerError(f"kind={kind}: {split_dir} has seq_len {meta.seq_len}, not a square grid")
    if kind == "arc" and meta.seq_len != ARC_GRID * ARC_GRID:
        raise ViewerError(f"kind=arc: {split_dir} has seq_len {meta.seq_len}; ARC canvases have {ARC_GRID * ARC_GRID}")
    return kind


def build_payload(data_path: str, split: str = "test", predictions: Optional[str] = None, kind: str = "auto",
                  limit: Optional[int] = None, seed: int = 0, title: Optional[str] = None) -> dict:
    """Everything the page shows, as JSON-ready values. Raises ViewerError/DatasetError/DataPathError."""
    from utils.data import DataPathError, dataset_kind
    root = Path(data_path)
    if dataset_kind(data_path) != "puzzle":
        raise DataPathError(f"data_path '{data_path}' is a language-model dataset; the viewer shows puzzle datasets")
    if kind not in ("auto",) + PUZZLE_KINDS:  # before any reading: a typo should not cost a validation pass
        raise ViewerError(f"unknown puzzle type kind={kind!r}; choose auto, {', '.join(PUZZLE_KINDS)}")
    meta = PuzzleDatasetMetadata.load(root / split / "dataset.json")
    validate_puzzle_dataset(root, splits=[split] + (["train"] if split != "train" and meta.seq_len == 900 else []))
    data = load_split(root, split)
    split_dir = str(root / split)
    kind = resolve_kind(kind, meta, data.labels[0] if len(data.labels) else None, split_dir)
    if meta.vocab_size > 65535:
        raise ViewerError(f"{split_dir}: vocab_size {meta.vocab_size} is too large to draw as a token grid")
    token_dtype, ignore = (np.uint8, 255) if meta.vocab_size <= 255 else (np.uint16, 65535)

    pred, where = None, None
    rows = np.arange(len(data.inputs))
    if predictions:
        path, pred = load_predictions(predictions)
        where = str(path)
        rows = match_rows(data, pred, where, split_dir)
    n_total = len(rows)
    tasks = _arc_tasks(root, data, rows, pred) if (pred is not None and kind == "arc") else None

    sel = np.arange(n_total)
    if limit is not None and n_total > limit:
        rng = np.random.default_rng(seed)
        sel = np.sort(rng.choice(n_total, size=limit, replace=False))
    rows = rows[sel]
    pick = (lambda a: a) if len(sel) == n_total else (lambda a: a[sel])  # no copy of big arrays when not sampling
    items = {
        "row": blob(rows.astype(np.int32)),
        "puzzle": blob(data.puzzle[rows].astype(np.int32)),
        "pid": blob(data.pids[rows].astype(np.int32)),
        "inputs": blob(data.inputs[rows].astype(token_dtype)),
        "labels": blob(_tokens(data.labels[rows], token_dtype, ignore)),
    }
    ident_file = root / "identifiers.json"
    names = json.loads(ident_file.read_text()) if ident_file.is_file() else []
    idnames = {str(p): names[p] for p in np.unique(data.pids[rows]).tolist()
               if p < len(names) and p != meta.blank_identifier_id}
    summary = {"items": int(len(rows)), "examples": int(len(data.inputs)), "predicted": n_total if pred is not None else 0}
    if pred is not None:
        preds = pick(pred["preds"]).astype(np.int64)
        exact, n_wrong = exact_and_wrong(preds, data.labels[rows])
        items["preds"] = blob(_answers(preds, token_dtype, ignore))
        items["exact"] = blob(exact.astype(np.uint8))
        items["nwrong"] = blob(n_wrong.astype(np.int32))
        if "q_halt_logits" in pred:
            items["q"] = blob(sigmoid(pick(pred["q_halt_logits"])).astype(np.float32))
        summary["exact"] = float(exact.mean()) if len(exact) else 0.0
        if "segment_preds" in pred and pred["segment_preds"].ndim == 3:
            segs = pick(pred["segment_preds"])
            if segs.shape[2] != meta.seq_len:
                raise ViewerError(f"predictions '{where}': segment_preds have shape {tuple(segs.shape)}; expected "
                                  f"[N, segments, {meta.seq_len}]")
            items["segs"] = blob(_answers(segs, token_dtype, ignore))
            summary["segments"] = int(segs.shape[1])
            summary["segmentExact"] = [round(float(a), 6) for a in segment_exact_accuracy(segs, data.labels[rows])]
            if kind == "arc":
                items["segBox"] = blob(arc_boxes(segs.reshape(-1, segs.shape[2]), True).reshape(len(segs), -1, 4))
        if "segment_steps" in pred:
            items["steps"] = blob(pick(pred["segment_steps"]).astype(np.int32))
    if kind == "arc":
        items["inBox"] = blob(arc_boxes(data.inputs[rows], False))
        items["labelBox"] = blob(arc_boxes(np.where(data.labels[rows] < 0, 0, data.labels[rows]), False))
        if pred is not None:
            items["predBox"] = blob(arc_boxes(pick(pred["preds"]), True))
    style = make_style(kind, meta.seq_len, meta.vocab_size)
    return {
        "version": 1,
        "title": title or f"{root.name} / {split}",
        "dataPath": str(data_path), "split": split, "predictions": where,
        "seqLen": meta.seq_len, "vocab": meta.vocab_size, "ignore": ignore,
        "style": style.to_json(), "summary": summary, "idnames": idnames, "items": items,
        "sampled": bool(len(sel) < n_total),
        "demos": _arc_demos(root, data.pids[rows], token_dtype) if kind == "arc" and split != "train" else None,
        "tasks": tasks,
    }


def render_html(payload: dict) -> str:
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    html = TEMPLATE.read_text(encoding="utf-8")
    marker = "__VIEWER_DATA__"
    if html.count(marker) != 1:
        raise RuntimeError(f"{TEMPLATE}: expected exactly one {marker}")
    return html.replace(marker, data)


def write_atomic(text: str, out: str | os.PathLike) -> Path:
    """Write the page to a temporary sibling, then rename: no half-written HTML on any failure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
