"""Context mode end to end: puzzle_emb_ndim=0 (no prefix, no sparse optimizer) trains and resumes bit-exactly,
2 ranks equal 1 rank, the context embedding's roles/rows/cols, evaluate.py voting on an ARC context set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset import build_arc_dataset as ba
from dataset import build_rules_dataset as br
from dataset import context as cx
from models.layers import context_positions
from data_helpers import arc_task_tree
from trainer_helpers import load_step_weights, run_cli, tiny_overrides, train
from utils.checkpoint import list_step_dirs

CONTEXT_ARCH = ["arch.puzzle_emb_ndim=0", "arch.context_emb=role_grid"]


@pytest.fixture(scope="module")
def rules_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rules") / "ctx"
    br.main(["--output-dir", str(out), "--train-tasks", "32", "--test-tasks", "16", "--min-size", "2", "--max-size",
             "3", "--demos", "2", "--seed", "0"])
    return out


def test_trains_without_puzzle_ids_and_resumes_bit_exactly(rules_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = train(tiny_overrides(rules_data, straight) + CONTEXT_ARCH)  # 96 rows / 16 = 6 steps per epoch
    weights = load_step_weights(straight / "step_12")
    assert not any("puzzle_emb" in k for k in weights) and "model.inner.context_emb.role_emb.embedding_weight" in weights
    state = torch.load(straight / "step_12" / "train_state.pt", weights_only=True)
    assert len(state["optimizers"]) == 1  # no sparse sign-SGD without a puzzle table
    assert result is not None
    train(tiny_overrides(rules_data, killed, max_steps=5) + CONTEXT_ARCH)
    assert [s for s, _ in list_step_dirs(killed)] == [5]
    train(tiny_overrides(rules_data, killed) + CONTEXT_ARCH)
    b = load_step_weights(killed / "step_12")
    assert weights.keys() == b.keys() and all(torch.equal(weights[k], b[k]) for k in weights)


def test_trm_runs_in_context_mode_without_prefix(rules_data, tmp_path):
    """arch=trm with puzzle_emb_ndim=0 and puzzle_emb_len=0: no prefix positions, no puzzle table, one optimizer."""
    run = tmp_path / "trm"
    train(["arch=trm", *tiny_overrides(rules_data, run, epochs=1, max_steps=3), *CONTEXT_ARCH, "arch.puzzle_emb_len=0"])
    weights = load_step_weights(run / "step_3")
    assert not any("puzzle_emb" in k for k in weights) and any("context_emb.row_emb" in k for k in weights)
    assert len(torch.load(run / "step_3" / "train_state.pt", weights_only=True)["optimizers"]) == 1
    carry = torch.load(run / "step_3" / "train_state.pt", weights_only=True)["ranks"][0]["carries"][0]
    seq_len = json.loads((rules_data / "train" / "dataset.json").read_text())["seq_len"]
    assert all(v.shape[1] == seq_len for k, v in carry.items() if v.dim() == 3)  # [B, seq_len, D]: no prefix


def test_two_ranks_equal_one_rank_in_context_mode(rules_data, tmp_path):
    common = dict(epochs=2, max_steps=6, log_every=3, checkpoint_every_eval=False)
    one, two = tmp_path / "one", tmp_path / "two"
    ov = CONTEXT_ARCH + ["arch.halt_exploration_prob=0"]
    train(tiny_overrides(rules_data, one, **common) + ov)
    proc = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "pretrain.py",
                    *tiny_overrides(rules_data, two, **common), *ov], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_step_weights(one / "step_6"), load_step_weights(two / "step_6")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert a.keys() == b.keys() and worst <= 1e-6, worst


def test_context_positions_follow_the_format():
    """Roles, rows and columns from the tokens alone, checked against the decoded grids of a real row."""
    rng = np.random.default_rng(0)
    demos = [(rng.integers(0, 10, (2, 3)), rng.integers(0, 10, (4, 1))), (rng.integers(0, 10, (1, 2)), rng.integers(0, 10, (3, 3)))]
    query, answer = rng.integers(0, 10, (3, 2)), rng.integers(0, 10, (2, 2))
    inputs, _ = cx.encode_context(demos, query, answer, side=4)
    row = np.concatenate([inputs, np.zeros(5, np.uint8)])
    marks = dict(PAD=cx.PAD, ROW=cx.ROW, END=cx.END, IN=cx.IN, OUT=cx.OUT)
    role, r, c = (t[0].numpy() for t in context_positions(torch.from_numpy(row.astype(np.int64))[None], marks))
    expected_role, expected_r, expected_c = [], [], []
    segments = [(1, g) for d in demos for g in d]
    segments = [(1 if i % 2 == 0 else 2, g) for i, (_, g) in enumerate(segments)] + [(3, query), (4, np.zeros((4, 4)))]
    for k, g in segments:
        expected_role.append(k)
        expected_r.append(0)
        expected_c.append(0)  # the marker
        h, w = g.shape
        for i in range(h):
            for j in range(w + 1):  # cells, then the ROW / END separator
                expected_role.append(k)
                expected_r.append(i)
                expected_c.append(j)
    expected_role += [0] * 5
    expected_r += [0] * 5
    expected_c += [0] * 5
    assert role.tolist() == expected_role and r.tolist() == expected_r and c.tolist() == expected_c


def test_context_emb_is_off_by_default_and_leaves_hrm_unchanged():
    from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
    base = dict(batch_size=2, seq_len=16, vocab_size=17, num_puzzle_identifiers=1, puzzle_emb_ndim=0, hidden_size=32,
                num_heads=2, H_layers=1, L_layers=1, forward_dtype="float32")
    plain = HierarchicalReasoningModel_ACTV1(base, generator=torch.Generator().manual_seed(0))
    ctx = HierarchicalReasoningModel_ACTV1({**base, "context_emb": "role"}, generator=torch.Generator().manual_seed(0))
    assert not any("context_emb" in k for k in plain.state_dict())
    extra = set(ctx.state_dict()) - set(plain.state_dict())
    assert extra == {"inner.context_emb.role_emb.embedding_weight"}
    for k, v in plain.state_dict().items():  # the new table is created last: other weights' init unchanged
        assert torch.equal(v, ctx.state_dict()[k]), k
    from utils.schema import ConfigError
    with pytest.raises(ConfigError, match="context_emb"):
        HierarchicalReasoningModel_ACTV1({**base, "context_emb": "roles"})


def test_evaluate_votes_on_an_arc_context_dataset(tmp_path, shared_data):
    """Train 2 steps on an ARC context build of small tasks, then evaluate.py reports pass@K via the
    context voting path and writes a submission for every evaluation task."""
    files = sorted((shared_data / "arc-agi-1" / "training").glob("*.json"))
    small = [f for f in files if max(max(np.array(g).shape) for p in json.loads(f.read_text())["train"] + json.loads(
        f.read_text())["test"] for g in (p["input"], p["output"])) <= 4][:6]
    assert len(small) == 6
    src = arc_task_tree(tmp_path / "src", small[:4], small[4:])
    data = tmp_path / "arc_ctx"
    ba.main(["--mode", "context", "--dataset-dirs", str(src), "--output-dir", str(data), "--num-aug", "3",
             "--answer-side", "4"])
    run = tmp_path / "run"
    train(tiny_overrides(data, run, global_batch_size=4, epochs=1, eval_interval=None, max_steps=2) + CONTEXT_ARCH)
    step = sorted(list_step_dirs(run))[-1][1]
    proc = run_cli(["evaluate.py", f"checkpoint={step}", f"output_dir={tmp_path / 'ev'}", "eval_batch_size=4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["arc/num_tasks"] == 2.0 and 0.0 <= metrics["arc/pass@1"] <= 1.0
    sub = json.loads((tmp_path / "ev" / "submission.json").read_text())
    assert sorted(sub) == sorted(f.stem for f in small[4:])


def test_the_two_recipes_differ_only_in_conditioning():
    from trainer_helpers import compose
    a, b = compose(["experiment=rules_context"]), compose(["experiment=rules_puzzle_id"])
    assert (a.arch["puzzle_emb_ndim"], a.arch["context_emb"]) == (0, "role_grid")
    assert (b.arch["puzzle_emb_ndim"], b.arch["context_emb"]) == (64, "none")
    same = lambda c: ({k: v for k, v in c.arch.items() if k not in ("puzzle_emb_ndim", "context_emb")},  # noqa: E731
                      c.global_batch_size, c.max_steps, c.lr, c.lr_min_ratio, c.lr_warmup_steps, c.seed)
    assert same(a) == same(b)
