"""LMDataset / LMDataLoader: exact batches, masks and labels, sharding, resume."""
import json

import numpy as np
import pytest
import torch

from dataset import build_lm_dataset as B
from dataset.lm_tokenizer import LMDataError
from lm_dataset import LMDataset, LMDatasetConfig, create_dataloader

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """10 train examples i = prompt [10+i]*(1 + i%3), target [40+i]*(i%4); 5 validation examples."""
    root = tmp_path_factory.mktemp("tiny")
    src = root / "src"
    src.mkdir()
    (src / "meta.json").write_text(json.dumps({"vocab_size": 64, "pad_id": PAD, "bos_id": BOS, "eos_id": EOS}))
    for split, n, off in (("train", 10, 0), ("validation", 5, 20)):
        rows = []
        for i in range(off, off + n):
            t = [40 + i % 20] * (i % 4)
            rows.append({"encoder_ids": [10 + i] * (1 + i % 3), "decoder_input_ids": [BOS] + t, "labels": t + [EOS]})
        (src / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    B.main(["--source", str(src), "--output-dir", str(root / "ds"), "--mode", "triples"])
    return root / "ds"


def cfg(path, **kw):
    base = dict(seed=5, dataset_path=str(path), global_batch_size=4, test_set_mode=False, epochs_per_iter=1,
                rank=0, num_replicas=1)
    return LMDatasetConfig(**(base | kw))


def test_validation_batches_exact(tiny):
    ds = LMDataset(cfg(tiny, test_set_mode=True), "validation")
    assert ds.metadata.vocab_size == 64 and ds.metadata.bos_id == BOS
    assert (ds.metadata.max_prompt_len, ds.metadata.max_decoder_len) == (3, 4)
    batches = list(ds)
    assert [g for _, _, g in batches] == [4, 1]
    name, b, _ = batches[0]
    assert name == "all"
    # examples 20..23: prompts [30]*3, [31]*1, [32]*2, [33]*3; targets [40]*0, [41]*1, [42]*2, [43]*3
    assert b["encoder_ids"].dtype == torch.int64 and b["encoder_mask"].dtype == torch.bool
    assert b["encoder_ids"].tolist() == [[30, 30, 30], [31, 0, 0], [32, 32, 0], [33, 33, 33]]
    assert b["encoder_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert b["decoder_input_ids"].tolist() == [[1, 0, 0, 0], [1, 41, 0, 0], [1, 42, 42, 0], [1, 43, 43, 43]]
    assert b["labels"].tolist() == [[2, -100, -100, -100], [41, 2, -100, -100], [42, 42, 2, -100], [43, 43, 43, 2]]
    assert b["decoder_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    # final window: 1 real row (example 24, prompt [34]*1, target [44]*0), padded per batch to length 1
    _, b, _ = batches[1]
    assert b["encoder_ids"].tolist() == [[34], [0], [0], [0]]
    assert b["encoder_mask"].tolist() == [[True], [False], [False], [False]]
    assert b["labels"].tolist() == [[2], [-100], [-100], [-100]]
    assert b["decoder_mask"].sum().item() == 1
    assert list(ds)[0][1]["encoder_ids"].tolist() == batches[0][1]["encoder_ids"].tolist()  # a new pass


def test_train_epochs_seeded_drop_last_and_rank_slices(tiny):
    ds = LMDataset(cfg(tiny, epochs_per_iter=2), "train")
    batches = [b for _, b, g in ds]
    assert len(batches) == 2 * (10 // 4)  # drop-last, two epochs per iter()
    firsts = [b["encoder_ids"][:, 0] - 10 for b in batches]  # example index of each row
    for e in range(2):
        perm = np.random.default_rng([5, e]).permutation(10)
        assert torch.cat(firsts[2 * e:2 * e + 2]).tolist() == perm[:8].tolist()
    # labels agree with decoder inputs shifted by one
    for b in batches:
        m = b["decoder_mask"]
        assert torch.equal(b["labels"][:, :-1][m[:, 1:]], b["decoder_input_ids"][:, 1:][m[:, 1:]])
        assert ((b["labels"] == -100) == ~m).all()
    # two replicas: rank r gets rows [2r, 2r+2) of the same global batch
    shards = [list(LMDataset(cfg(tiny, epochs_per_iter=2, rank=r, num_replicas=2), "train")) for r in range(2)]
    for k, full in enumerate(firsts):
        got = torch.cat([shards[r][k][1]["encoder_ids"][:, 0] - 10 for r in range(2)])
        assert got.tolist() == full.tolist() and shards[0][k][2] == 4


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_resume_is_exact(tiny, num_workers):
    def rows(batch):
        return batch["encoder_ids"][:, 0].tolist()

    ref_ds = LMDataset(cfg(tiny, epochs_per_iter=3), "train")
    ref = [rows(b) for _, b, _ in ref_ds]  # 6 batches over epochs 0..2
    loader = create_dataloader(LMDataset(cfg(tiny, epochs_per_iter=3), "train"), prefetch=4, num_workers=num_workers)
    got = []
    for _, b, _ in loader:
        got.append(rows(b))
        if len(got) == 3:
            break  # the worker has prefetched further; the state must not count that
    state = loader.state_dict()
    assert state == {"epoch": 1, "batch": 1}
    fresh = create_dataloader(LMDataset(cfg(tiny, epochs_per_iter=3), "train"), num_workers=num_workers)
    fresh.load_state_dict(state)
    got += [rows(b) for _, b, _ in fresh]
    assert got == ref
    assert fresh.state_dict() == {"epoch": 3, "batch": 0}


def test_truncation_and_bad_config(tiny):
    ds = LMDataset(cfg(tiny, test_set_mode=True, max_prompt_len=2, max_target_len=1), "validation")
    _, b, _ = next(iter(ds))
    assert b["encoder_ids"].shape == (4, 2) and b["labels"][3].tolist() == [43, 2]
    assert ds.metadata.seq_len == 2
    with pytest.raises(LMDataError, match="not divisible"):
        LMDataset(cfg(tiny, global_batch_size=3, num_replicas=2), "train")
    with pytest.raises(LMDataError, match="fewer than global_batch_size"):
        LMDataset(cfg(tiny, global_batch_size=16), "train")
    with pytest.raises(LMDataError, match="split 'test' has no examples"):
        LMDataset(cfg(tiny, test_set_mode=True), "test")
    with pytest.raises(LMDataError, match="meta.json: not found"):
        LMDataset(cfg(tiny.parent / "nothing"), "train")
    ds = LMDataset(cfg(tiny), "train")
    with pytest.raises(LMDataError, match="state must be"):
        ds.load_state_dict({"batch": 1})


def test_puzzle_dataloader_protocol(tiny):
    """DATA's process-based loader runs an LMDataset too (pickled as paths), with the same exact resume."""
    import pickle

    from puzzle_dataset import create_dataloader as create_puzzle_dataloader

    ds = LMDataset(cfg(tiny, epochs_per_iter=2), "train")
    assert len(pickle.dumps(ds)) < 4000  # no token arrays inside
    ref = [b["encoder_ids"][:, 0].tolist() for _, b, _ in LMDataset(cfg(tiny, epochs_per_iter=2), "train")]
    loader = create_puzzle_dataloader(ds, prefetch=2, num_workers=1)
    assert len(loader) == 4
    got = []
    for _, b, _ in loader:
        got.append(b["encoder_ids"][:, 0].tolist())
        if len(got) == 1:
            break
    resumed = create_puzzle_dataloader(LMDataset(cfg(tiny, epochs_per_iter=2), "train"), num_workers=1)
    resumed.load_state_dict(loader.state_dict())
    got += [b["encoder_ids"][:, 0].tolist() for _, b, _ in resumed]
    assert got == ref and resumed.state_dict() == {"epoch": 2, "batch": 0}


def test_validate_finds_token_ids_beyond_vocab(tiny, tmp_path):
    import shutil

    from lm_dataset import validate_lm_dataset

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    assert validate_lm_dataset(bad)["vocab_size"] == 64
    arr = np.load(bad / "train" / "target_tokens.npy", mmap_mode="r+")
    arr[3] = 64
    arr.flush()
    del arr
    with pytest.raises(LMDataError, match=r"train/target_tokens.npy: token id 64 at position 3 >= vocab_size 64"):
        validate_lm_dataset(bad)
