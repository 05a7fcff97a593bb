"""Loader for datasets written by `python -m dataset.build_lm_dataset`: same iteration and resume API as
PuzzleDataset, yielding encoder/decoder batches padded per batch.

Each example i of a split is a prompt (encoder input) and a target (continuation). The decoder is fed
[BOS] + target and predicts target + [EOS], so position t of the decoder only ever sees targets < t:

    encoder_ids       = prompt                    encoder_mask = True on real tokens
    decoder_input_ids = [BOS, t0, t1, ..., tn-1]   decoder_mask = True on real tokens
    labels            = [t0, t1, ..., tn-1, EOS]   -100 on padding

Train: every epoch e is a permutation drawn from np.random.default_rng([seed, e]); full global batches
only (drop-last); rank r takes rows [r*B, (r+1)*B) of each global batch. Each `iter()` runs to the end
of the current block of `epochs_per_iter` epochs (epochs [k*E, (k+1)*E)), so a resumed run keeps the
same evaluation grid. Validation/test: one sequential pass per `iter()`; the last window is padded with
empty rows (all masks False, labels -100) and reports its real size as `global_effective_batch_size`.

Loaders: `create_dataloader` here (prefetching thread) or puzzle_dataset.create_dataloader (worker
process); LMDataset implements the protocol of both, and both resume exactly from `state_dict()`.
"""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dataset.lm_tokenizer import IGNORE_LABEL_ID, LMDataError, LMTokenizer

SPLITS = ("train", "validation", "test")
SPLIT_FILES = ("prompt_tokens.npy", "prompt_offsets.npy", "target_tokens.npy", "target_offsets.npy")


def load_lm_meta(dataset_path) -> dict:
    path = Path(dataset_path) / "meta.json"
    if not path.is_file():
        raise LMDataError(f"{path}: not found (is {dataset_path} a dataset built by dataset.build_lm_dataset?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LMDataError(f"{path}: invalid JSON ({e.msg})") from None
    missing = [k for k in ("vocab_size", "pad_id", "bos_id", "eos_id", "token_dtype", "splits") if k not in meta]
    if missing:
        raise LMDataError(f"{path}: missing keys {', '.join(missing)}")
    return meta


class LMSplit:
    """Memory-mapped arrays of one split; `example(i)` -> (prompt, target) int arrays (views)."""

    def __init__(self, dataset_path, split: str, meta: dict | None = None):
        self.root = Path(dataset_path)
        meta = meta or load_lm_meta(dataset_path)
        if split not in meta["splits"]:
            raise LMDataError(f"{self.root}/meta.json: no split '{split}' (have {', '.join(meta['splits'])})")
        d = self.root / split
        arrs = {}
        for name in SPLIT_FILES:
            f = d / name
            if not f.is_file():
                raise LMDataError(f"{f}: missing file of split '{split}'")
            try:
                arrs[name] = np.load(f, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise LMDataError(f"{f}: not a numeric .npy array ({e})") from None
        self.prompt_tokens, self.prompt_offsets = arrs["prompt_tokens.npy"], arrs["prompt_offsets.npy"]
        self.target_tokens, self.target_offsets = arrs["target_tokens.npy"], arrs["target_offsets.npy"]
        n = int(meta["splits"][split])
        for tok_name, off_name, tok, off in (("prompt_tokens", "prompt_offsets", self.prompt_tokens, self.prompt_offsets),
                                             ("target_tokens", "target_offsets", self.target_tokens, self.target_offsets)):
            if tok.dtype.name != meta["token_dtype"]:
                raise LMDataError(f"{d}/{tok_name}.npy: dtype {tok.dtype.name} but meta.json says {meta['token_dtype']}")
            if off.dtype != np.int64 or off.shape != (n + 1,):
                raise LMDataError(f"{d}/{off_name}.npy: expected int64[{n + 1}] for {n} examples, "
                                  f"got {off.dtype}{list(off.shape)}")
            if off[0] != 0 or off[-1] != tok.shape[0]:
                raise LMDataError(f"{d}/{off_name}.npy: offsets span [{off[0]}, {off[-1]}] but "
                                  f"{tok_name}.npy holds {tok.shape[0]} tokens")
        self.count = n
        self._init_args = (dataset_path, split, meta)
        # Small per-example index (2 x int64 per example) in RAM; token arrays stay on disk.
        self.p_off = np.array(self.prompt_offsets)
        self.t_off = np.array(self.target_offsets)

    # Pickled (for a DataLoader worker process) as its path: the worker re-opens the memmaps instead of
    # receiving a copy of the token arrays.
    def __getstate__(self):
        return {"init_args": self._init_args}

    def __setstate__(self, state):
        self.__init__(*state["init_args"])

    def __len__(self) -> int:
        return self.count

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return (self.prompt_tokens[self.p_off[i]:self.p_off[i + 1]],
                self.target_tokens[self.t_off[i]:self.t_off[i + 1]])


def open_split(dataset_path, split: str) -> LMSplit:
    return LMSplit(dataset_path, split)


def validate_lm_dataset(dataset_path, check_token_ids: bool = True) -> dict:
    """Full check of a prepared dataset (files, offsets, tokenizer vs meta, every id < vocab_size).
    Returns meta; raises LMDataError with a one-line message."""
    meta = load_lm_meta(dataset_path)
    if (Path(dataset_path) / "tokenizer.json").is_file():
        LMTokenizer.from_dataset(dataset_path)
    for split in meta["splits"]:
        s = LMSplit(dataset_path, split, meta)
        if not check_token_ids:
            continue
        for name, arr in (("prompt_tokens", s.prompt_tokens), ("target_tokens", s.target_tokens)):
            for c in range(0, arr.shape[0], 1 << 22):  # chunked: never the whole array in RAM
                chunk = np.asarray(arr[c:c + (1 << 22)])
                if chunk.size and int(chunk.max()) >= meta["vocab_size"]:
                    pos = c + int(np.argmax(chunk >= meta["vocab_size"]))
                    raise LMDataError(f"{dataset_path}/{split}/{name}.npy: token id {int(arr[pos])} at position "
                                      f"{pos} >= vocab_size {meta['vocab_size']}")
    return meta


@dataclass
class LMDatasetConfig:
    seed: int
    dataset_path: str
    global_batch_size: int
    test_set_mode: bool
    epochs_per_iter: int
    rank: int
    num_replicas: int
    max_prompt_len: int | None = None  # longer prompts keep their LAST tokens (nearest the continuation)
    max_target_len: int | None = None  # longer targets keep their FIRST tokens


@dataclass
class LMDatasetMetadata:
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    max_prompt_len: int     # longest encoder input, after the config's truncation
    max_decoder_len: int    # longest decoder input / labels row = longest target + 1
    seq_len: int            # max(max_prompt_len, max_decoder_len): a positional table of this size fits both
    num_examples: int
    target_unigram_entropy_nats: float | None  # context-free baseline loss on this split's targets (+ no EOS)
    # PuzzleDatasetMetadata-compatible fields, so the trainer's step arithmetic works unchanged.
    ignore_label_id: int = IGNORE_LABEL_ID
    blank_identifier_id: int = 0
    num_puzzle_identifiers: int = 1
    total_groups: int = 0
    mean_puzzle_examples: float = 1.0
    sets: tuple = ("all",)


class LMDataset(torch.utils.data.IterableDataset):
    def __init__(self, config: LMDatasetConfig, split: str = "train"):
        super().__init__()
        if split not in SPLITS:
            raise LMDataError(f"LMDataset split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.config, self.split = config, split
        if config.num_replicas < 1 or not 0 <= config.rank < config.num_replicas:
            raise LMDataError(f"rank {config.rank} / num_replicas {config.num_replicas} is not a valid rank")
        if config.global_batch_size % config.num_replicas:
            raise LMDataError(f"global_batch_size {config.global_batch_size} is not divisible by "
                              f"num_replicas {config.num_replicas}")
        self.local_batch_size = config.global_batch_size // config.num_replicas
        self.meta = load_lm_meta(config.dataset_path)
        if (Path(config.dataset_path) / "tokenizer.json").is_file():
            LMTokenizer.from_dataset(config.dataset_path)  # vocabulary must agree with meta.json
        self.data = LMSplit(config.dataset_path, split, self.meta)  # validates files; cheap (memmaps)
        n = len(self.data)
        if n == 0:
            raise LMDataError(f"{config.dataset_path}: split '{split}' has no examples")
        if not config.test_set_mode and n < config.global_batch_size:
            raise LMDataError(f"{config.dataset_path}: split '{split}' has {n} examples, fewer than "
                              f"global_batch_size {config.global_batch_size}")
        stats = self.meta.get("split_stats", {}).get(split, {})
        mp = max(int(np.diff(self.data.p_off).max()), 1)
        mt = int(np.diff(self.data.t_off).max())
        if config.max_prompt_len:
            mp = min(mp, config.max_prompt_len)
        if config.max_target_len:
            mt = min(mt, config.max_target_len)
        self.metadata = LMDatasetMetadata(
            vocab_size=int(self.meta["vocab_size"]), pad_id=int(self.meta["pad_id"]), bos_id=int(self.meta["bos_id"]),
            eos_id=int(self.meta["eos_id"]), unk_id=int(self.meta.get("unk_id", -1)),
            max_prompt_len=mp, max_decoder_len=mt + 1, seq_len=max(mp, mt + 1), num_examples=n,
            target_unigram_entropy_nats=stats.get("target_unigram_entropy_nats"), total_groups=n)
        self._state = self._initial_state()

    # ---- state -------------------------------------------------------------------------------------
    def _initial_state(self) -> dict:
        return {"batch": 0} if self.config.test_set_mode else {"epoch": 0, "batch": 0}

    def state_dict(self) -> dict:
        """Position of the next batch this dataset will yield."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        want = set(self._initial_state())
        if set(state) != want or any(not isinstance(v, int) or v < 0 for v in state.values()):
            raise LMDataError(f"LMDataset state must be {{{', '.join(sorted(want))}}} with non-negative ints, "
                              f"got {state}")
        self._state = dict(state)

    @property
    def batches_per_epoch(self) -> int:
        g = self.config.global_batch_size
        n = len(self.data)
        return n // g if not self.config.test_set_mode else -(-n // g)

    # ---- batches -----------------------------------------------------------------------------------
    def _collate(self, rows: list[int]) -> dict:
        """rows: example indices of this rank (may be shorter than the local batch: padded with empty rows)."""
        B = self.local_batch_size
        md, cfg = self.metadata, self.config
        prompts, targets = [], []
        for i in rows:
            p, t = self.data.example(i)
            if cfg.max_prompt_len and len(p) > cfg.max_prompt_len:
                p = p[len(p) - cfg.max_prompt_len:]
            if cfg.max_target_len and len(t) > cfg.max_target_len:
                t = t[:cfg.max_target_len]
            prompts.append(p)
            targets.append(t)
        Lp = max([len(p) for p in prompts] + [1])
        Lt = max([len(t) for t in targets] + [0]) + 1
        enc = np.full((B, Lp), md.pad_id, dtype=np.int64)
        enc_mask = np.zeros((B, Lp), dtype=bool)
        dec = np.full((B, Lt), md.pad_id, dtype=np.int64)
        dec_mask = np.zeros((B, Lt), dtype=bool)
        labels = np.full((B, Lt), IGNORE_LABEL_ID, dtype=np.int64)
        for r, (p, t) in enumerate(zip(prompts, targets)):
            n = len(t)
            enc[r, :len(p)] = p
            enc_mask[r, :len(p)] = True
            dec[r, 0] = md.bos_id
            dec[r, 1:n + 1] = t
            dec_mask[r, :n + 1] = True
            labels[r, :n] = t
            labels[r, n] = md.eos_id
        return {"encoder_ids": torch.from_numpy(enc), "encoder_mask": torch.from_numpy(enc_mask),
                "decoder_input_ids": torch.from_numpy(dec), "decoder_mask": torch.from_numpy(dec_mask),
                "labels": torch.from_numpy(labels)}

    def _generate(self, state: dict) -> Iterator[tuple[tuple[str, dict, int], dict]]:
        """((set_name, batch, global_effective_batch_size), state after this batch), from `state`."""
        cfg, B = self.config, self.local_batch_size
        G, n = cfg.global_batch_size, len(self.data)
        lo = cfg.rank * B
        if cfg.test_set_mode:
            nb = self.batches_per_epoch
            for b in range(state["batch"], nb):
                start, end = b * G, min((b + 1) * G, n)
                rows = list(range(min(start + lo, end), min(start + lo + B, end)))
                yield ("all", self._collate(rows), end - start), {"batch": (b + 1) % nb}
            return
        nb = self.batches_per_epoch
        epoch, b0 = state["epoch"], state["batch"]
        if b0 >= nb:
            epoch, b0 = epoch + 1, 0
        stop = (epoch // cfg.epochs_per_iter + 1) * cfg.epochs_per_iter
        for e in range(epoch, stop):
            perm = np.random.default_rng([cfg.seed, e]).permutation(n)
            for b in range(b0 if e == epoch else 0, nb):
                rows = perm[b * G + lo: b * G + lo + B].tolist()
                nxt = {"epoch": e, "batch": b + 1} if b + 1 < nb else {"epoch": e + 1, "batch": 0}
                yield ("all", self._collate(rows), G), nxt

    # ---- iteration, and the protocol of puzzle_dataset.PuzzleDataLoader ------------------------------
    def iter_with_positions(self):
        """((set_name, batch, global_effective_batch_size), position after it), from the current position."""
        return self._generate(self.state_dict())

    def end_position(self) -> dict:
        """Position after the last batch of the current iteration window (called once a pass is done).
        At a window boundary it is that boundary, so calling it after a completed pass moves nothing."""
        if self.config.test_set_mode:
            return {"batch": 0}
        epi, (e, b) = self.config.epochs_per_iter, (self._state["epoch"], self._state["batch"])
        if b == 0 and e % epi == 0:
            return {"epoch": e, "batch": 0}
        return {"epoch": (e // epi + 1) * epi, "batch": 0}

    def __len__(self) -> int:
        """Batches per `iter()` from the start of an iteration window (for progress bars)."""
        return self.batches_per_epoch * (1 if self.config.test_set_mode else self.config.epochs_per_iter)

    def __iter__(self):
        for item, nxt in self._generate(self.state_dict()):
            self._state = nxt
            yield item


class LMDataLoader:
    """Iterable over an LMDataset with a background thread building `prefetch` batches ahead.

    `state_dict()` is the position of the next batch the CONSUMER will receive (tracked here as batches
    are handed out, so prefetched-but-unconsumed batches are not counted); `load_state_dict` makes the
    next `iter()` start exactly there. `num_workers=0` builds batches in the calling thread.
    """

    def __init__(self, dataset: LMDataset, prefetch: int = 8, num_workers: int = 1):
        # A thread, not a process: batches are cheap gathers from memmaps, and nothing gets pickled.
        if num_workers not in (0, 1):
            raise LMDataError(f"LMDataLoader supports num_workers 0 or 1, got {num_workers}")
        self.dataset, self.prefetch, self.num_workers = dataset, max(1, prefetch), num_workers

    @property
    def metadata(self) -> LMDatasetMetadata:
        return self.dataset.metadata

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def __iter__(self):
        gen = self.dataset._generate(self.dataset.state_dict())
        if self.num_workers == 0:
            for item, nxt in gen:
                self.dataset._state = nxt
                yield item
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        DONE = object()

        def put(obj) -> bool:
            while not stop.is_set():  # never block forever once the consumer has gone
                try:
                    q.put(obj, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for pair in gen:
                    if not put(pair):
                        return
                put(DONE)
            except BaseException as e:  # surface worker errors in the consumer
                put(e)

        t = threading.Thread(target=work, name="lm-data-prefetch", daemon=True)
        t.start()
        try:
            while True:
                pair = q.get()
                if pair is DONE:
                    break
                if isinstance(pair, BaseException):
                    raise pair
                item, nxt = pair
                self.dataset._state = nxt
                yield item
        finally:
            stop.set()
            t.join(timeout=5)


def create_dataloader(dataset: LMDataset, prefetch: int = 8, num_workers: int = 1) -> LMDataLoader:
    return LMDataLoader(dataset, prefetch=prefetch, num_workers=num_workers)
