"""Which dataset a data_path holds, and its loaders, for the trainer and the evaluator.

`<data_path>/train/dataset.json` -> puzzle dataset (puzzle_dataset.PuzzleDataset);
`<data_path>/meta.json`          -> LM dataset (lm_dataset.LMDataset). Both share one constructor,
iteration and state API, so the training loop does not care which it gets."""
from __future__ import annotations

from pathlib import Path

from utils.schema import ConfigError


class DataPathError(ConfigError):
    """data_path missing or not a dataset this framework knows."""


def dataset_kind(data_path: str) -> str:
    root = Path(data_path)
    if (root / "train" / "dataset.json").is_file():
        return "puzzle"
    if (root / "meta.json").is_file():
        return "lm"
    if not root.exists():
        raise DataPathError(f"data_path '{data_path}' does not exist (build a dataset first, e.g. "
                            f"python -m dataset.build_sudoku_dataset --help)")
    raise DataPathError(f"data_path '{data_path}' holds neither train/dataset.json (puzzle dataset) "
                        f"nor meta.json (LM dataset)")


def validate_dataset(data_path: str) -> str:
    """Full check of the files before any training work; returns the kind."""
    kind = dataset_kind(data_path)
    if kind == "puzzle":
        from dataset.common import validate_puzzle_dataset
        validate_puzzle_dataset(data_path)
    else:
        from lm_dataset import validate_lm_dataset
        validate_lm_dataset(data_path)
    return kind


def make_dataset(data_path: str, split: str, *, seed: int, global_batch_size: int, test_set_mode: bool,
                 epochs_per_iter: int, rank: int, world_size: int):
    kind = dataset_kind(data_path)
    if kind == "puzzle":
        from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
        cfg = PuzzleDatasetConfig(seed=seed, dataset_path=data_path, global_batch_size=global_batch_size,
                                  test_set_mode=test_set_mode, epochs_per_iter=epochs_per_iter, rank=rank,
                                  num_replicas=world_size)
        return PuzzleDataset(cfg, split=split)
    from lm_dataset import LMDataset, LMDatasetConfig
    cfg = LMDatasetConfig(seed=seed, dataset_path=data_path, global_batch_size=global_batch_size,
                          test_set_mode=test_set_mode, epochs_per_iter=epochs_per_iter, rank=rank,
                          num_replicas=world_size)
    return LMDataset(cfg, split=split)


def make_loader(dataset, num_workers: int = 1, prefetch: int = 8):
    if type(dataset).__name__ == "LMDataset":
        from lm_dataset import create_dataloader
    else:
        from puzzle_dataset import create_dataloader
    return create_dataloader(dataset, prefetch=prefetch, num_workers=num_workers)


def batches_per_epoch(dataset) -> int:
    """Optimizer-step count of one training epoch (exact for uniform puzzle sizes and LM data)."""
    if hasattr(dataset, "batches_per_epoch"):
        return int(dataset.batches_per_epoch)
    return len(dataset) // dataset.config.epochs_per_iter


def data_errors() -> tuple[type, ...]:
    """Exception classes that mean bad user data (reported in one line, exit 2)."""
    errors: list[type] = [DataPathError]
    try:
        from dataset.common import DatasetError
        errors.append(DatasetError)
    except ImportError:
        pass
    try:
        from lm_dataset import LMDataError
        errors.append(LMDataError)
    except ImportError:
        pass
    return tuple(errors)
