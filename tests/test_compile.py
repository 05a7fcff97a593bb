"""compile=true (utils/modeling.py compile_blocks): compiled and eager HRM/TRM steps agree within the stated
tolerance, and a train -> eval (another batch size) -> train cycle compiles nothing new (torch._dynamo's
counters; recompiles made errors). compile=auto's rule. The bf16 warning appears exactly without native bf16."""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.losses import ACTLossHead
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from utils.modeling import (COMPILE_AUTO_MIN_STEPS, bf16_cpu_warning, compile_blocks, compile_decision,
                            native_bf16_cpu)

# Stated tolerance of compiled vs eager in fp32 (inductor fuses the element-wise work and may reorder the
# rms_norm/softmax reductions, so results differ in the last bits and the differences grow over steps):
# after 3 optimizer steps, losses within 1e-5 relative and logits/gradients within 1e-4 of their scale.
LOSS_RTOL, TENSOR_TOL = 1e-5, 1e-4
# B == D on purpose: the CPU demo's batch 64 equals its hidden 64, which once pinned the batch dim (duck shaping).
B, L, V, D = 32, 16, 6, 32


def make_head(arch: str) -> ACTLossHead:
    cfg = dict(batch_size=B, seq_len=L, vocab_size=V, num_puzzle_identifiers=3, puzzle_emb_ndim=D, H_cycles=2,
               L_cycles=2, H_layers=1, L_layers=1, hidden_size=D, num_heads=2, expansion=4, halt_max_steps=3,
               halt_exploration_prob=0.0, forward_dtype="float32")
    cls = HierarchicalReasoningModel_ACTV1 if arch == "hrm" else TinyRecursiveReasoningModel_ACTV1
    if arch == "trm":
        cfg.update(puzzle_emb_len=2, L_layers=2)
    model = cls(cfg, generator=torch.Generator().manual_seed(0))
    model.set_generator(torch.Generator().manual_seed(0))
    return ACTLossHead(model, "stablemax_cross_entropy")


def make_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(1, V, (n, L), generator=g, dtype=torch.int32),
            "labels": torch.randint(1, V, (n, L), generator=g, dtype=torch.int32),
            "puzzle_identifiers": torch.randint(0, 3, (n,), generator=g, dtype=torch.int32)}


def train_steps(head, carry, n):
    """n SGD steps on fixed batches; returns (carry, losses, last grads)."""
    losses, grads = [], {}
    for i in range(n):
        head.train()
        carry, loss, _, _, _ = head(return_keys=[], carry=carry, batch=make_batch(B, i))
        head.zero_grad(set_to_none=True)
        (loss / B).backward()
        grads = {k: p.grad.clone() for k, p in head.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in head.parameters():
                if p.grad is not None:
                    p -= 1e-2 * p.grad
        losses.append(loss.detach())
    return carry, losses, grads


def eval_logits(head, n):
    head.eval()
    batch = make_batch(n, 99)
    with torch.no_grad():
        carry = head.initial_carry(batch)
        for _ in range(3):  # halt_max_steps segments
            carry, _, _, out, _ = head(return_keys=["logits"], carry=carry, batch=batch)
    return out["logits"]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TENSOR_TOL * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("arch", ["hrm", "trm"])
def test_compiled_step_matches_eager_and_train_eval_train_never_recompiles(arch):
    torch._dynamo.reset()
    counters.clear()
    eager = make_head(arch)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2  # HRM: 1 H + 1 L block; TRM: its 2-block network
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # names unchanged (no _orig_mod.)

    c_e, losses_e, grads_e = train_steps(eager, eager.initial_carry(make_batch(B, 0)), 3)
    c_c, losses_c, grads_c = train_steps(compiled, compiled.initial_carry(make_batch(B, 0)), 3)
    for le, lc in zip(losses_e, losses_c):
        assert abs(le.item() - lc.item()) <= LOSS_RTOL * abs(le.item())
    assert grads_e.keys() == grads_c.keys()
    for k in grads_e:
        assert close(grads_c[k], grads_e[k]), k
    assert close(eval_logits(compiled, 5), eval_logits(eager, 5))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # one with grad, one under no_grad, shared by every block and update

    # train -> eval at another batch size (and a short last batch) -> train: nothing compiles again.
    with torch._dynamo.config.patch(error_on_recompile=True):
        c_c, _, _ = train_steps(compiled, c_c, 1)
        eval_logits(compiled, 3)
        eval_logits(compiled, 11)
        train_steps(compiled, c_c, 1)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["recompiles"]


def test_compile_auto_rule():
    cpu = torch.device("cpu")
    assert compile_decision(True, cpu, 1) == (True, "compile=true")
    assert compile_decision(False, cpu, 10 ** 6) == (False, "compile=false")
    assert not compile_decision("auto", cpu, COMPILE_AUTO_MIN_STEPS - 1)[0]
    assert compile_decision("auto", cpu, COMPILE_AUTO_MIN_STEPS)[0]  # g++ is on PATH here


@pytest.mark.parametrize("flags, native", [("avx512f avx512bw", False), ("avx512f avx512_bf16", True),
                                           ("amx_tile amx_bf16", True), ("", False)])
def test_bf16_warning_exactly_without_native_bf16(fake_cpuinfo, flags, native):
    info = fake_cpuinfo(flags=flags)
    assert native_bf16_cpu(info) is native
    cpu = torch.device("cpu")
    for mp, fd in [("bf16", "float32"), ("none", "bfloat16"), ("bf16", "bfloat16")]:
        msg = bf16_cpu_warning(cpu, mp, fd, cpuinfo=info)
        assert (msg is None) == native
        if msg:
            assert "\n" not in msg and "without native bf16" in msg
    assert bf16_cpu_warning(cpu, "none", "float32", cpuinfo=info) is None  # bf16 not chosen
    assert bf16_cpu_warning(torch.device("cuda"), "bf16", "bfloat16", cpuinfo=info) is None


def test_bf16_detection_on_this_machine():
    flags = open("/proc/cpuinfo").read()
    assert native_bf16_cpu() is (" avx512_bf16" in flags or " amx_bf16" in flags)
