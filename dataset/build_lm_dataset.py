"""Build a memory-mapped prompt -> continuation dataset for the HRM language model.

    python -m dataset.build_lm_dataset --source input.txt --output-dir data/shakespeare \
        --vocab-size 2048 --max-seq-len 256 --seed 0
    python -m dataset.build_lm_dataset mix --inputs data/lang:0.9 data/gsm8k:0.05 data/mbpp:0.05 \
        --output-dir data/mix --train-samples 100000
    python -m dataset.build_lm_dataset reasoning --task addition --train-digits 1..3 --extrap-digits 4..5 \
        --output-dir data/lm-addition     # generated tasks: see dataset/lm_reasoning.py

Output (read by lm_dataset.LMDataset):
    <out>/meta.json          pad/bos/eos/unk ids, vocab_size, token_dtype, split counts, build settings
    <out>/tokenizer.json     byte-level BPE (trained here, or a copy of --tokenizer)
    <out>/<split>/{prompt,target}_tokens.npy    uint16 (vocab <= 65535) or uint32, all examples concatenated
    <out>/<split>/{prompt,target}_offsets.npy   int64 [N+1]; example i = tokens[off[i]:off[i+1]]
with split in train, validation, test. The target holds no BOS/EOS; the loader adds them.

Everything streams: sources are read record by record, tokenised in batches (tokenizers' Rust thread pool
does the parallel work) and appended to the .npy files, so the corpus is never held in RAM. The result
is written to a temporary directory beside --output-dir and renamed into place only when complete.
Same input + same flags + same seed -> byte-identical output.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from utils.progress import track

from dataset.common import exit_on_dataset_error
from dataset.lm_tokenizer import LMDataError, LMTokenizer, train_bpe_tokenizer

SPLITS = ("train", "validation", "test")
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst",
                      ".txt.gz", ".txt.zst", ".parquet")
# File-name words that mark a pre-split source directory (Hugging Face style names included).
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
FORMAT_VERSION = "hrm-lm-v1"
NOT_CORPUS = {"meta.json", "tokenizer.json", "dataset.json"}  # side files of prepared datasets


# ----------------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------------

def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return None


def _split_from_name(path: Path) -> str | None:
    stem = path.name.lower()
    for word in re.split(r"[^a-z]+", stem):
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    return None


def discover_files(source: Path) -> list[tuple[Path, str | None]]:
    """(file, split or None). A directory whose files are named by split keeps that split."""
    if not source.exists():
        raise LMDataError(f"{source}: source not found")
    if source.is_file():
        if _suffix(source) is None:
            raise LMDataError(f"{source}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
        return [(source, None)]
    files = sorted(p for p in source.rglob("*") if p.is_file() and _suffix(p) is not None
                   and not p.name.startswith(".") and p.name not in NOT_CORPUS)
    if not files:
        raise LMDataError(f"{source}: no readable corpus files ({', '.join(SUPPORTED_SUFFIXES)})")
    splits = [_split_from_name(p.relative_to(source)) for p in files]
    if any(s is not None for s in splits):
        unnamed = [p for p, s in zip(files, splits) if s is None]
        if unnamed:
            raise LMDataError(f"{unnamed[0]}: source directory has split-named files (train/validation/test) "
                              f"but this file names no split")
        return list(zip(files, splits))
    return [(p, None) for p in files]


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        if name.endswith(".zst"):
            import zstandard
            raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
            return io.TextIOWrapper(raw, encoding="utf-8", newline="")
        return open(path, "r", encoding="utf-8", newline="")
    except OSError as e:
        raise LMDataError(f"{path}: cannot open ({e.strerror or e})") from None


def _iter_txt_documents(path: Path, doc_chars: int) -> Iterator[tuple[str, str]]:
    """Plain text -> documents of whole paragraphs, cut at blank lines once >= doc_chars characters.

    The documents concatenate back to the exact file, so windows inside one document are consecutive text
    and the train/validation/test split (made per document) never cuts a window in two.
    """
    buf: list[str] = []
    size, start_line = 0, 1
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            buf.append(line)
            size += len(line)
            if size >= doc_chars and line.strip() == "":
                yield f"{path}:{start_line}", "".join(buf)
                buf, size, start_line = [], 0, lineno + 1
    if buf:
        yield f"{path}:{start_line}", "".join(buf)


def _iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Structured records with a location string for error messages."""
    suffix = _suffix(path)
    if suffix.startswith(".jsonl"):
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise LMDataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    elif suffix.startswith(".json"):
        with _open_text(path) as f:  # a .json file is one document; it is read whole by nature
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise LMDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise LMDataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}), "
                              f"got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path} record {i}", rec
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise LMDataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield f"{path} record {i}", rec
                i += 1
    else:  # plain text in a structured mode: one record per non-empty line, the line as "text"
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{lineno}", {"text": line.rstrip("\n")}


_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def get_field(record: Any, dotted: str, where: str) -> Any:
    """`data.answers.text[0]` style lookup; a missing piece names the record and the path."""
    cur = record
    for m in _PATH_TOKEN.finditer(dotted):
        key, idx = m.group(1), m.group(2)
        if key is not None:
            if not isinstance(cur, dict) or key not in cur:
                raise LMDataError(f"{where}: field path '{dotted}' not found (no key '{key}')")
            cur = cur[key]
        else:
            i = int(idx)
            if not isinstance(cur, (list, tuple)) or not -len(cur) <= i < len(cur):
                raise LMDataError(f"{where}: field path '{dotted}' not found (no index [{i}])")
            cur = cur[i]
    return cur


def _as_text(value: Any, dotted: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise LMDataError(f"{where}: field '{dotted}' is {type(value).__name__}, expected text")


def _hash_split(seed: int, doc_index: int, val_ratio: float, test_ratio: float) -> str:
    """Seeded, order-stable split of one document: the same doc lands in the same split in every pass."""
    h = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2.0 ** 64
    if u < val_ratio:
        return "validation"
    if u < val_ratio + test_ratio:
        return "test"
    return "train"


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------

class NpyAppender:
    """A 1-D .npy file grown by appends; the header (with the final length) is written on close."""

    HEADER_BYTES = 128  # fixed, so the header can be rewritten in place once the length is known

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self.f = open(path, "wb")
        self.f.write(b"\0" * self.HEADER_BYTES)

    def append(self, arr) -> None:
        a = np.ascontiguousarray(arr, dtype=self.dtype)
        self.f.write(a.tobytes())
        self.n += a.size

    def close(self) -> None:
        header = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (self.n,)}).encode("latin1")
        pad = self.HEADER_BYTES - 10 - len(header) - 1
        assert pad >= 0
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + (self.HEADER_BYTES - 10).to_bytes(2, "little")
                     + header + b" " * pad + b"\n")
        self.f.close()


class SplitWriter:
    """Appends prompt/target token lists of one split; tracks counts and length statistics."""

    def __init__(self, directory: Path, token_dtype: np.dtype, vocab_size: int):
        directory.mkdir(parents=True)
        self.prompt_tokens = NpyAppender(directory / "prompt_tokens.npy", token_dtype)
        self.target_tokens = NpyAppender(directory / "target_tokens.npy", token_dtype)
        self.prompt_offsets = NpyAppender(directory / "prompt_offsets.npy", np.int64)
        self.target_offsets = NpyAppender(directory / "target_offsets.npy", np.int64)
        self.prompt_offsets.append([0])
        self.target_offsets.append([0])
        self.count = self.max_prompt = self.max_target = 0
        self.target_hist = np.zeros(vocab_size, dtype=np.int64)  # for the unigram-entropy baseline

    def add_many(self, prompts: list, targets: list) -> None:
        if not prompts:
            return
        p_len = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        t_len = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
        p_flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
        t_flat = (np.concatenate([np.asarray(t, dtype=np.int64) for t in targets])
                  if t_len.sum() else np.zeros(0, np.int64))
        self.prompt_tokens.append(p_flat)
        self.target_tokens.append(t_flat)
        self.prompt_offsets.append(self.prompt_tokens.n - p_flat.size + np.cumsum(p_len))
        self.target_offsets.append(self.target_tokens.n - t_flat.size + np.cumsum(t_len))
        self.target_hist += np.bincount(t_flat, minlength=self.target_hist.size)
        self.count += len(prompts)
        self.max_prompt = max(self.max_prompt, int(p_len.max()))
        self.max_target = max(self.max_target, int(t_len.max()))

    def close(self) -> dict:
        for a in (self.prompt_tokens, self.target_tokens, self.prompt_offsets, self.target_offsets):
            a.close()
        return {"count": self.count, "prompt_tokens": self.prompt_tokens.n, "target_tokens": self.target_tokens.n,
                "max_prompt_len": self.max_prompt, "max_target_len": self.max_target,
                "target_unigram_entropy_nats": unigram_entropy(self.target_hist)}


def unigram_entropy(hist: np.ndarray) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of a context-free model."""
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist[hist > 0] / total
    return round(float(-(p * np.log(p)).sum()), 6)


def token_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class AtomicOutputDir:
    """Build into `<out>.partial-<pid>`, rename onto `<out>` only on success."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise LMDataError(f"{out}: output directory exists and is not empty (pass --overwrite)")
        self.tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------

@dataclass
class BuildConfig:
    source: str
    output_dir: str
    mode: str = "text"
    tokenizer: str | None = None
    vocab_size: int = 8192
    min_frequency: int = 2
    max_seq_len: int = 256
    stride: int | None = None
    prompt_len: int | None = None
    prompt_ratio: float = 0.5
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    context_field: str | None = None
    prompt_template: str | None = None
    max_prompt_len: int | None = None
    max_target_len: int | None = None
    val_ratio: float = 0.05
    test_ratio: float | None = None
    doc_chars: int = 8192
    seed: int = 0
    batch_docs: int = 256
    overwrite: bool = False


def _iter_documents(cfg: BuildConfig, files, split_filter: str | None = None, forced: dict | None = None,
                    hashed: list | None = None) -> Iterator[tuple[str, str, Any]]:
    """(split, location, document) over all files in a fixed order. Documents are text (text mode),
    (prompt, response) strings (prompt_response) or the raw record (triples). `forced`: doc index -> split,
    overriding the hash split; `hashed` collects the indices of hash-split documents."""
    test_ratio = cfg.val_ratio if cfg.test_ratio is None else cfg.test_ratio
    doc_index = 0
    for path, file_split in files:
        if _suffix(path).startswith(".txt") and cfg.mode == "text":
            docs = _iter_txt_documents(path, cfg.doc_chars)
        else:
            docs = _iter_records(path)
        for where, doc in _reading(path, docs):
            split = file_split or (forced or {}).get(doc_index) or _hash_split(cfg.seed, doc_index, cfg.val_ratio, test_ratio)
            if hashed is not None and file_split is None:
                hashed.append(doc_index)
            doc_index += 1
            if split_filter is not None and split != split_filter:
                continue
            if cfg.mode == "text":
                if not isinstance(doc, str):
                    doc = _as_text(get_field(doc, cfg.text_field, where), cfg.text_field, where)
                yield split, where, doc
            elif cfg.mode == "prompt_response":
                yield split, where, _prompt_response(cfg, doc, where)
            else:
                yield split, where, doc


def _reading(path: Path, it: Iterator) -> Iterator:
    """Turn decoding/IO failures in the middle of a file into one-line errors naming the file."""
    try:
        yield from it
    except UnicodeDecodeError as e:
        raise LMDataError(f"{path}: not UTF-8 text ({e.reason} near byte {e.start})") from None
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated archives
        raise LMDataError(f"{path}: cannot read ({e})") from None
    except Exception as e:
        if type(e).__module__.startswith("zstandard"):
            raise LMDataError(f"{path}: cannot read zstd stream ({e})") from None
        raise


def _prompt_response(cfg: BuildConfig, record: Any, where: str) -> tuple[str, str]:
    if not isinstance(record, dict):
        raise LMDataError(f"{where}: expected a JSON object record, got {type(record).__name__}")
    prompt = _as_text(get_field(record, cfg.prompt_field, where), cfg.prompt_field, where)
    response = _as_text(get_field(record, cfg.response_field, where), cfg.response_field, where)
    if cfg.prompt_template:
        values = {"prompt": prompt, "question": prompt}
        if cfg.context_field:
            values["context"] = _as_text(get_field(record, cfg.context_field, where), cfg.context_field, where)
        try:
            prompt = cfg.prompt_template.format(**values)
        except (KeyError, IndexError) as e:
            raise LMDataError(f"--prompt-template: unknown placeholder {e} "
                              f"(available: {', '.join(sorted(values))})") from None
    return prompt, response


def text_windows(ids: list[int], max_seq_len: int, stride: int, prompt_len: int | None,
                 prompt_ratio: float) -> Iterator[tuple[list[int], list[int]]]:
    """Cut one document into windows of <= max_seq_len tokens; each window = prompt + continuation,
    two consecutive, disjoint spans. A trailing window already covered by the previous one is skipped."""
    n = len(ids)
    start = 0
    while start < n:
        end = min(start + max_seq_len, n)
        w = end - start
        if w >= 2:
            p = prompt_len if prompt_len is not None else int(round(prompt_ratio * w))
            p = max(1, min(p, w - 1))
            yield ids[start:start + p], ids[start + p:end]
        if end == n:
            break
        start += stride


def _check_build_args(cfg: BuildConfig) -> None:
    if cfg.mode not in ("text", "prompt_response", "triples"):
        raise LMDataError(f"--mode must be text, prompt_response or triples, got {cfg.mode!r}")
    if cfg.max_seq_len < 2:
        raise LMDataError(f"--max-seq-len must be >= 2, got {cfg.max_seq_len}")
    if cfg.stride is not None and cfg.stride < 1:
        raise LMDataError(f"--stride must be >= 1, got {cfg.stride}")
    if not 0.0 < cfg.prompt_ratio < 1.0:
        raise LMDataError(f"--prompt-ratio must be in (0, 1), got {cfg.prompt_ratio}")
    test_ratio = cfg.val_ratio if cfg.test_ratio is None else cfg.test_ratio
    if cfg.val_ratio < 0 or test_ratio < 0 or cfg.val_ratio + test_ratio >= 1.0:
        raise LMDataError(f"--val-ratio + --test-ratio must be in [0, 1), got {cfg.val_ratio} + {test_ratio}")


def _triples_vocab(cfg: BuildConfig, files) -> tuple[LMTokenizer | None, dict]:
    """Specials/vocab of an imported triples corpus: from --tokenizer, else a meta.json beside the source."""
    src = Path(cfg.source)
    meta_path = (src if src.is_dir() else src.parent) / "meta.json"
    src_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if cfg.tokenizer:
        tok = LMTokenizer.from_file(cfg.tokenizer)
        if src_meta is not None:
            tok.check_against_meta(src_meta, str(meta_path))
        return tok, {**tok.special_ids(), "vocab_size": tok.vocab_size}
    if src_meta is None:
        raise LMDataError(f"--mode triples needs --tokenizer FILE or a meta.json beside {src}")
    need = ("vocab_size", "pad_id", "bos_id", "eos_id")
    missing = [k for k in need if k not in src_meta]
    if missing:
        raise LMDataError(f"{meta_path}: missing {', '.join(missing)}")
    return None, {k: int(src_meta[k]) for k in need} | {"unk_id": int(src_meta.get("unk_id", -1))}


def _triple_to_example(rec: Any, where: str, specials: dict) -> tuple[list[int], list[int]]:
    """Seeds' triple -> (prompt, target): prompt = encoder_ids without pad, target = labels without
    -100/pad and without the final EOS (the loader re-adds BOS/EOS)."""
    if not isinstance(rec, dict):
        raise LMDataError(f"{where}: expected an object with encoder_ids, decoder_input_ids, labels")
    out = []
    for key in ("encoder_ids", "labels"):
        v = rec.get(key)
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise LMDataError(f"{where}: '{key}' must be a list of integers")
        out.append(v)
    if not isinstance(rec.get("decoder_input_ids"), list):
        raise LMDataError(f"{where}: 'decoder_input_ids' must be a list of integers")
    pad, eos, vocab = specials["pad_id"], specials["eos_id"], specials["vocab_size"]
    for key in ("encoder_ids", "decoder_input_ids", "labels"):
        bad = [x for x in rec[key] if x >= vocab or (x < 0 and not (key == "labels" and x == -100))]
        if bad:
            raise LMDataError(f"{where}: {key} contains token id {bad[0]} outside the vocabulary [0, {vocab})")
    prompt = [x for x in out[0] if x != pad]
    target = [x for x in out[1] if x != -100 and x != pad]
    if target and target[-1] == eos:
        target = target[:-1]
    return prompt, target


class _EmptySplits(Exception):
    """A requested validation/test split got no document by the hash split (a small corpus)."""

    def __init__(self, forced: dict):
        self.forced = forced


def _force_one_per_split(cfg: BuildConfig, hashed: list[int], split_stats: dict) -> dict:
    """doc index -> split for the requested splits that came out empty: the hash-split document with the lowest
    hash draw goes to validation, the lowest of the rest to test (the same documents in every rebuild)."""
    test_ratio = cfg.val_ratio if cfg.test_ratio is None else cfg.test_ratio
    wanted = [s for s, r in (("validation", cfg.val_ratio), ("test", test_ratio)) if r > 0 and split_stats[s]["count"] == 0]
    if len(hashed) < 3:
        raise LMDataError(f"{cfg.source}: {len(hashed)} documents cannot fill train, validation and test; add documents "
                          f"or set --val-ratio 0 --test-ratio 0")

    def draw(i):
        return int.from_bytes(hashlib.blake2b(f"{cfg.seed}:{i}".encode(), digest_size=8).digest(), "little")
    # only train documents move: taking the one document of a non-empty validation split for test would
    # empty validation instead (the 256 KB tinyshakespeare sample did exactly that)
    ranked = sorted((i for i in hashed if _hash_split(cfg.seed, i, cfg.val_ratio, test_ratio) == "train"), key=draw)
    return {i: s for i, s in zip(ranked, wanted)}


def build(cfg: BuildConfig, _forced: dict | None = None) -> dict:
    """Build one dataset; returns the meta dict. Raises LMDataError on bad input. A requested validation or
    test split that the hash split leaves empty (a small corpus) gets one document: the build reruns once
    with that document moved there, so `--val-ratio` always yields a validation split."""
    try:
        return _build(cfg, _forced)
    except _EmptySplits as e:
        return _build(cfg, e.forced)


def load_tokenizer(path: str) -> LMTokenizer:
    """A --tokenizer to reuse, checked against the meta.json beside it when it sits in a prepared dataset."""
    tok = LMTokenizer.from_file(path)
    beside = Path(path).parent / "meta.json"
    if beside.is_file():
        tok.check_against_meta(json.loads(beside.read_text()), str(beside))
    return tok


def _build(cfg: BuildConfig, forced: dict | None) -> dict:
    t0 = time.time()
    _check_build_args(cfg)
    out = Path(cfg.output_dir)
    guard = AtomicOutputDir(out, cfg.overwrite)  # refuse an occupied output before any work
    files = discover_files(Path(cfg.source))
    stride = cfg.stride or cfg.max_seq_len
    max_prompt_len = cfg.max_prompt_len or cfg.max_seq_len
    max_target_len = cfg.max_target_len or cfg.max_seq_len

    # 1. Tokenizer: reuse, or train on the train split only (streamed, second read of the source).
    if cfg.mode == "triples":
        tok, specials = _triples_vocab(cfg, files)
    elif cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        specials = {**tok.special_ids(), "vocab_size": tok.vocab_size}
    else:
        def train_texts():
            for _, _, doc in _iter_documents(cfg, files, split_filter="train", forced=forced):
                yield doc if isinstance(doc, str) else doc[0] + "\n" + doc[1]
        texts = track(train_texts(), desc="train tokenizer", unit="doc")
        tok = LMTokenizer(train_bpe_tokenizer(texts, cfg.vocab_size, cfg.min_frequency), source="trained")
        specials = {**tok.special_ids(), "vocab_size": tok.vocab_size}
    vocab_size = specials["vocab_size"]
    dtype = token_dtype_for(vocab_size)

    # 2. Tokenise and write, batch by batch.
    stats = {"documents": 0, "skipped_empty": 0, "truncated_prompts": 0, "truncated_targets": 0}
    with guard as tmp:
        writers = {s: SplitWriter(tmp / s, dtype, vocab_size) for s in SPLITS}
        pending: list[tuple[str, str, Any]] = []

        def flush():
            if not pending:
                return
            per_split = {s: ([], []) for s in SPLITS}
            if cfg.mode == "text":
                for (split, _, _), ids in zip(pending, tok.encode_batch([d for _, _, d in pending])):
                    for p, t in text_windows(ids, cfg.max_seq_len, stride, cfg.prompt_len, cfg.prompt_ratio):
                        per_split[split][0].append(p)
                        per_split[split][1].append(t)
            else:
                if cfg.mode == "prompt_response":
                    enc = tok.encode_batch([x for _, _, d in pending for x in d])
                    pairs = [(enc[2 * i], enc[2 * i + 1]) for i in range(len(pending))]
                else:
                    pairs = [_triple_to_example(d, where, specials) for _, where, d in pending]
                for (split, _, _), (p, t) in zip(pending, pairs):
                    if not p:
                        stats["skipped_empty"] += 1
                        continue
                    if len(p) > max_prompt_len:  # keep the start: questions lead their context
                        p, stats["truncated_prompts"] = p[:max_prompt_len], stats["truncated_prompts"] + 1
                    if len(t) > max_target_len:
                        t, stats["truncated_targets"] = t[:max_target_len], stats["truncated_targets"] + 1
                    per_split[split][0].append(p)
                    per_split[split][1].append(t)
            for s, (ps, ts) in per_split.items():
                writers[s].add_many(ps, ts)
            stats["documents"] += len(pending)
            pending.clear()

        hashed: list[int] = []
        for item in track(_iter_documents(cfg, files, forced=forced, hashed=hashed), desc="tokenise", unit="doc"):
            pending.append(item)
            if len(pending) >= cfg.batch_docs:
                flush()
        flush()
        split_stats = {s: w.close() for s, w in writers.items()}
        if stats["documents"] == 0:
            raise LMDataError(f"{cfg.source}: corpus is empty (no documents/records)")
        if split_stats["train"]["count"] == 0:
            raise LMDataError(f"{cfg.source}: no training examples were produced "
                              f"(documents too short for --max-seq-len windows, or all sent to other splits)")
        test_ratio = cfg.val_ratio if cfg.test_ratio is None else cfg.test_ratio
        for split, ratio, flag in (("validation", cfg.val_ratio, "--val-ratio"), ("test", test_ratio, "--test-ratio")):
            if hashed and ratio > 0 and split_stats[split]["count"] == 0:
                if forced is None:
                    raise _EmptySplits(_force_one_per_split(cfg, hashed, split_stats))
                raise LMDataError(f"{cfg.source}: the {split} split ({flag} {ratio}) has no examples even with one "
                                  f"document moved there (too short for a window?); add documents or set {flag} 0")

        if cfg.mode == "triples" and tok is None:
            tok_note = "none (triples imported without a tokenizer)"
        else:
            tok.save(tmp / "tokenizer.json")
            tok_note = "tokenizer.json"
        meta = {
            **dataset_meta(specials, dtype, split_stats, tok_note),
            "build": {k: v for k, v in vars(cfg).items() if k not in ("output_dir", "overwrite", "batch_docs")},
            "documents": stats["documents"],
            "skipped_empty_prompts": stats["skipped_empty"],
            "truncated_prompts": stats["truncated_prompts"],
            "truncated_targets": stats["truncated_targets"],
        }
        _write_json(tmp / "meta.json", meta)
    meta["seconds"] = time.time() - t0
    return meta


def dataset_meta(specials: dict, dtype: np.dtype, split_stats: dict, tokenizer_note: str) -> dict:
    """The fields of meta.json that every built or mixed LM dataset has (the loader reads these)."""
    return {
        "format": FORMAT_VERSION,
        **specials,
        "ignore_label_id": -100,
        "token_dtype": np.dtype(dtype).name,
        "splits": {s: split_stats[s]["count"] for s in SPLITS},
        "split_stats": split_stats,
        "max_prompt_len": max(v["max_prompt_len"] for v in split_stats.values()),
        "max_target_len": max(v["max_target_len"] for v in split_stats.values()),
        "tokenizer": tokenizer_note,
    }


def write_examples(guard: AtomicOutputDir, tok: LMTokenizer, examples: dict, meta_extra: dict,
                   split_arrays: dict | None = None, chunk: int = 4096) -> dict:
    """Tokenise in-memory texts {split: (prompts, targets)} and write a prepared dataset through `guard`
    (temp dir, renamed when complete). `split_arrays` {split: {file name: array}} adds side files such as
    groups.npy; `meta_extra` adds meta.json keys. Used by generators whose records are made, not read."""
    dtype = token_dtype_for(tok.vocab_size)
    with guard as tmp:
        split_stats = {}
        for split in SPLITS:
            prompts, targets = examples[split]
            writer = SplitWriter(tmp / split, dtype, tok.vocab_size)
            for c in range(0, len(prompts), chunk):
                writer.add_many(tok.encode_batch(prompts[c:c + chunk]), tok.encode_batch(targets[c:c + chunk]))
            split_stats[split] = writer.close()
            for name, arr in (split_arrays or {}).get(split, {}).items():
                np.save(tmp / split / name, arr, allow_pickle=False)
        tok.save(tmp / "tokenizer.json")
        specials = {**tok.special_ids(), "vocab_size": tok.vocab_size}
        meta = {**dataset_meta(specials, dtype, split_stats, "tokenizer.json"), **meta_extra}
        _write_json(tmp / "meta.json", meta)
    return meta


# ----------------------------------------------------------------------------------------------------
# Mix
# ----------------------------------------------------------------------------------------------------

def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    exact = total * weights / weights.sum()
    n = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - n), kind="stable")
    n[order[: total - int(n.sum())]] += 1
    return n


def mix(inputs: list[tuple[str, float]], output_dir: str, seed: int = 0, quotas: dict | None = None,
        overwrite: bool = False, chunk: int = 8192) -> dict:
    """Mix prepared datasets by weight, per split, into a new prepared dataset.

    Without a quota, a split's size is the largest that draws every source without repetition (sources
    that have no examples in that split drop out and the rest keep their relative weights). With a quota,
    a source that is too small is repeated (whole passes, then a seeded partial pass) and a warning says so.
    """
    from lm_dataset import load_lm_meta, open_split  # the reader lives with the loader

    t0 = time.time()
    quotas = quotas or {}
    if not inputs:
        raise LMDataError("mix: --inputs needs at least one DIR:WEIGHT")
    for d, w in inputs:
        if not w > 0:
            raise LMDataError(f"mix: weight for {d} must be > 0, got {w}")
    guard = AtomicOutputDir(Path(output_dir), overwrite)
    metas = [load_lm_meta(d) for d, _ in inputs]
    ref, ref_dir = metas[0], inputs[0][0]
    ref_tok = (Path(ref_dir) / "tokenizer.json")
    for (d, _), m in zip(inputs[1:], metas[1:]):
        for k in ("vocab_size", "pad_id", "bos_id", "eos_id"):
            if m[k] != ref[k]:
                raise LMDataError(f"mix: {d}/meta.json has {k}={m[k]} but {ref_dir} has {ref[k]}; "
                                  f"mixed datasets must share one tokenizer")
        t = Path(d) / "tokenizer.json"
        if ref_tok.is_file() and t.is_file() and t.read_bytes() != ref_tok.read_bytes():
            raise LMDataError(f"mix: {t} differs from {ref_tok}; mixed datasets must share one tokenizer")
    vocab_size = ref["vocab_size"]
    dtype = token_dtype_for(vocab_size)
    weights = np.array([w for _, w in inputs], dtype=np.float64)
    per_source: dict = {}
    with guard as tmp:
        split_stats = {}
        for si, split in enumerate(SPLITS):
            counts = np.array([m["splits"].get(split, 0) for m in metas], dtype=np.int64)
            if split in quotas and quotas[split] is not None:
                total = int(quotas[split])
                empty = [inputs[i][0] for i in range(len(inputs)) if counts[i] == 0]
                if total > 0 and empty:
                    raise LMDataError(f"mix: --{split}-samples {total} requested but {empty[0]} has no "
                                      f"{split} examples")
                w = weights
            else:
                w = np.where(counts > 0, weights, 0.0)
                total = int(np.floor(min(counts[i] / (w[i] / w.sum()) for i in range(len(w)) if w[i] > 0))) \
                    if w.sum() > 0 else 0
            n = _largest_remainder(total, w) if total > 0 else np.zeros(len(inputs), np.int64)
            picks = []
            for i, (d, _) in enumerate(inputs):
                rng = np.random.default_rng([seed, si, i])
                reps, rem = divmod(int(n[i]), int(counts[i])) if counts[i] else (0, 0)
                if n[i] > counts[i]:  # a whole pass alone is no repetition
                    print(f"warning: mix: {d} has {counts[i]} {split} examples; repeating it to reach {n[i]}",
                          file=sys.stderr)
                idx = [rng.permutation(counts[i]) for _ in range(reps)] + [rng.permutation(counts[i])[:rem]]
                idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
                picks.append(np.stack([np.full(idx.size, i, np.int64), idx], axis=1))
            order = np.concatenate(picks) if picks else np.zeros((0, 2), np.int64)
            order = order[np.random.default_rng([seed, si, len(inputs)]).permutation(len(order))]
            per_source[split] = {inputs[i][0]: int(n[i]) for i in range(len(inputs))}

            sources = [open_split(d, split) if counts[i] else None for i, (d, _) in enumerate(inputs)]
            writer = SplitWriter(tmp / split, dtype, vocab_size)
            for c in track(range(0, len(order), chunk), desc=f"mix {split}", unit="chunk"):
                ps, ts = [], []
                for src, j in order[c:c + chunk]:
                    p, t = sources[src].example(int(j))
                    ps.append(p)
                    ts.append(t)
                writer.add_many(ps, ts)
            split_stats[split] = writer.close()
        if split_stats["train"]["count"] == 0:
            raise LMDataError("mix: the mixed train split is empty")
        if ref_tok.is_file():
            shutil.copyfile(ref_tok, tmp / "tokenizer.json")
        meta = {
            **dataset_meta({k: ref[k] for k in ("vocab_size", "pad_id", "bos_id", "eos_id", "unk_id") if k in ref},
                           dtype, split_stats,
                           "tokenizer.json" if ref_tok.is_file() else ref.get("tokenizer", "none")),
            "mix": {"inputs": [{"path": d, "weight": w} for d, w in inputs], "seed": seed,
                    "quotas": {s: quotas.get(s) for s in SPLITS}, "per_source": per_source},
        }
        _write_json(tmp / "meta.json", meta)
    meta["seconds"] = time.time() - t0
    return meta


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dataset.build_lm_dataset",
        description="Tokenise a corpus into a memory-mapped prompt -> continuation dataset. "
                    "Use 'python -m dataset.build_lm_dataset mix --help' to mix prepared datasets, "
                    "'... reasoning --help' to generate reasoning tasks (addition, sort, sudoku, ...).")
    p.add_argument("--source", required=True, help="file or directory (.txt, .jsonl[.gz|.zst], .json, .parquet); "
                   "a directory with train/validation/test-named files keeps its split")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--mode", default="text", choices=["text", "prompt_response", "triples"],
                   help="text: windows of --max-seq-len split into prompt -> continuation; prompt_response: "
                        "fields of records; triples: the seeds' JSONL (encoder_ids, decoder_input_ids, labels)")
    p.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when training (default 8192)")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair count to merge")
    p.add_argument("--max-seq-len", type=int, default=256, help="text mode: window length in tokens "
                   "(prompt + continuation); other modes: default cap for prompt and response")
    p.add_argument("--stride", type=int, help="text mode: window step in tokens (default --max-seq-len)")
    p.add_argument("--prompt-len", type=int, help="text mode: prompt tokens per window (default: --prompt-ratio)")
    p.add_argument("--prompt-ratio", type=float, default=0.5, help="text mode: prompt share of a window")
    p.add_argument("--text-field", default="text", help="text mode on records: dotted field path")
    p.add_argument("--prompt-field", default="prompt", help="dotted path, e.g. data.question")
    p.add_argument("--response-field", default="response", help="dotted path, e.g. data.answers.text[0]")
    p.add_argument("--context-field", help="dotted path available as {context} in --prompt-template")
    p.add_argument("--prompt-template", help='e.g. "{question}\\nContext: {context}" ({prompt} = {question})')
    p.add_argument("--max-prompt-len", type=int, help="prompt_response/triples: truncate prompts (keep start)")
    p.add_argument("--max-target-len", type=int, help="prompt_response/triples: truncate responses (keep start)")
    p.add_argument("--val-ratio", type=float, default=0.05, help="share of documents for validation")
    p.add_argument("--test-ratio", type=float, help="share of documents for test (default: --val-ratio)")
    p.add_argument("--doc-chars", type=int, default=8192,
                   help=".txt: paragraphs are grouped into documents of about this many characters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-docs", type=int, default=256, help="documents per tokeniser batch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def _mix_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataset.build_lm_dataset mix",
                                description="Mix prepared LM datasets (same tokenizer) by weight, per split.")
    p.add_argument("--inputs", nargs="+", required=True, metavar="DIR:WEIGHT", help="e.g. data/lang:0.9 data/math:0.1")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--train-samples", type=int, help="train quota (default: largest without repetition)")
    p.add_argument("--validation-samples", "--val-samples", type=int, dest="validation_samples")
    p.add_argument("--test-samples", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def _parse_inputs(items: list[str]) -> list[tuple[str, float]]:
    out = []
    for it in items:
        d, sep, w = it.rpartition(":")
        try:
            out.append((d, float(w)) if sep else (it, 1.0))
        except ValueError:
            raise LMDataError(f"mix: --inputs entry {it!r} is not DIR:WEIGHT") from None
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_dataset_error():
        if argv[:1] == ["reasoning"]:
            from dataset.lm_reasoning import build_reasoning, config_from_args, reasoning_parser
            a = reasoning_parser().parse_args(argv[1:])
            t0 = time.time()
            meta = build_reasoning(config_from_args(a))
            meta["seconds"] = time.time() - t0
        elif argv[:1] == ["mix"]:
            a = _mix_parser().parse_args(argv[1:])
            meta = mix(_parse_inputs(a.inputs), a.output_dir, seed=a.seed, overwrite=a.overwrite,
                       quotas={"train": a.train_samples, "validation": a.validation_samples, "test": a.test_samples})
        else:
            a = _build_parser().parse_args(argv)
            meta = build(BuildConfig(**vars(a)))
    s = meta["splits"]
    toks = sum(v["prompt_tokens"] + v["target_tokens"] for v in meta["split_stats"].values())
    print(f"wrote {a.output_dir}: train={s['train']} validation={s['validation']} test={s['test']} examples, "
          f"{toks} tokens, vocab {meta['vocab_size']} ({meta['token_dtype']}), {meta['seconds']:.1f}s")


if __name__ == "__main__":
    main()
