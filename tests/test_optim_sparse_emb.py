"""Sparse puzzle embedding and its sign-SGD: formula with duplicate ids, single process vs 2-rank gloo."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.sparse_embedding import CastedSparseEmbedding, CastedSparseEmbeddingSignSGD_Distributed

NUM, DIM, LR, WD = 6, 4, 0.01, 0.5


def _emb(batch_size, seed=0):
    emb = CastedSparseEmbedding(NUM, DIM, batch_size=batch_size, init_std=0, cast_to=torch.float32)
    with torch.no_grad():
        emb.weights.copy_(torch.randn(NUM, DIM, generator=torch.Generator().manual_seed(seed)))
    return emb


def _step(emb, ids, upstream, world_size=1):
    emb.train()
    opt = CastedSparseEmbeddingSignSGD_Distributed(emb.buffers(), world_size=world_size, lr=LR, weight_decay=WD)
    out = emb(ids)
    (out * upstream).sum().backward()
    opt.step()
    opt.zero_grad()


def _data():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([2, 0, 2, 5, 2, 0, 3, 3], dtype=torch.int32)  # duplicates of 2, 0, 3
    upstream = torch.randn(8, DIM, generator=g)
    return ids, upstream


def test_eval_reads_table_train_uses_local_leaf():
    emb = _emb(3)
    ids = torch.tensor([1, 4, 1], dtype=torch.int32)
    emb.eval()
    assert torch.equal(emb(ids), emb.weights[ids.long()])
    emb.train()
    out = emb(ids)
    assert torch.equal(out, emb.weights[ids.long()]) and out.requires_grad
    assert emb.local_weights.is_leaf and torch.equal(emb.local_ids, ids)
    assert set(emb.state_dict()) == {"weights"}


def test_signsgd_matches_formula_with_duplicate_ids():
    ids, upstream = _data()
    emb = _emb(8)
    before = emb.weights.clone()
    _step(emb, ids, upstream)
    expected = before.clone()
    for i in ids.unique().tolist():
        summed = upstream[ids == i].sum(0)
        expected[i] = before[i] * (1 - LR * WD) - LR * torch.sign(summed)
    assert torch.allclose(emb.weights, expected, atol=1e-7)
    untouched = [i for i in range(NUM) if i not in ids.tolist()]
    assert torch.equal(emb.weights[untouched], before[untouched])  # no decay on rows not in the batch
    # Duplicates are summed BEFORE the sign: id 2 appears 3x, moves by exactly lr per coordinate.
    assert torch.allclose((expected[2] - before[2] * (1 - LR * WD)).abs(), torch.full((DIM,), LR))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, ids, upstream, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        half = ids.shape[0] // world_size
        emb = _emb(half)
        sl = slice(rank * half, (rank + 1) * half)
        _step(emb, ids[sl], upstream[sl], world_size=world_size)
        if rank == 0:
            torch.save(emb.weights, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_equals_single_process(tmp_path):
    ids, upstream = _data()
    single = _emb(8)
    _step(single, ids, upstream)
    out_path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), ids, upstream, out_path), nprocs=2, join=True)
    assert torch.equal(torch.load(out_path), single.weights)


def test_optimizer_requires_the_three_buffers():
    with pytest.raises(ValueError, match="3 buffers"):
        CastedSparseEmbeddingSignSGD_Distributed([torch.zeros(2)], world_size=1, lr=0.1)


def test_training_batch_must_match_buffer_size():
    emb = _emb(4)
    emb.train()
    with pytest.raises(ValueError, match="batch_size=4"):
        emb(torch.zeros(3, dtype=torch.int32))
    emb.eval()
    assert emb(torch.zeros(3, dtype=torch.int32)).shape == (3, DIM)  # eval accepts any batch (padded test windows)
