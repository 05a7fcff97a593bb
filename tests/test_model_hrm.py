"""HRM ACT v1: 1-step gradient, Q-head init, ACT halting, eval segments, gating switch, dtypes, no host syncs."""
import pytest
import torch

from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1, HierarchicalReasoningModel_ACTV1Config
from models.losses import ACTLossHead
from utils.functions import load_model_class
from utils.schema import ConfigError

B, L, V = 4, 9, 11


def tiny_config(**overrides):
    cfg = dict(batch_size=B, seq_len=L, vocab_size=V, num_puzzle_identifiers=3, puzzle_emb_ndim=32,
               H_cycles=2, L_cycles=3, H_layers=1, L_layers=2, hidden_size=32, num_heads=2, expansion=4,
               halt_max_steps=4, halt_exploration_prob=0.0, forward_dtype="float32", attn_backend="sdpa")
    cfg.update(overrides)
    return cfg


def make_model(seed=0, **overrides):
    return HierarchicalReasoningModel_ACTV1(tiny_config(**overrides), generator=torch.Generator().manual_seed(seed))


def make_batch(seed=0, batch_size=B):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(0, V, (batch_size, L), generator=g, dtype=torch.int32),
            "labels": torch.randint(0, V, (batch_size, L), generator=g, dtype=torch.int32),
            "puzzle_identifiers": torch.randint(0, 3, (batch_size,), generator=g, dtype=torch.int32)}


def test_name_resolves_and_config_is_strict():
    cls = load_model_class("hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1")
    assert cls is HierarchicalReasoningModel_ACTV1
    assert cls.config_class is HierarchicalReasoningModel_ACTV1Config
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        HierarchicalReasoningModel_ACTV1(tiny_config(hiden_size=32))
    with pytest.raises(ConfigError, match="pos_encodings"):
        HierarchicalReasoningModel_ACTV1(tiny_config(pos_encodings="alibi"))
    with pytest.raises(ConfigError, match="divisible"):
        HierarchicalReasoningModel_ACTV1(tiny_config(num_heads=3))


def test_q_head_init_and_fixed_init_states():
    m = make_model()
    assert torch.all(m.inner.q_head.weight == 0)
    assert torch.all(m.inner.q_head.bias == -5)
    assert isinstance(m.inner.H_init, torch.Tensor) and not m.inner.H_init.requires_grad
    assert "inner.H_init" in m.state_dict() and "inner.H_init" not in dict(m.named_parameters())
    assert torch.all(m.puzzle_emb.weights == 0)
    # Same generator seed -> same weights; different seed -> different weights.
    assert torch.equal(make_model(1).inner.L_level.layers[0].mlp.down_proj.weight,
                       make_model(1).inner.L_level.layers[0].mlp.down_proj.weight)
    assert not torch.equal(make_model(1).inner.lm_head.weight, make_model(2).inner.lm_head.weight)


def _reference_segment(inner, z_H, z_L, batch, detach_all_but_last: bool):
    """The segment written out by hand; with detach_all_but_last every call except the final L and
    H call is cut from the graph (what the model's no_grad loop must be equivalent to)."""
    cfg = inner.config
    cos_sin = inner.rotary_emb()
    x = inner._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    calls = [("L", h, l) for h in range(cfg.H_cycles) for l in range(cfg.L_cycles)]
    order = []
    for h in range(cfg.H_cycles):
        order += [("L", h, l) for l in range(cfg.L_cycles)] + [("H", h, None)]
    last_L, last_H = calls[-1], ("H", cfg.H_cycles - 1, None)
    for call in order:
        if call[0] == "L":
            z_L = inner.L_level(z_L, z_H + x, cos_sin=cos_sin)
            if detach_all_but_last and call != last_L:
                z_L = z_L.detach()
        else:
            z_H = inner.H_level(z_H, z_L, cos_sin=cos_sin)
            if detach_all_but_last and call != last_H:
                z_H = z_H.detach()
    return inner.lm_head(z_H)[:, inner.puzzle_emb_len:], inner.q_head(z_H[:, 0])


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    model.puzzle_emb.local_weights.grad = None
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["puzzle_local"] = model.puzzle_emb.local_weights.grad.clone()
    return out


def test_one_step_gradient_only_last_L_and_H_calls():
    m = make_model()
    m.train()
    batch = make_batch()
    carry = m.inner.reset_carry(torch.ones(B, dtype=torch.bool), m.inner.empty_carry(B))

    # Count module calls that build autograd graph: exactly one L-call and one H-call per segment.
    graph_calls = {"L": 0, "H": 0}
    hooks = [m.inner.L_level.register_forward_hook(lambda mod, i, o: graph_calls.__setitem__("L", graph_calls["L"] + int(o.requires_grad))),
             m.inner.H_level.register_forward_hook(lambda mod, i, o: graph_calls.__setitem__("H", graph_calls["H"] + int(o.requires_grad)))]
    _, logits, (q_halt, q_cont), _ = m.inner(carry, batch)
    for h in hooks:
        h.remove()
    assert graph_calls == {"L": 1, "H": 1}

    weight = torch.linspace(-1, 1, V)
    loss = (logits * weight).sum() + q_halt.sum() - 2 * q_cont.sum()
    got = _grads(m, loss)

    ref_logits, ref_q = _reference_segment(m.inner, carry.z_H, carry.z_L, batch, detach_all_but_last=True)
    assert torch.allclose(ref_logits, logits, atol=1e-5)
    ref = _grads(m, (ref_logits * weight).sum() + ref_q[:, 0].sum() - 2 * ref_q[:, 1].sum())
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.allclose(got[name], ref[name], atol=1e-5, rtol=1e-4), name

    # Full backprop through all calls gives different gradients: the test can tell them apart.
    full_logits, full_q = _reference_segment(m.inner, carry.z_H, carry.z_L, batch, detach_all_but_last=False)
    full = _grads(m, (full_logits * weight).sum() + full_q[:, 0].sum() - 2 * full_q[:, 1].sum())
    name = "inner.L_level.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(full[name], got[name], atol=1e-4)


def test_carry_is_detached_between_segments():
    m = make_model()
    m.train()
    batch = make_batch()
    carry = m.initial_carry(batch)
    carry, _ = m(carry, batch)
    assert not carry.inner_carry.z_H.requires_grad and not carry.inner_carry.z_L.requires_grad


def _run_until_all_halted(m, batch, max_calls=50):
    carry = m.initial_carry(batch)
    halted_at = []
    for call in range(1, max_calls + 1):
        carry, _ = m(carry, batch)
        halted_at.append(carry.halted.clone())
        if carry.halted.all():
            return call, carry, halted_at
    return None, carry, halted_at


def test_eval_runs_exactly_halt_max_steps_segments():
    m = make_model(halt_max_steps=5)
    m.eval()
    with torch.no_grad():
        # Even a Q-head that says "halt now" is ignored in eval.
        m.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
        calls, carry, halted = _run_until_all_halted(m, make_batch())
    assert calls == 5
    assert not any(h.any() for h in halted[:-1])
    assert torch.all(carry.steps == 5)


def test_training_halts_when_q_halt_exceeds_q_continue():
    m = make_model(halt_max_steps=6)
    m.train()
    batch = make_batch()
    with torch.no_grad():
        m.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))  # q_halt > q_continue everywhere
    carry, outputs = m(m.initial_carry(batch), batch)
    assert carry.halted.all() and torch.all(carry.steps == 1)
    assert "target_q_continue" in outputs
    with torch.no_grad():
        m.inner.q_head.bias.copy_(torch.tensor([-5.0, 5.0]))  # never prefers halting
    calls, carry, _ = _run_until_all_halted(m, batch)
    assert calls == 6  # max steps still halts


def test_exploration_only_delays_halting_and_is_seeded():
    m = make_model(halt_max_steps=6, halt_exploration_prob=1.0)
    m.train()
    batch = make_batch(batch_size=B)
    with torch.no_grad():
        m.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
    m.set_generator(torch.Generator().manual_seed(3))
    carry = m.initial_carry(batch)
    carry, _ = m(carry, batch)
    assert not carry.halted.any()  # every row drew a minimum of >= 2 steps
    first_halt = torch.zeros(B, dtype=torch.int32)
    for _ in range(6):
        carry, _ = m(carry, batch)
        first_halt = torch.where((first_halt == 0) & carry.halted, carry.steps, first_halt)
        if carry.halted.all():
            break
    assert torch.all(first_halt >= 2) and torch.all(first_halt <= 6)

    # Without Q preference, exploration never forces a halt before the last step.
    with torch.no_grad():
        m.inner.q_head.bias.copy_(torch.tensor([-5.0, 5.0]))
    calls, _, halted = _run_until_all_halted(m, batch)
    assert calls == 6 and not any(h.any() for h in halted[:-1])

    def halting_trace(seed):
        mm = make_model(halt_max_steps=8, halt_exploration_prob=0.5)
        mm.train()
        with torch.no_grad():
            mm.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
        mm.set_generator(torch.Generator().manual_seed(seed))
        return torch.stack(_run_until_all_halted(mm, make_batch(batch_size=B))[2][:3])

    assert torch.equal(halting_trace(11), halting_trace(11))


def test_halted_rows_reload_and_running_rows_keep_their_data():
    m = make_model(halt_max_steps=3)
    m.eval()
    b1, b2 = make_batch(1), make_batch(2)
    with torch.no_grad():
        carry = m.initial_carry(b1)
        carry, _ = m(carry, b1)
        carry.halted = torch.tensor([True, False, True, False])
        carry, _ = m(carry, b2)
    assert torch.equal(carry.current_data["inputs"][0], b2["inputs"][0])
    assert torch.equal(carry.current_data["inputs"][1], b1["inputs"][1])
    assert carry.steps.tolist() == [1, 2, 1, 2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_forward_backward_cpu(dtype):
    m = make_model(forward_dtype=dtype, halt_exploration_prob=0.1)
    head = ACTLossHead(m, "stablemax_cross_entropy")
    head.train()
    batch = make_batch()
    carry = head.initial_carry(batch)
    for _ in range(2):
        carry, loss, metrics, outputs, all_halted = head(return_keys=["logits"], carry=carry, batch=batch)
        assert outputs["logits"].dtype == getattr(torch, dtype)
        assert torch.isfinite(loss)
        head.zero_grad()
        loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.puzzle_emb.local_weights.grad.abs().sum() > 0
    assert m.inner.lm_head.weight.grad.abs().sum() > 0


def test_use_gating_false_is_hrm_v1_and_gating_adds_only_gates():
    base = make_model(seed=5)
    off = make_model(seed=5, use_gating=False, gate_hidden_ratio=0.5, gate_init_bias=1.0)
    on = make_model(seed=5, use_gating=True)
    assert list(base.state_dict()) == list(off.state_dict())
    for k, v in base.state_dict().items():
        assert torch.equal(v, off.state_dict()[k])
        assert torch.equal(v, on.state_dict()[k])  # gates are created last: other weights unchanged
    extra = set(on.state_dict()) - set(base.state_dict())
    assert extra and all(".gate." in k for k in extra)
    # H gate has two inputs (no dead injection gate), L gate three.
    assert on.inner.H_level.gate.fc_out.weight.shape[0] == 2 * 32
    assert on.inner.L_level.gate.fc_out.weight.shape[0] == 3 * 32

    batch = make_batch()
    for m in (base, off, on):
        m.train()
        m.set_generator(torch.Generator().manual_seed(0))
    c0, o0 = base(base.initial_carry(batch), batch)
    c1, o1 = off(off.initial_carry(batch), batch)
    assert torch.equal(o0["logits"], o1["logits"]) and torch.equal(o0["target_q_continue"], o1["target_q_continue"])
    assert not any(k.startswith("gate/") for k in o1)
    _, o2 = on(on.initial_carry(batch), batch)
    assert not torch.allclose(o0["logits"], o2["logits"])
    # Gate statistics: biases of -2.2 put gates near sigmoid(-2.2) = 0.10 at init.
    for mod in ("L", "H"):
        assert 0.05 < o2[f"gate/{mod}/mean"].item() < 0.2
        assert o2[f"gate/{mod}/min"] <= o2[f"gate/{mod}/mean"] <= o2[f"gate/{mod}/max"]
        assert 0.0 <= o2[f"gate/{mod}/frac_lt_0.1"].item() <= 1.0
        assert o2[f"gate/{mod}/frac_gt_0.9"].dim() == 0
    assert "gate/H/x_mean" not in o2 and "gate/L/x_mean" in o2


def test_forward_and_loss_need_no_host_sync():
    """On the meta device any .item()/.cpu()/tensor-valued Python branch would raise."""
    cfg = tiny_config(use_gating=True, halt_exploration_prob=0.5)
    with torch.device("meta"):
        m = HierarchicalReasoningModel_ACTV1(cfg)
        head = ACTLossHead(m, "stablemax_cross_entropy")
    head.train()
    m.set_generator(torch.Generator().manual_seed(0))  # CPU draws, copied to the model's device
    batch = {k: v.to("meta") for k, v in make_batch().items()}
    carry = head.initial_carry(batch)
    carry, loss, metrics, _, all_halted = head(return_keys=["logits"], carry=carry, batch=batch)
    assert loss.device.type == "meta" and all_halted.device.type == "meta"
    assert all(v.device.type == "meta" and v.dim() == 0 for v in metrics.values())
    head.eval()
    head(return_keys=[], carry=carry, batch=batch)


def test_estimate_flops_counts_target_q_and_backward():
    m = make_model(halt_max_steps=4)
    one = make_model(halt_max_steps=1)
    assert m.estimate_flops(8) > one.estimate_flops(8) > 0
    assert m.estimate_flops(16) == pytest.approx(2 * m.estimate_flops(8), rel=1e-6)


def test_learned_positions_and_no_puzzle_embedding():
    m = make_model(pos_encodings="learned", puzzle_emb_ndim=0)
    assert m.puzzle_emb is None and m.inner.puzzle_emb_len == 0
    assert m.inner.embed_pos.embedding_weight.shape == (L, 32)
    assert not hasattr(m.inner, "rotary_emb")
    head = ACTLossHead(m, "softmax_cross_entropy")
    head.train()
    batch = make_batch()
    _, loss, metrics, outputs, _ = head(return_keys=["logits"], carry=head.initial_carry(batch), batch=batch)
    assert outputs["logits"].shape == (B, L, V)
    loss.backward()
    assert m.inner.embed_pos.embedding_weight.grad.abs().sum() > 0
