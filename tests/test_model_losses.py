"""Losses, ACT head metrics/normalisation, and checkpoint compatibility with the original's state dict."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models.common import CheckpointMismatchError, load_state_dict_strict
from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.losses import (IGNORE_LABEL_ID, ACTLossHead, softmax_cross_entropy, stablemax_cross_entropy)
from utils.schema import ConfigError


def test_stablemax_reference_value():
    logits = torch.tensor([[-2.0, 0.0, 3.0]])
    ce = stablemax_cross_entropy(logits, torch.tensor([2]))
    # s = [1/3, 1, 4] -> p = [0.0625, 0.1875, 0.75]; -log 0.75 = 0.28768
    assert ce.dtype == torch.float64
    assert ce.item() == pytest.approx(0.2877, abs=1e-4)
    assert stablemax_cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(-torch.log(torch.tensor(0.0625)).item(), abs=1e-6)
    assert stablemax_cross_entropy(logits, torch.tensor([IGNORE_LABEL_ID])).item() == 0.0


def test_softmax_ce_matches_log_softmax_and_ignores():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, IGNORE_LABEL_ID]])
    ce = softmax_cross_entropy(logits.bfloat16(), labels)
    assert ce.dtype == torch.float32 and ce.shape == (1, 2)
    assert ce[0, 0].item() == pytest.approx(-torch.log_softmax(logits[0, 0], -1)[1].item(), abs=1e-2)
    assert ce[0, 1].item() == 0.0


class _StubModel(nn.Module):
    """Returns fixed outputs so the head's arithmetic can be checked by hand."""

    def __init__(self, logits, q_halt, q_cont, halted, steps, labels, target=None):
        super().__init__()
        self.out = dict(logits=logits, q_halt_logits=q_halt, q_continue_logits=q_cont)
        if target is not None:
            self.out["target_q_continue"] = target
        self.carry = SimpleNamespace(halted=halted, steps=steps, current_data={"labels": labels})

    def forward(self, carry=None, batch=None):
        return self.carry, dict(self.out)


def test_act_head_sums_rows_and_reports_original_metrics():
    V = 3
    labels = torch.tensor([[0, 1, 2, 2],
                           [1, 1, IGNORE_LABEL_ID, IGNORE_LABEL_ID],
                           [IGNORE_LABEL_ID] * 4])
    pred = torch.tensor([[0, 1, 2, 2],  # all correct
                         [1, 0, 0, 0],  # 1 of 2 valid correct
                         [0, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(pred, V).float() * 4.0
    q_halt = torch.tensor([1.0, -1.0, 2.0])
    q_cont = torch.tensor([0.0, 0.5, 0.0])
    halted = torch.tensor([True, True, True])
    steps = torch.tensor([3, 2, 1], dtype=torch.int32)
    target = torch.tensor([0.2, 0.7, 0.5])
    head = ACTLossHead(_StubModel(logits, q_halt, q_cont, halted, steps, labels, target), "softmax_cross_entropy")
    _, loss, m, outputs, all_halted = head(return_keys=["logits", "nope"], carry=None, batch=None)

    ce = softmax_cross_entropy(logits, labels)
    row_means = ce.sum(-1) / torch.tensor([4.0, 2.0, 1.0])  # empty row divides by 1
    lm_loss = row_means.sum()
    seq_correct = torch.tensor([1.0, 0.0, 1.0])  # all-ignored row counts as correct
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    q_halt_loss = bce(q_halt, seq_correct, reduction="sum")
    q_cont_loss = bce(q_cont, target, reduction="sum")
    assert loss.item() == pytest.approx((lm_loss + 0.5 * (q_halt_loss + q_cont_loss)).item(), rel=1e-6)
    assert m["count"].item() == 2  # row 3 has no labels
    assert m["accuracy"].item() == pytest.approx(1.0 + 0.5)
    assert m["exact_accuracy"].item() == 1
    assert m["q_halt_accuracy"].item() == 2  # row0: 1>=0 & correct; row1: -1<0 & wrong
    assert m["steps"].item() == 5
    assert m["lm_loss"].item() == pytest.approx(lm_loss.item(), rel=1e-6)
    assert m["q_continue_loss"].item() == pytest.approx(q_cont_loss.item(), rel=1e-6)
    assert all(v.dim() == 0 for v in m.values())
    assert list(outputs) == ["logits"] and bool(all_halted)

    # Only halted rows count in metrics; losses still cover every row.
    head.model.carry.halted = torch.tensor([False, True, True])
    _, loss2, m2, _, all_halted2 = head(return_keys=[], carry=None, batch=None)
    assert m2["count"].item() == 1 and m2["exact_accuracy"].item() == 0 and not bool(all_halted2)
    assert loss2.item() == pytest.approx(loss.item())


def test_act_head_rejects_unknown_loss_type():
    with pytest.raises(ConfigError, match="loss_type"):
        ACTLossHead(nn.Identity(), "cross_entropy")


SUDOKU = dict(batch_size=2, seq_len=81, vocab_size=11, num_puzzle_identifiers=1, puzzle_emb_ndim=512,
              H_cycles=2, L_cycles=2, H_layers=4, L_layers=4, hidden_size=512, num_heads=8, expansion=4,
              pos_encodings="rope", halt_max_steps=16, halt_exploration_prob=0.1)


def original_sudoku_state_dict_shapes() -> dict[str, tuple]:
    """Names and shapes of the original's ACTLossHead state dict at the Sudoku shape (issue 3)."""
    shapes = {"model.inner.H_init": (512,), "model.inner.L_init": (512,),
              "model.inner.embed_tokens.embedding_weight": (11, 512), "model.inner.lm_head.weight": (11, 512),
              "model.inner.q_head.weight": (2, 512), "model.inner.q_head.bias": (2,),
              "model.inner.puzzle_emb.weights": (1, 512)}
    for level in ("H_level", "L_level"):
        for i in range(4):
            p = f"model.inner.{level}.layers.{i}."
            shapes[p + "self_attn.qkv_proj.weight"] = (1536, 512)
            shapes[p + "self_attn.o_proj.weight"] = (512, 512)
            shapes[p + "mlp.gate_up_proj.weight"] = (3072, 512)
            shapes[p + "mlp.down_proj.weight"] = (512, 1536)
    return shapes


def test_sudoku_shape_parameter_count_and_names():
    with torch.device("meta"):
        head = ACTLossHead(HierarchicalReasoningModel_ACTV1(SUDOKU), "stablemax_cross_entropy")
    assert sum(p.numel() for p in head.parameters()) == 27_275_266
    sd = head.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == original_sudoku_state_dict_shapes()
    buffers = {n for n, _ in head.named_buffers()} & set(sd)
    assert buffers == {"model.inner.H_init", "model.inner.L_init", "model.inner.puzzle_emb.weights"}


def test_original_state_dict_loads_strictly_with_and_without_compile_prefix():
    cfg = dict(SUDOKU, forward_dtype="float32")
    head = ACTLossHead(HierarchicalReasoningModel_ACTV1(cfg, generator=torch.Generator().manual_seed(0)),
                       "stablemax_cross_entropy")
    g = torch.Generator().manual_seed(1)
    original = {k: torch.randn(s, generator=g) for k, s in original_sudoku_state_dict_shapes().items()}
    load_state_dict_strict(head, original)
    assert torch.equal(head.model.inner.L_level.layers[3].mlp.down_proj.weight,
                       original["model.inner.L_level.layers.3.mlp.down_proj.weight"])
    compiled = {"_orig_mod." + k: v + 1 for k, v in original.items()}
    load_state_dict_strict(head, compiled)
    assert torch.equal(head.model.inner.H_init, original["model.inner.H_init"] + 1)

    wrong = dict(original)
    wrong["model.inner.puzzle_emb.weights"] = torch.zeros(1_000, 512)
    with pytest.raises(CheckpointMismatchError,
                       match=r"'model.inner.puzzle_emb.weights' has shape \[1000, 512\], model expects \[1, 512\]"):
        load_state_dict_strict(head, wrong)
    missing = {k: v for k, v in original.items() if k != "model.inner.q_head.bias"}
    with pytest.raises(CheckpointMismatchError, match="missing key 'model.inner.q_head.bias'"):
        load_state_dict_strict(head, missing)
    with pytest.raises(CheckpointMismatchError, match="unexpected key 'model.inner.extra'"):
        load_state_dict_strict(head, dict(original, **{"model.inner.extra": torch.zeros(3)}))
