"""2 ranks under torchrun (gloo, CPU) train the same model as 1 rank at the same global batch.

Halting exploration is switched off here (halt_exploration_prob=0): its draws come from a per-rank
generator seeded from (seed, rank), so with it on, 2 ranks and 1 rank legitimately make different
(equally valid) exploration choices. Everything else (data order, grads, sparse updates) must agree."""
from __future__ import annotations

import pytest
import torch

from trainer_helpers import build_tiny_sudoku, load_step_weights, run_cli, tiny_overrides, train


# TRM: two outer cycles (one under no_grad) and a 2-position prefix on top of the tiny HRM shape.
ARCH_OVERRIDES = {"hrm_v1": [], "trm": ["arch=trm", "arch.H_cycles=2", "arch.puzzle_emb_len=2"]}


@pytest.mark.parametrize("arch", list(ARCH_OVERRIDES))
def test_two_ranks_equal_one_rank(tmp_path, arch):
    data = build_tiny_sudoku(tmp_path / "data")
    common = dict(epochs=3, max_steps=10, log_every=5, checkpoint_every_eval=False)
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["arch.halt_exploration_prob=0"] + ARCH_OVERRIDES[arch]
    ov = tiny_overrides(data, one, **common) + extra
    train(ov)
    ov2 = tiny_overrides(data, two, **common) + extra
    proc = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "pretrain.py", *ov2],
                   timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    a, b = load_step_weights(one / "step_10"), load_step_weights(two / "step_10")
    assert a.keys() == b.keys()
    assert any(".H_level." in k for k in a) == (arch == "hrm_v1")  # the arch really switched
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max |w_2rank - w_1rank| after 10 steps = {worst:.3g}")
    assert worst <= 1e-6, worst
    state = torch.load(two / "step_10" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
