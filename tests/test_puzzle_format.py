"""The on-disk puzzle format: metadata, dihedral transforms, ARC helpers, the atomic writer and the validator."""
import json

import numpy as np
import pytest

from dataset.common import (DIHEDRAL_INVERSE, DatasetError, PuzzleDatasetMetadata, PuzzleSetArrays,
                            arc_grid_from_tokens, arc_identifier, dihedral_transform, invert_arc_augmentation,
                            inverse_dihedral_transform, parse_arc_identifier, split_metadata,
                            validate_puzzle_dataset, write_puzzle_dataset)
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig

ORIGINAL_KEYS = ["pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                 "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "sets"]


def write_original_style(root, input_dtype=np.int64, n_groups=5, per_group=3):
    """A dataset laid out exactly as the original builders write it (Sudoku-with-aug flavour:
    int64 tokens, int32 CSR arrays, pydantic-style dataset.json, identifiers.json)."""
    rng = np.random.default_rng(0)
    for split, pg in (("train", per_group), ("test", 1)):
        d = root / split
        d.mkdir(parents=True)
        n = n_groups * pg
        inputs = rng.integers(1, 11, size=(n, 81)).astype(input_dtype)
        labels = rng.integers(2, 11, size=(n, 81)).astype(input_dtype)
        np.save(d / "all__inputs.npy", inputs)
        np.save(d / "all__labels.npy", labels)
        np.save(d / "all__puzzle_identifiers.npy", np.zeros(n, dtype=np.int32))
        np.save(d / "all__puzzle_indices.npy", np.arange(n + 1, dtype=np.int32))
        np.save(d / "all__group_indices.npy", np.arange(0, n + 1, pg, dtype=np.int32))
        with open(d / "dataset.json", "w") as f:
            json.dump({"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 11,
                       "seq_len": 81, "num_puzzle_identifiers": 1, "total_groups": n_groups,
                       "mean_puzzle_examples": 1, "sets": ["all"]}, f)
    with open(root / "identifiers.json", "w") as f:
        json.dump(["<blank>"], f)
    return root


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.int32])
def test_original_builder_output_loads_and_iterates(tmp_path, dtype):
    root = write_original_style(tmp_path / "orig", dtype)
    validate_puzzle_dataset(root)
    ds = PuzzleDataset(PuzzleDatasetConfig(seed=0, dataset_path=str(root), global_batch_size=4,
                                           test_set_mode=False, epochs_per_iter=1, rank=0, num_replicas=1))
    batches = list(ds)
    assert len(batches) == 1  # 5 groups -> 5 examples per epoch -> one full batch of 4
    set_name, batch, n = batches[0]
    assert set_name == "all" and n == 4
    assert batch["inputs"].dtype == batch["labels"].dtype == batch["puzzle_identifiers"].dtype == __import__("torch").int32
    assert batch["inputs"].shape == (4, 81) and batch["puzzle_identifiers"].shape == (4,)
    raw = np.load(root / "train" / "all__inputs.npy")
    for row in batch["inputs"].numpy():  # every row is a real stored example
        assert (raw == row).all(axis=1).any()
    test = PuzzleDataset(PuzzleDatasetConfig(0, str(root), 4, True, 1, 0, 1), split="test")
    sizes = [n for _, _, n in test]
    assert sizes == [4, 1]


def test_metadata_round_trip_keeps_original_keys(tmp_path):
    meta = PuzzleDatasetMetadata(pad_id=0, ignore_label_id=0, blank_identifier_id=0, vocab_size=12, seq_len=900,
                                 num_puzzle_identifiers=7, total_groups=3, mean_puzzle_examples=3.5, sets=["all"])
    meta.save(tmp_path / "dataset.json")
    raw = json.loads((tmp_path / "dataset.json").read_text())
    assert list(raw) == ORIGINAL_KEYS
    assert PuzzleDatasetMetadata.load(tmp_path / "dataset.json") == meta
    raw["vocab_sise"] = raw.pop("vocab_size")
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="missing key.*vocab_size"):
        PuzzleDatasetMetadata.load(tmp_path / "dataset.json")


def test_dihedral_transforms_match_numpy_and_invert():
    a = np.arange(12).reshape(3, 4)
    expected = [a, np.rot90(a, 1), np.rot90(a, 2), np.rot90(a, 3), np.fliplr(a), np.flipud(a), a.T, a[::-1, ::-1].T]
    for tid in range(8):
        assert np.array_equal(dihedral_transform(a, tid), expected[tid])
        assert np.array_equal(inverse_dihedral_transform(dihedral_transform(a, tid), tid), a)
        # the transforms act on the last two axes of a batch as well
        b = np.stack([a, a + 100])
        assert np.array_equal(dihedral_transform(b, tid)[1], expected[tid] + 100)
    assert DIHEDRAL_INVERSE == [0, 3, 2, 1, 4, 5, 6, 7]


def test_arc_identifier_round_trip_and_inverse():
    rng = np.random.default_rng(3)
    grid = rng.integers(0, 10, size=(4, 7))
    for tid in range(8):
        cmap = np.concatenate([[0], rng.permutation(9) + 1])
        name = arc_identifier("007bbfb7", tid, cmap)
        task, t, m = parse_arc_identifier(name)
        assert task == "007bbfb7" and t == tid and np.array_equal(m, cmap)
        aug = dihedral_transform(cmap[grid], tid)
        assert np.array_equal(invert_arc_augmentation(aug, name), grid)
    assert arc_identifier("abc", 0, np.arange(10)) == "abc"
    assert parse_arc_identifier("abc")[1] == 0
    assert parse_arc_identifier("007bbfb7_t3_0512349876") [0:2] == ("007bbfb7", 3)


def test_arc_crop_rule():
    canvas = np.zeros((30, 30), dtype=np.uint8)
    canvas[:3, :5] = 2 + np.arange(15).reshape(3, 5) % 10
    canvas[3, :5] = 1  # EOS row
    canvas[:3, 5] = 1  # EOS column
    assert np.array_equal(arc_grid_from_tokens(canvas.reshape(-1)), np.arange(15).reshape(3, 5) % 10)
    # a ragged prediction: the crop is the largest-area top-left rectangle
    canvas[1, 2] = 0
    assert arc_grid_from_tokens(canvas.reshape(-1)).shape == (3, 2)  # 3x2 (area 6) beats 1x5 (area 5)
    canvas[1, 4] = 0
    assert arc_grid_from_tokens(canvas.reshape(-1)).shape == (3, 2)
    canvas[1, 2], canvas[2, 1] = 5, 0
    assert arc_grid_from_tokens(canvas.reshape(-1)).shape == (2, 4)  # rows 0-1, up to the hole at (1, 4)
    full = np.full((30, 30), 3, dtype=np.uint8)
    assert arc_grid_from_tokens(full.reshape(-1)).shape == (30, 30)
    assert arc_grid_from_tokens(np.zeros(900, dtype=np.uint8)).shape == (0, 0)


def _tiny_sets(n=6, vocab=5, L=4):
    rng = np.random.default_rng(0)
    return {"all": PuzzleSetArrays(inputs=rng.integers(0, vocab, (n, L)).astype(np.uint8),
                                   labels=rng.integers(0, vocab, (n, L)).astype(np.uint8),
                                   puzzle_identifiers=np.zeros(n // 2, np.int32),
                                   puzzle_indices=np.arange(0, n + 1, 2, dtype=np.int32),
                                   group_indices=np.array([0, 1, n // 2], np.int32))}


def _write_tiny(path, sets=None):
    sets = sets or _tiny_sets()
    meta = split_metadata(sets, vocab_size=5, seq_len=4, num_puzzle_identifiers=1)
    return write_puzzle_dataset(path, {"train": (meta, sets), "test": (meta, sets)}, ["<blank>"])


def test_writer_replaces_atomically_and_leaves_nothing_on_failure(tmp_path):
    out = _write_tiny(tmp_path / "ds")
    validate_puzzle_dataset(out)
    before = sorted(p.name for p in tmp_path.iterdir())
    bad = _tiny_sets()
    bad["all"].inputs[0, 0] = 9  # >= vocab_size 5
    with pytest.raises(DatasetError, match=r"inputs\.npy: row 0 holds token id 9"):
        _write_tiny(tmp_path / "ds", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # old build intact, no temp dirs
    validate_puzzle_dataset(out)
    with pytest.raises(DatasetError):
        _write_tiny(tmp_path / "fresh", bad)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("damage, message", [
    ("missing_file", r"all__labels\.npy: file not found"),
    ("missing_split", r"test: split directory not found"),
    ("csr_end", r"puzzle_indices\.npy: last offset is 5 but there are 6 examples"),
    ("csr_order", r"group_indices\.npy: offsets must strictly increase"),
    ("lengths", r"labels\.npy: 5 rows but inputs has 6"),
    ("object", r"puzzle_identifiers\.npy: holds Python objects"),
    ("vocab", r"labels\.npy: row 2 holds label id 7; expected 0 <= value < 5"),
    ("puzzle_id", r"puzzle_identifiers\.npy: row 1 holds puzzle identifier 3"),
    ("groups", r"total_groups is 9"),
    ("json", r"dataset\.json: not valid JSON"),
])
def test_validator_names_file_and_problem(tmp_path, damage, message):
    root = _write_tiny(tmp_path / "ds")
    t = root / "train"
    if damage == "missing_file":
        (t / "all__labels.npy").unlink()
    elif damage == "missing_split":
        import shutil
        shutil.rmtree(root / "test")
    elif damage == "csr_end":
        np.save(t / "all__puzzle_indices.npy", np.array([0, 2, 4, 5], np.int32))
    elif damage == "csr_order":
        np.save(t / "all__group_indices.npy", np.array([0, 2, 1, 3], np.int32))
    elif damage == "lengths":
        np.save(t / "all__labels.npy", np.zeros((5, 4), np.uint8))
    elif damage == "object":
        np.save(t / "all__puzzle_identifiers.npy", np.array([0, "x", None], dtype=object), allow_pickle=True)
    elif damage == "vocab":
        lab = np.load(t / "all__labels.npy")
        lab[2, 1] = 7
        np.save(t / "all__labels.npy", lab)
    elif damage == "puzzle_id":
        np.save(t / "all__puzzle_identifiers.npy", np.array([0, 3, 0], np.int32))
    elif damage == "groups":
        meta = json.loads((t / "dataset.json").read_text())
        meta["total_groups"] = 9
        (t / "dataset.json").write_text(json.dumps(meta))
    elif damage == "json":
        (t / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=message) as err:
        validate_puzzle_dataset(root)
    assert "\n" not in str(err.value)
