"""Optimizers and LR schedules by name; the original's warmup + cosine schedule; grad accumulation."""
from __future__ import annotations

import math

import pytest
import torch

from trainer_helpers import build_tiny_sudoku, load_step_weights, tiny_overrides, train
from utils.optim import build_optimizer, build_scheduler, cosine_warmup_factor
from utils.schema import ConfigError


def test_cosine_warmup_matches_the_original_formula():
    # warmup: base * step / warmup, first optimizer step = step 1
    assert cosine_warmup_factor(1, 10, 100, 1.0) == pytest.approx(0.1)
    assert cosine_warmup_factor(10, 10, 100, 1.0) == 1.0
    assert cosine_warmup_factor(90, 10, 100, 1.0) == 1.0  # min_ratio 1: constant after warmup (the default)
    assert cosine_warmup_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_warmup_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_scheduler_sets_step_one_lr_before_the_first_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    sched = build_scheduler(opt, "cosine_warmup", {}, base_lr=2e-3, warmup_steps=4, total_steps=20, min_ratio=0.1)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 16)))])


def test_optimizers_and_schedulers_by_name():
    p = torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer([p], "lion", 1e-3, (0.9, 0.99), 0.0, {})
    assert type(opt).__name__ == "Lion" and opt.param_groups[0]["betas"] == (0.9, 0.99)
    opt = build_optimizer([p], "adamw", 1e-3, (0.9, 0.95), 0.1, {"eps": 1e-6})
    assert opt.param_groups[0]["eps"] == 1e-6 and opt.param_groups[0]["weight_decay"] == 0.1
    sched = build_scheduler(opt, "cosine", {}, base_lr=1e-3, warmup_steps=0, total_steps=10, min_ratio=0.0)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-4  # decayed over total_steps, filled in automatically
    with pytest.raises(ConfigError, match="unknown optimizer.name 'adamww' did you mean 'adamw'"):
        build_optimizer([p], "adamww", 1e-3, (0.9, 0.95), 0.0, {})
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.kwargs.epz'"):
        build_optimizer([p], "adamw", 1e-3, (0.9, 0.95), 0.0, {"epz": 1e-6})
    with pytest.raises(ConfigError, match="unknown lr_scheduler.name 'cosin'"):
        build_scheduler(opt, "cosin", {}, base_lr=1e-3, warmup_steps=0, total_steps=10, min_ratio=0.0)


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    """2 micro-batches of 8 == 1 batch of 16 (dense grads and the sparse puzzle-embedding update)."""
    data = build_tiny_sudoku(tmp_path / "data")
    common = dict(max_steps=4, epochs=1, **{"arch.halt_exploration_prob": 0})
    train(tiny_overrides(data, tmp_path / "full", **common))
    train(tiny_overrides(data, tmp_path / "accum", grad_accum_steps=2, **common))
    a, b = load_step_weights(tmp_path / "full" / "step_4"), load_step_weights(tmp_path / "accum" / "step_4")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert not torch.equal(a["model.inner.puzzle_emb.weights"], torch.zeros_like(a["model.inner.puzzle_emb.weights"]))


def test_other_optimizer_trains_end_to_end(tmp_path):
    data = build_tiny_sudoku(tmp_path / "data")
    summary = train(tiny_overrides(data, tmp_path / "r", epochs=1, **{"optimizer.name": "adamw",
                                                                     "lr_scheduler.name": "linear"}))
    assert summary["step"] == 4 and "eval/accuracy" in summary
