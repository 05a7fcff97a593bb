"""TRM (arch=trm): the original's names, shapes, parameter counts and init order; last-cycle gradients;
halting for both no_ACT_continue settings; mlp_t mixes positions, not channels; prefix positions."""
import math

import pytest
import torch

from models.common import load_state_dict_strict, trunc_normal_init_
from models.losses import ACTLossHead
from models.recursion import hrm_recursion
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1, TinyRecursiveReasoningModel_ACTV1Config
from utils.functions import load_model_class
from utils.schema import ConfigError, field_names

from test_model_config import _arch  # the composed arch yaml
from test_model_hrm import B, L, V, _grads, make_batch  # same batch shape; grads incl. the sparse puzzle table

D = 32
INJECTED = {"batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers"}


def tiny_config(**overrides):
    cfg = dict(batch_size=B, seq_len=L, vocab_size=V, num_puzzle_identifiers=3, puzzle_emb_ndim=D, puzzle_emb_len=2,
               H_cycles=3, L_cycles=2, H_layers=0, L_layers=2, hidden_size=D, num_heads=2, expansion=4,
               pos_encodings="rope", halt_max_steps=4, halt_exploration_prob=0.0, forward_dtype="float32",
               attn_backend="sdpa")
    cfg.update(overrides)
    return cfg


def make_model(seed=0, **overrides):
    return TinyRecursiveReasoningModel_ACTV1(tiny_config(**overrides), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# config, names, shapes, counts, init


def test_trm_yaml_is_the_originals_and_builds_its_class(repo_root):
    arch = _arch(repo_root, "trm")
    assert arch["name"] == "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
    assert load_model_class(arch["name"]) is TinyRecursiveReasoningModel_ACTV1
    assert arch["loss"] == {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"}
    assert set(arch) - {"name", "loss"} == set(field_names(TinyRecursiveReasoningModel_ACTV1Config)) - INJECTED
    # The original trm.yaml's values.
    expected = dict(H_cycles=3, L_cycles=6, H_layers=0, L_layers=2, hidden_size=512, num_heads=8, expansion=4,
                    puzzle_emb_ndim=512, pos_encodings="rope", forward_dtype="bfloat16", mlp_t=False,
                    puzzle_emb_len=16, no_ACT_continue=True, halt_max_steps=16, halt_exploration_prob=0.1)
    assert {k: arch[k] for k in expected} == expected
    # The keys it shares with hrm_v1 have hrm_v1's values.
    hrm = _arch(repo_root, "hrm_v1")
    shared = set(arch) & set(hrm) - {"name", "H_cycles", "L_cycles", "H_layers", "L_layers"}
    assert shared and all(arch[k] == hrm[k] for k in shared)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'mlp_t'"):
        make_model(mlp_tt=True)
    with pytest.raises(ConfigError, match="pos_encodings"):
        make_model(pos_encodings="alibi")
    with pytest.raises(ConfigError, match="puzzle_emb_len.*too short"):
        make_model(puzzle_emb_ndim=3 * D, puzzle_emb_len=2)
    make_model(H_layers=0)  # ignored by TRM, so 0 is valid


SUDOKU = dict(batch_size=2, seq_len=81, vocab_size=11, num_puzzle_identifiers=1, puzzle_emb_ndim=512,
              H_cycles=3, L_cycles=6, H_layers=0, L_layers=2, hidden_size=512, num_heads=8, expansion=4,
              pos_encodings="rope", halt_max_steps=16, halt_exploration_prob=0.1)


def original_state_dict_shapes(mlp_t: bool) -> dict[str, tuple]:
    """Names and shapes of the original TRM's ACTLossHead state dict at the Sudoku shape."""
    shapes = {"model.inner.H_init": (512,), "model.inner.L_init": (512,),
              "model.inner.embed_tokens.embedding_weight": (11, 512), "model.inner.lm_head.weight": (11, 512),
              "model.inner.q_head.weight": (2, 512), "model.inner.q_head.bias": (2,),
              "model.inner.puzzle_emb.weights": (1, 512)}
    for i in range(2):
        p = f"model.inner.L_level.layers.{i}."
        if mlp_t:  # width L = 81 + 16 = 97 -> inner 512
            shapes[p + "mlp_t.gate_up_proj.weight"] = (1024, 97)
            shapes[p + "mlp_t.down_proj.weight"] = (97, 512)
        else:
            shapes[p + "self_attn.qkv_proj.weight"] = (1536, 512)
            shapes[p + "self_attn.o_proj.weight"] = (512, 512)
        shapes[p + "mlp.gate_up_proj.weight"] = (3072, 512)
        shapes[p + "mlp.down_proj.weight"] = (512, 1536)
    return shapes


@pytest.mark.parametrize("mlp_t,count", [(False, 6_828_034), (True, 5_028_866)])
def test_sudoku_shape_parameter_count_and_names(mlp_t, count):
    cfg = dict(SUDOKU, mlp_t=True, pos_encodings="none") if mlp_t else SUDOKU
    with torch.device("meta"):
        head = ACTLossHead(TinyRecursiveReasoningModel_ACTV1(cfg), "stablemax_cross_entropy")
    assert sum(p.numel() for p in head.parameters()) == count  # the puzzle table is a buffer
    sd = head.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == original_state_dict_shapes(mlp_t)
    assert {n for n, _ in head.named_buffers()} & set(sd) == {
        "model.inner.H_init", "model.inner.L_init", "model.inner.puzzle_emb.weights"}


@pytest.mark.parametrize("mlp_t", [False, True])
def test_original_state_dict_loads_strictly_with_and_without_compile_prefix(mlp_t):
    cfg = dict(SUDOKU, forward_dtype="float32", mlp_t=mlp_t, pos_encodings="none" if mlp_t else "rope")
    head = ACTLossHead(TinyRecursiveReasoningModel_ACTV1(cfg, generator=torch.Generator().manual_seed(0)),
                       "stablemax_cross_entropy")
    g = torch.Generator().manual_seed(1)
    original = {k: torch.randn(s, generator=g) for k, s in original_state_dict_shapes(mlp_t).items()}
    load_state_dict_strict(head, original)
    assert torch.equal(head.model.inner.L_level.layers[1].mlp.down_proj.weight,
                       original["model.inner.L_level.layers.1.mlp.down_proj.weight"])
    load_state_dict_strict(head, {"_orig_mod." + k: v + 1 for k, v in original.items()})
    assert torch.equal(head.model.inner.H_init, original["model.inner.H_init"] + 1)


@pytest.mark.parametrize("mlp_t", [False, True])
def test_init_order_and_distributions_are_the_originals(mlp_t):
    """Redraw every tensor in the original's creation order from the same seed and compare bit for bit."""
    m = make_model(seed=3, mlp_t=mlp_t, pos_encodings="learned")
    g = torch.Generator().manual_seed(3)
    draw = lambda *shape, std: trunc_normal_init_(torch.empty(shape), std=std, generator=g)  # noqa: E731
    inner = m.inner
    S = L + 2
    assert torch.equal(inner.embed_tokens.embedding_weight, draw(V, D, std=1 / math.sqrt(D)))
    assert torch.equal(inner.lm_head.weight, draw(V, D, std=1 / math.sqrt(D)))
    draw(2, D, std=1 / math.sqrt(D))  # q_head's draw (then zeroed)
    assert torch.equal(inner.embed_pos.embedding_weight, draw(S, D, std=1 / math.sqrt(D)))
    for layer in inner.L_level.layers:
        if mlp_t:  # SwiGLU over S = 11 positions: inner width 256
            assert torch.equal(layer.mlp_t.gate_up_proj.weight, draw(512, S, std=1 / math.sqrt(S)))
            assert torch.equal(layer.mlp_t.down_proj.weight, draw(S, 256, std=1 / math.sqrt(256)))
        else:
            assert torch.equal(layer.self_attn.qkv_proj.weight, draw(3 * D, D, std=1 / math.sqrt(D)))
            assert torch.equal(layer.self_attn.o_proj.weight, draw(D, D, std=1 / math.sqrt(D)))
        assert torch.equal(layer.mlp.gate_up_proj.weight, draw(512, D, std=1 / math.sqrt(D)))
        assert torch.equal(layer.mlp.down_proj.weight, draw(D, 256, std=1 / math.sqrt(256)))
    assert torch.equal(inner.H_init, draw(D, std=1))
    assert torch.equal(inner.L_init, draw(D, std=1))
    assert torch.all(inner.q_head.weight == 0) and torch.all(inner.q_head.bias == -5)
    assert torch.all(m.puzzle_emb.weights == 0)


# ----------------------------------------------------------------------------------------------
# gradients


def _reference_call(inner, y, z, batch, rule: str):
    """One ACT call written out by hand. rule "last_cycle": the last outer cycle fully differentiated,
    earlier cycles detached (TRM); "one_step": only the last z and y updates differentiated (HRM's rule)."""
    cfg = inner.config
    cos_sin = inner._cos_sin()
    x = inner._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    f = inner.L_level
    for h in range(cfg.H_cycles):
        for l in range(cfg.L_cycles):
            z = f(z, y + x, cos_sin=cos_sin)
            keep = h == cfg.H_cycles - 1 and (rule == "last_cycle" or l == cfg.L_cycles - 1)
            z = z if keep else z.detach()
        y = f(y, z, cos_sin=cos_sin)
        y = y if h == cfg.H_cycles - 1 else y.detach()
    return inner.lm_head(y)[:, inner.puzzle_emb_len:], inner.q_head(y[:, 0])


@pytest.mark.parametrize("mlp_t", [False, True])
def test_gradients_are_last_cycle_full_backprop_not_one_step(mlp_t):
    m = make_model(mlp_t=mlp_t, pos_encodings="none" if mlp_t else "rope")
    m.train()
    batch = make_batch()
    carry = m.inner.reset_carry(torch.ones(B, dtype=torch.bool), m.inner.empty_carry(B))
    weight = torch.linspace(-1, 1, V)

    def loss_of(logits, q_halt, q_cont):
        return (logits * weight).sum() + q_halt.sum() - 2 * q_cont.sum()

    graph_calls = []
    hook = m.inner.L_level.register_forward_hook(lambda mod, i, o: graph_calls.append(o.requires_grad))
    _, logits, (q_halt, q_cont), _ = m.inner(carry, batch)
    hook.remove()
    cfg = m.config
    # H_cycles*(L_cycles+1) network calls; the last L_cycles+1 build graph.
    assert graph_calls == [False] * ((cfg.H_cycles - 1) * (cfg.L_cycles + 1)) + [True] * (cfg.L_cycles + 1)
    got = _grads(m, loss_of(logits, q_halt, q_cont))

    ref_logits, ref_q = _reference_call(m.inner, carry.z_H, carry.z_L, batch, "last_cycle")
    torch.testing.assert_close(ref_logits, logits, rtol=0, atol=0)
    ref = _grads(m, loss_of(ref_logits, ref_q[:, 0], ref_q[:, 1]))
    assert got.keys() == ref.keys() and "puzzle_local" in got and "inner.embed_tokens.embedding_weight" in got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)

    one_logits, one_q = _reference_call(m.inner, carry.z_H, carry.z_L, batch, "one_step")
    one = _grads(m, loss_of(one_logits, one_q[:, 0], one_q[:, 1]))
    # The same net under the core's HRM rule gives the 1-step gradient: the test tells the rules apart.
    inner = m.inner
    cos_sin = inner._cos_sin()
    x = inner._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    y, _ = hrm_recursion(carry.z_H, carry.z_L, x, lambda z, y, x: inner.L_level(z, y + x, cos_sin=cos_sin),
                         lambda y, z: inner.L_level(y, z, cos_sin=cos_sin), cfg.H_cycles, cfg.L_cycles)
    core_one = _grads(m, loss_of(inner.lm_head(y)[:, inner.puzzle_emb_len:], inner.q_head(y[:, 0])[:, 0],
                                 inner.q_head(y[:, 0])[:, 1]))
    name = "inner.L_level.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(core_one[name], one[name], rtol=1e-5, atol=1e-6)
    assert (one[name] - got[name]).abs().max() > 1e-3 * got[name].abs().max()
    assert not torch.allclose(one["puzzle_local"], got["puzzle_local"], rtol=1e-3, atol=1e-6)


def test_carry_is_detached_and_forward_matches_the_recursion_written_out():
    m = make_model()
    m.eval()
    batch = make_batch()
    with torch.no_grad():
        carry, outputs = m(m.initial_carry(batch), batch)
        reset = m.inner.reset_carry(torch.ones(B, dtype=torch.bool), m.inner.empty_carry(B))
        ref_logits, ref_q = _reference_call(m.inner, reset.z_H, reset.z_L, batch, "last_cycle")
    assert torch.equal(outputs["logits"], ref_logits)
    assert torch.equal(outputs["q_halt_logits"], ref_q[:, 0].float())
    m.train()
    carry, _ = m(carry, batch)
    assert not carry.inner_carry.z_H.requires_grad and not carry.inner_carry.z_L.requires_grad


# ----------------------------------------------------------------------------------------------
# halting


def _run_until_all_halted(m, batch, max_calls=50):
    """-> (calls until every row halted, last carry, last outputs)."""
    carry = m.initial_carry(batch)
    for n in range(1, max_calls + 1):
        carry, outputs = m(carry, batch)
        if carry.halted.all():
            break
    return n, carry, outputs


def _set_q_bias(m, q_halt, q_continue):
    with torch.no_grad():
        m.inner.q_head.bias.copy_(torch.tensor([q_halt, q_continue]))


def _count_inner_calls(m):
    calls = []
    m.inner.register_forward_hook(lambda mod, i, o: calls.append(1))
    return calls


def test_no_act_continue_true_halts_on_q_halt_positive_with_one_forward():
    m = make_model(halt_max_steps=6, no_ACT_continue=True)
    m.train()
    batch = make_batch()
    calls = _count_inner_calls(m)
    _set_q_bias(m, 0.5, 3.0)  # q_halt > 0 although q_halt < q_continue: halts
    carry, outputs = m(m.initial_carry(batch), batch)
    assert carry.halted.all() and torch.all(carry.steps == 1)
    assert "target_q_continue" not in outputs and len(calls) == 1  # no second forward pass
    _set_q_bias(m, -0.5, -3.0)  # q_halt < 0 although q_halt > q_continue: runs to the step limit
    n, carry, _ = _run_until_all_halted(m, batch)
    assert n == 6 and torch.all(carry.steps == 6)

    head = ACTLossHead(m, "stablemax_cross_entropy")
    _, loss, metrics, _, _ = head(return_keys=[], carry=head.initial_carry(batch), batch=batch)
    assert "q_continue_loss" not in metrics
    torch.testing.assert_close(loss.detach(), metrics["lm_loss"] + 0.5 * metrics["q_halt_loss"].double())


def test_no_act_continue_false_halts_on_q_halt_above_q_continue_with_bootstrapped_target():
    m = make_model(halt_max_steps=6, no_ACT_continue=False)
    m.train()
    batch = make_batch()
    calls = _count_inner_calls(m)
    _set_q_bias(m, -0.5, -3.0)  # q_halt > q_continue although q_halt < 0: halts
    carry, outputs = m(m.initial_carry(batch), batch)
    assert carry.halted.all() and torch.all(carry.steps == 1)
    assert len(calls) == 2  # the target-Q segment
    # Target = sigmoid(max(next q_halt, next q_continue)), or sigmoid(next q_halt) at the last step.
    torch.testing.assert_close(outputs["target_q_continue"], torch.sigmoid(torch.full((B,), -0.5)))
    _set_q_bias(m, 0.5, 3.0)  # q_halt > 0 but below q_continue: runs to the step limit
    n, carry, outputs = _run_until_all_halted(m, batch)
    assert n == 6
    torch.testing.assert_close(outputs["target_q_continue"], torch.sigmoid(torch.full((B,), 0.5)))  # last step

    head = ACTLossHead(m, "stablemax_cross_entropy")
    _, loss, metrics, _, _ = head(return_keys=[], carry=head.initial_carry(batch), batch=batch)
    assert metrics["q_continue_loss"] > 0
    torch.testing.assert_close(loss.detach(), metrics["lm_loss"] + 0.5 * (
        metrics["q_halt_loss"] + metrics["q_continue_loss"]).double())
    loss.backward()
    assert m.inner.q_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("no_act_continue", [True, False])
def test_eval_runs_exactly_halt_max_steps_and_exploration_only_delays(no_act_continue):
    m = make_model(halt_max_steps=5, no_ACT_continue=no_act_continue)
    m.eval()
    _set_q_bias(m, 5.0, -5.0)  # "halt now" is ignored in eval
    with torch.no_grad():
        n, carry, _ = _run_until_all_halted(m, make_batch())
    assert n == 5 and torch.all(carry.steps == 5)

    m = make_model(halt_max_steps=6, halt_exploration_prob=1.0, no_ACT_continue=no_act_continue)
    m.train()
    _set_q_bias(m, 5.0, -5.0)
    m.set_generator(torch.Generator().manual_seed(3))
    carry, _ = m(m.initial_carry(make_batch()), make_batch())
    assert not carry.halted.any()  # every row drew a minimum of >= 2 steps


# ----------------------------------------------------------------------------------------------
# mlp_t, prefix positions, hooks


def test_mlp_t_mixes_positions_not_channels():
    block = make_model(mlp_t=True, pos_encodings="none").inner.L_level.layers[0]
    S = L + 2
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, S, D, generator=g)
    out = block.mix_tokens(h)
    # Permuting channels permutes the output's channels the same way: channels are never mixed.
    perm = torch.randperm(D, generator=g)
    torch.testing.assert_close(block.mix_tokens(h[:, :, perm]), out[:, :, perm], rtol=1e-5, atol=1e-6)
    # Permuting positions does not commute: positions are mixed (by weights that know each position).
    pos = torch.randperm(S, generator=g)
    assert not torch.allclose(block.mix_tokens(h[:, pos]), out[:, pos], atol=1e-3)
    # A change at one (position, channel) reaches every position of that channel and no other channel.
    h2 = h.clone()
    h2[:, 3, 5] += 1.0
    delta = (block.mix_tokens(h2) - out).abs()
    assert torch.all(delta[:, :, 5] > 0) and torch.all(delta[:, :, torch.arange(D) != 5] == 0)
    # Its RMS norm runs over the sequence axis (the original's), not over channels.
    torch.testing.assert_close(out.square().mean(dim=1), torch.ones(2, D), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.square().mean(dim=2), torch.ones(2, S), atol=1e-2)
    # Attention, by contrast, mixes channels.
    attn = make_model().inner.L_level.layers[0]
    delta = (attn.mix_tokens(h2) - attn.mix_tokens(h)).abs()
    assert torch.all(delta[:, :, torch.arange(D) != 5].amax(-1) > 0)


def test_puzzle_emb_len_prefix_and_no_puzzle_embedding():
    m = make_model(puzzle_emb_len=4)
    batch = make_batch()
    with torch.no_grad():
        m.puzzle_emb.weights.copy_(torch.randn(3, D))
    m.eval()
    x = m.inner._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
    assert x.shape == (B, L + 4, D)
    assert torch.all(x[:, 0] != 0) and torch.all(x[:, 1:4] == 0)  # only position 0 carries the vector
    assert m.inner.rotary_emb.cos_cached.shape[0] == L + 4

    # puzzle_emb_ndim=0 with the default prefix length: zero-input scratch positions (the original crashes).
    m0 = make_model(puzzle_emb_ndim=0, puzzle_emb_len=16)
    assert m0.puzzle_emb is None and m0.inner.puzzle_emb_len == 16
    head = ACTLossHead(m0, "stablemax_cross_entropy")
    head.train()
    carry, loss, _, outputs, _ = head(return_keys=["logits"], carry=head.initial_carry(batch), batch=batch)
    assert outputs["logits"].shape == (B, L, V) and carry.inner_carry.z_H.shape == (B, L + 16, D)
    loss.backward()
    assert m0.inner.embed_tokens.embedding_weight.grad.abs().sum() > 0
    assert make_model(puzzle_emb_ndim=0, puzzle_emb_len=0).inner.puzzle_emb_len == 0
    assert make_model(puzzle_emb_ndim=3 * D, puzzle_emb_len=0).inner.puzzle_emb_len == 3  # HRM's rule


def test_recursion_hook_sees_every_update_and_can_perturb_the_latent():
    m = make_model()
    m.eval()
    batch = make_batch()
    with torch.no_grad():
        _, clean = m(m.initial_carry(batch), batch)
    seen = []
    g = torch.Generator().manual_seed(0)

    def noise(step, state):
        seen.append(step)
        return state + 0.1 * torch.randn(state.shape, generator=g) if step.level == "L" else state

    m.recursion_hook = noise
    with torch.no_grad():
        _, noisy = m(m.initial_carry(batch), batch)
    cfg = m.config
    assert len(seen) == cfg.H_cycles * (cfg.L_cycles + 1)
    assert [s.level for s in seen].count("H") == cfg.H_cycles
    assert not torch.allclose(clean["logits"], noisy["logits"])


def test_tiny_forward_backward_bf16_and_no_host_sync():
    m = make_model(forward_dtype="bfloat16", mlp_t=True, pos_encodings="none", halt_exploration_prob=0.5)
    head = ACTLossHead(m, "stablemax_cross_entropy")
    head.train()
    batch = make_batch()
    carry = head.initial_carry(batch)
    carry, loss, metrics, outputs, _ = head(return_keys=["logits"], carry=carry, batch=batch)
    assert outputs["logits"].dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.device("meta"):
        mm = TinyRecursiveReasoningModel_ACTV1(tiny_config(no_ACT_continue=False, halt_exploration_prob=0.5))
        hh = ACTLossHead(mm, "stablemax_cross_entropy")
    hh.train()
    mm.set_generator(torch.Generator().manual_seed(0))
    meta_batch = {k: v.to("meta") for k, v in batch.items()}
    _, loss, metrics, _, _ = hh(return_keys=[], carry=hh.initial_carry(meta_batch), batch=meta_batch)
    assert loss.device.type == "meta" and all(v.device.type == "meta" for v in metrics.values())


def test_estimate_flops():
    m, m_q = make_model(), make_model(no_ACT_continue=False)
    assert m_q.estimate_flops(8) > m.estimate_flops(8) > 0
    assert m.estimate_flops(16) == pytest.approx(2 * m.estimate_flops(8), rel=1e-6)
    # mlp_t block: gate_up [2*256, S] and down [S, 256] over B*D rows, plus the channel SwiGLU over B*S tokens.
    S = L + 2
    mlp_t = make_model(mlp_t=True, pos_encodings="none").inner
    assert mlp_t.block_flops(8 * S, 8) == 2 * 3 * 256 * (8 * D * S + 8 * S * D)
