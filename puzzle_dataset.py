"""`PuzzleDataset`: memory-mapped batches over the puzzle format of `dataset/common.py`.

Train mode, per epoch e and set: a generator built only from (seed, e) draws a permutation of the groups,
one puzzle per group and a random order of that puzzle's examples. The chosen examples are concatenated
in that order and cut into full global batches (the last partial batch is dropped); rank r takes rows
[r*B, (r+1)*B) of every global batch. All ranks derive the same generator, so they agree on every batch
and together cover each global batch exactly once. Unlike the original, a puzzle that straddles a batch
boundary continues at the start of the next batch instead of losing its remaining examples, and the
within-puzzle order comes from the shared generator, not the per-process global RNG (pitfall 14.2).

Test mode: sequential windows of global_batch_size examples; the last window is padded
(inputs = pad_id, labels = -100, puzzle id = blank) and `global_effective_batch_size` counts real rows.

Position = (epoch, set_index, batch). `state_dict()` is the position of the next batch this object
would yield; `create_dataloader` wraps the dataset in a background worker and tracks the position in
the main process so prefetching never skews it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dataset.common import IGNORE_LABEL_ID, ARRAY_FIELDS, DatasetError, PuzzleDatasetMetadata


@dataclass
class PuzzleDatasetConfig:
    seed: int
    dataset_path: str
    global_batch_size: int
    test_set_mode: bool
    epochs_per_iter: int  # epochs yielded per iter() in train mode (the trainer's eval interval)
    rank: int
    num_replicas: int


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one training epoch: a pure function of (seed, epoch), identical on every rank."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), int(epoch)])))


class PuzzleDataset(IterableDataset):
    def __init__(self, config: PuzzleDatasetConfig, split: str = "train"):
        super().__init__()
        self.config = config
        self.split = split
        if config.num_replicas < 1 or not 0 <= config.rank < config.num_replicas:
            raise DatasetError(f"rank {config.rank} is not in [0, num_replicas={config.num_replicas})")
        if config.global_batch_size < 1 or config.global_batch_size % config.num_replicas != 0:
            raise DatasetError(f"global_batch_size {config.global_batch_size} must be a positive multiple of "
                               f"num_replicas {config.num_replicas}")
        if config.epochs_per_iter < 1:
            raise DatasetError(f"epochs_per_iter must be >= 1, got {config.epochs_per_iter}")
        self.local_batch_size = config.global_batch_size // config.num_replicas
        self.split_dir = Path(config.dataset_path) / split
        self.metadata = PuzzleDatasetMetadata.load(self.split_dir / "dataset.json")
        for set_name in self.metadata.sets:
            for k in ARRAY_FIELDS:
                f = self.split_dir / f"{set_name}__{k}.npy"
                if not f.is_file():
                    raise DatasetError(f"{f}: file not found")
        self._data = None  # opened lazily so that a worker process maps the files itself
        self._epoch, self._set_index, self._batch = 0, 0, 0

    # -- data ---------------------------------------------------------------------------------------

    def _lazy_load(self) -> dict:
        if self._data is None:
            data = {}
            for set_name in self.metadata.sets:
                d = {}
                for k in ARRAY_FIELDS:
                    f = self.split_dir / f"{set_name}__{k}.npy"
                    try:
                        if k in ("inputs", "labels"):
                            d[k] = np.load(f, mmap_mode="r", allow_pickle=False)
                        else:  # small index arrays live in RAM
                            d[k] = np.asarray(np.load(f, allow_pickle=False), dtype=np.int64)
                    except ValueError as e:
                        raise DatasetError(f"{f}: cannot load without pickle ({e})") from None
                # example row -> puzzle index, for the test-mode puzzle-id lookup
                data[set_name] = d
            self._data = data
        return self._data

    def __len__(self) -> int:
        """Batches per `iter()` from the start of an iteration window (what a progress bar needs)."""
        data = self._lazy_load()
        if self.config.test_set_mode:
            gb = self.config.global_batch_size
            return sum(-(-len(d["inputs"]) // gb) for d in data.values())
        return self.config.epochs_per_iter * self.batches_per_epoch

    def _num_train_batches(self, d: dict) -> int:
        # Examples in an epoch depend on which puzzle each group draws: this is the expected count,
        # exact when all puzzles of a group have the same size (Sudoku, Maze). `epoch_order` is exact.
        gi, pi = d["group_indices"], d["puzzle_indices"]
        sizes = np.diff(pi).astype(np.float64)
        per_group = np.add.reduceat(sizes, gi[:-1]) / np.diff(gi) if len(gi) > 1 else np.zeros(0)
        return int(per_group.sum() + 1e-6) // self.config.global_batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Training batches (optimizer steps) in one epoch over all sets; expected value for ARC-like data."""
        return sum(self._num_train_batches(d) for d in self._lazy_load().values())

    def epoch_order(self, set_name: str, epoch: int) -> np.ndarray:
        """Example rows of one training epoch, in order, before cutting into batches (int64)."""
        d = self._lazy_load()[set_name]
        gi, pi = d["group_indices"], d["puzzle_indices"]
        rng = epoch_generator(self.config.seed, epoch)
        n_groups = len(gi) - 1
        groups = rng.permutation(n_groups)
        puzzles = rng.integers(gi[groups], gi[groups + 1])  # one puzzle per group, uniform
        starts, sizes = pi[puzzles], pi[puzzles + 1] - pi[puzzles]
        total = int(sizes.sum())
        seg = np.repeat(np.arange(n_groups), sizes)
        within = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        if total and sizes.max() > 1:
            # random order inside each puzzle: sort by (puzzle slot, random key)
            within = within[np.lexsort((rng.random(total), seg))]
        return starts[seg] + within

    def _puzzle_ids_for_rows(self, d: dict, rows: np.ndarray) -> np.ndarray:
        return d["puzzle_identifiers"][np.searchsorted(d["puzzle_indices"], rows, side="right") - 1]

    def _collate(self, d: dict, rows: np.ndarray) -> dict[str, torch.Tensor]:
        meta, B = self.metadata, self.local_batch_size
        # Sorted gathers read the memmap sequentially; then restore the requested order.
        order = np.argsort(rows, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        srows = rows[order]
        inputs = np.asarray(d["inputs"][srows], dtype=np.int32)[inv]
        labels = np.asarray(d["labels"][srows], dtype=np.int32)[inv]
        pids = self._puzzle_ids_for_rows(d, rows).astype(np.int32)
        if meta.ignore_label_id is not None:
            labels[labels == meta.ignore_label_id] = IGNORE_LABEL_ID
        n = len(rows)
        if n < B:
            pad = B - n
            inputs = np.concatenate([inputs, np.full((pad, meta.seq_len), meta.pad_id, np.int32)])
            labels = np.concatenate([labels, np.full((pad, meta.seq_len), IGNORE_LABEL_ID, np.int32)])
            pids = np.concatenate([pids, np.full(pad, meta.blank_identifier_id, np.int32)])
        return {"inputs": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "puzzle_identifiers": torch.from_numpy(pids)}

    # -- iteration ----------------------------------------------------------------------------------

    def iter_with_positions(self) -> Iterator[tuple[tuple[str, dict, int], dict]]:
        """Yield ((set_name, batch, global_effective_batch_size), position of the following batch),
        starting at the current position and ending at the end of the current iteration window."""
        data = self._lazy_load()
        sets = self.metadata.sets
        gb, B, r = self.config.global_batch_size, self.local_batch_size, self.config.rank
        if self.config.test_set_mode:
            for si in range(self._set_index, len(sets)):
                d = data[sets[si]]
                n = len(d["inputs"])
                n_batches = -(-n // gb)
                b0 = self._batch if si == self._set_index else 0
                for b in range(b0, n_batches):
                    start = b * gb
                    end = min(start + gb, n)
                    lo, hi = min(start + r * B, end), min(start + (r + 1) * B, end)
                    batch = self._collate(d, np.arange(lo, hi))
                    nxt = {"epoch": 0, "set_index": si, "batch": b + 1}
                    yield (sets[si], batch, end - start), nxt
            return
        epi = self.config.epochs_per_iter
        end_epoch = (self._epoch // epi + 1) * epi
        for epoch in range(self._epoch, end_epoch):
            for si in range(len(sets)):
                if epoch == self._epoch and si < self._set_index:
                    continue
                d = data[sets[si]]
                order = self.epoch_order(sets[si], epoch)
                n_batches = len(order) // gb
                b0 = self._batch if (epoch == self._epoch and si == self._set_index) else 0
                for b in range(b0, n_batches):
                    rows = order[b * gb + r * B: b * gb + (r + 1) * B]
                    batch = self._collate(d, rows)
                    if b + 1 < n_batches:
                        nxt = {"epoch": epoch, "set_index": si, "batch": b + 1}
                    elif si + 1 < len(sets):
                        nxt = {"epoch": epoch, "set_index": si + 1, "batch": 0}
                    else:
                        nxt = {"epoch": epoch + 1, "set_index": 0, "batch": 0}
                    yield (sets[si], batch, gb), nxt

    def end_position(self) -> dict:
        """Where the current iteration window ends (train) or restarts (test); call before iterating."""
        if self.config.test_set_mode:
            return {"epoch": 0, "set_index": 0, "batch": 0}
        epi = self.config.epochs_per_iter
        return {"epoch": (self._epoch // epi + 1) * epi, "set_index": 0, "batch": 0}

    def __iter__(self):
        end = self.end_position()
        for item, nxt in self.iter_with_positions():
            self.load_state_dict(nxt)
            yield item
        self.load_state_dict(end)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "set_index": self._set_index, "batch": self._batch}

    def load_state_dict(self, sd: dict) -> None:
        self._epoch, self._set_index, self._batch = int(sd["epoch"]), int(sd["set_index"]), int(sd["batch"])


class _PositionedStream(IterableDataset):
    """What the worker process runs: the dataset's batches paired with the position after each."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        return iter(self.dataset.iter_with_positions())


class PuzzleDataLoader:
    """Iterates like the dataset, with batches produced by a background worker process.

    Works with any dataset offering `iter_with_positions()` (yielding (item, next_position)),
    `state_dict()`, `load_state_dict(sd)`, `end_position()` and `.metadata` (LMDataset may reuse it).

    The worker yields each batch with the position of the batch after it; the main process records
    the position of the batch it has actually handed out, so `state_dict()` is exact no matter how
    many batches sit in the prefetch queue, and a new `iter()` starts exactly there."""

    def __init__(self, dataset: IterableDataset, prefetch: int = 8, num_workers: int = 1):
        if num_workers not in (0, 1):
            raise ValueError("num_workers must be 0 or 1 (one worker keeps batch order deterministic)")
        self.dataset = dataset
        self.prefetch = prefetch
        self.num_workers = num_workers
        self.metadata = dataset.metadata

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        if self.num_workers == 0:
            yield from self.dataset
            return
        loader = DataLoader(_PositionedStream(self.dataset), batch_size=None, num_workers=1, prefetch_factor=self.prefetch,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False)
        end = self.dataset.end_position()
        finished = False
        try:
            for item, nxt in loader:
                self.dataset.load_state_dict(nxt)
                yield item
            finished = True
        finally:
            del loader  # stops the worker if the consumer broke off early
        if finished:
            self.dataset.load_state_dict(end)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.dataset.load_state_dict(sd)


def create_dataloader(dataset: IterableDataset, prefetch: int = 8, num_workers: int = 1) -> PuzzleDataLoader:
    return PuzzleDataLoader(dataset, prefetch=prefetch, num_workers=num_workers)
