"""Sampler properties of PuzzleDataset and the background-worker loader."""
import numpy as np
import pytest
import torch

from dataset.common import IGNORE_LABEL_ID, PuzzleSetArrays, split_metadata, write_puzzle_dataset
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig, create_dataloader

VOCAB = 200


@pytest.fixture(scope="module")
def multi_example_ds(tmp_path_factory):
    """ARC-like: 23 groups with 1-4 puzzles each, puzzles with 1-5 examples. Token 0 of each row and of
    its label encode the row number (row // VOCAB, row % VOCAB), so batches can be traced back to rows."""
    rng = np.random.default_rng(7)
    pz_per_group = rng.integers(1, 5, size=23)
    ex_per_pz = rng.integers(1, 6, size=int(pz_per_group.sum()))
    n = int(ex_per_pz.sum())
    rows = np.arange(n)
    inputs = np.stack([rows // VOCAB + 1, rows % VOCAB], axis=1).astype(np.uint8)
    labels = inputs.copy()
    labels[rows % 3 == 0, 1] = 0  # ignore_label_id 0 -> -100 in batches (row id still in inputs)
    sets = {"all": PuzzleSetArrays(inputs=inputs, labels=labels,
                                   puzzle_identifiers=np.arange(1, len(ex_per_pz) + 1, dtype=np.int32),
                                   puzzle_indices=np.concatenate([[0], np.cumsum(ex_per_pz)]).astype(np.int32),
                                   group_indices=np.concatenate([[0], np.cumsum(pz_per_group)]).astype(np.int32))}
    meta = split_metadata(sets, vocab_size=VOCAB, seq_len=2, num_puzzle_identifiers=len(ex_per_pz) + 1)
    root = tmp_path_factory.mktemp("multi") / "ds"
    names = ["<blank>"] + [f"p{i}" for i in range(len(ex_per_pz))]
    write_puzzle_dataset(root, {"train": (meta, sets), "test": (meta, sets)}, names)
    return root, sets["all"]


def make(root, gbs=8, rank=0, reps=1, seed=1, test=False, epi=1, split=None):
    cfg = PuzzleDatasetConfig(seed=seed, dataset_path=str(root), global_batch_size=gbs, test_set_mode=test,
                              epochs_per_iter=epi, rank=rank, num_replicas=reps)
    return PuzzleDataset(cfg, split=split or ("test" if test else "train"))


def row_ids(batch):
    x = batch["inputs"].numpy().astype(np.int64)
    return (x[:, 0] - 1) * VOCAB + x[:, 1]


def test_each_group_exactly_once_per_epoch_and_puzzles_whole(multi_example_ds):
    root, arr = multi_example_ds
    ds = make(root)
    pi, gi = arr.puzzle_indices, arr.group_indices
    puzzle_of_row = np.searchsorted(pi, np.arange(pi[-1]), side="right") - 1
    group_of_puzzle = np.searchsorted(gi, np.arange(gi[-1]), side="right") - 1
    for epoch in range(4):
        order = ds.epoch_order("all", epoch)
        puzzles = puzzle_of_row[order]
        # one puzzle per group, all of its examples, each once, contiguous
        starts = np.r_[True, puzzles[1:] != puzzles[:-1]]
        chosen = puzzles[starts]
        assert sorted(group_of_puzzle[chosen]) == list(range(len(gi) - 1))
        for p in chosen:
            assert sorted(order[puzzles == p]) == list(range(pi[p], pi[p + 1]))
    # the batches are the epoch order cut into full global batches (drop last)
    batches = [row_ids(b) for _, b, _ in make(root)]
    order0 = ds.epoch_order("all", 0)
    assert len(batches) == len(order0) // 8
    assert np.array_equal(np.concatenate(batches), order0[: len(batches) * 8])


def test_epoch_depends_only_on_seed_and_epoch(multi_example_ds):
    root, _ = multi_example_ds
    a, b = make(root, seed=5), make(root, seed=5)
    assert np.array_equal(a.epoch_order("all", 3), b.epoch_order("all", 3))
    assert not np.array_equal(a.epoch_order("all", 3), a.epoch_order("all", 4))
    assert not np.array_equal(a.epoch_order("all", 3), make(root, seed=6).epoch_order("all", 3))
    state = np.random.get_state()[1].copy()
    list(a)
    assert np.array_equal(np.random.get_state()[1], state)  # the global RNG is never touched


def test_ranks_are_disjoint_and_cover_the_global_batch(multi_example_ds):
    root, _ = multi_example_ds
    full = [row_ids(b) for _, b, _ in make(root, gbs=12, epi=2)]
    per_rank = [[(row_ids(b), b, n) for _, b, n in make(root, gbs=12, rank=r, reps=3, epi=2)] for r in range(3)]
    assert all(len(p) == len(full) for p in per_rank)
    for i, g in enumerate(full):
        parts = [per_rank[r][i][0] for r in range(3)]
        assert all(len(p) == 4 for p in parts) and all(per_rank[r][i][2] == 12 for r in range(3))
        assert np.array_equal(np.concatenate(parts), g)


def test_labels_and_puzzle_ids(multi_example_ds):
    root, arr = multi_example_ds
    for _, b, _ in make(root):
        rows = row_ids(b)
        lab = b["labels"].numpy()
        assert ((lab[:, 1] == IGNORE_LABEL_ID) == (rows % 3 == 0)).all()
        p = np.searchsorted(arr.puzzle_indices, rows, side="right") - 1
        assert np.array_equal(b["puzzle_identifiers"].numpy(), arr.puzzle_identifiers[p])
        assert b["inputs"].dtype == torch.int32


def test_iteration_windows_and_resume(multi_example_ds):
    root, _ = multi_example_ds
    ds = make(root, epi=2)
    first = [row_ids(b) for _, b, _ in ds]
    second = [row_ids(b) for _, b, _ in ds]  # the next iter() continues with epochs 2 and 3
    per_epoch = len(ds.epoch_order("all", 0)) // 8
    ref = make(root, epi=4)
    assert np.array_equal(np.concatenate(first + second), np.concatenate([row_ids(b) for _, b, _ in ref]))
    assert ds.state_dict() == {"epoch": 4, "set_index": 0, "batch": 0}
    # stop mid-window, resume on a fresh object: the very next batch follows
    ds = make(root, epi=2)
    it = iter(ds)
    for _ in range(per_epoch + 1):
        next(it)
    sd = ds.state_dict()
    assert sd == {"epoch": 1, "set_index": 0, "batch": 1}
    resumed = make(root, epi=2)
    resumed.load_state_dict(sd)
    rest = [row_ids(b) for _, b, _ in resumed]
    assert np.array_equal(np.concatenate(rest), np.concatenate(first[per_epoch + 1:]))


def test_loader_with_worker_matches_in_process_and_resumes_exactly(multi_example_ds):
    root, _ = multi_example_ds
    ref = [row_ids(b) for _, b, _ in make(root, epi=3)]
    loader = create_dataloader(make(root, epi=3), prefetch=4, num_workers=1)
    got = []
    for i, (_, b, _) in enumerate(loader):
        got.append(row_ids(b))
        if i == 4:
            break  # the worker has prefetched further; the state must still point at batch 5
    sd = loader.state_dict()
    loader2 = create_dataloader(make(root, epi=3), prefetch=4, num_workers=1)
    loader2.load_state_dict(sd)
    got += [row_ids(b) for _, b, _ in loader2]
    assert len(got) == len(ref)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    assert loader2.state_dict()["epoch"] == 3
    inproc = [row_ids(b) for _, b, _ in create_dataloader(make(root, epi=3), num_workers=0)]
    assert all(np.array_equal(a, b) for a, b in zip(inproc, ref))


def test_test_mode_sequential_with_padded_last_window(multi_example_ds):
    root, arr = multi_example_ds
    n = len(arr.inputs)
    gbs = 10
    out = [(b, k) for _, b, k in make(root, gbs=gbs, test=True)]
    assert [k for _, k in out] == [min(gbs, n - s) for s in range(0, n, gbs)]
    last, k = out[-1]
    assert np.array_equal(row_ids(last)[:k], np.arange(n - k, n))
    assert (last["inputs"][k:] == 0).all() and (last["labels"][k:] == IGNORE_LABEL_ID).all()
    assert (last["puzzle_identifiers"][k:] == 0).all()
    # two ranks: halves of each window, each padded to the local batch
    halves = [[b for _, b, _ in make(root, gbs=gbs, test=True, rank=r, reps=2)] for r in range(2)]
    real = []
    for b0, b1 in zip(*halves):
        for b in (b0, b1):
            keep = b["puzzle_identifiers"].numpy() != 0
            real.append(row_ids(b)[keep])
    assert np.array_equal(np.concatenate(real), np.arange(n))
    # test mode restarts from the beginning on every iter()
    ds = make(root, gbs=gbs, test=True)
    assert len(list(ds)) == len(list(ds)) == len(out)


def test_bad_config_is_a_clear_error(multi_example_ds, tmp_path):
    from dataset.common import DatasetError
    root, _ = multi_example_ds
    with pytest.raises(DatasetError, match="multiple of num_replicas"):
        make(root, gbs=10, reps=3)
    with pytest.raises(DatasetError, match="dataset.json: file not found"):
        make(tmp_path)


def test_batches_per_epoch_is_the_expected_count(multi_example_ds):
    root, arr = multi_example_ds
    ds = make(root, epi=2)
    counts = [len(ds.epoch_order("all", e)) // 8 for e in range(200)]
    assert abs(ds.batches_per_epoch - np.mean(counts)) <= 1
    assert len(ds) == 2 * ds.batches_per_epoch
    assert len(make(root, gbs=10, test=True)) == -(-len(arr.inputs) // 10)
