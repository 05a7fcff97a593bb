"""HRM language model: no information leak, gate warmup, MoE routing, halting, KV-cache decoding, loss head."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from models.hrm_lm.hrm_lm_v1 import HRMLanguageModel, sample_next
from models.hrm_lm.losses import LMLossHead
from models.hrm_lm.moe import MoEFeedForward
from utils.schema import ConfigError

V = 40


# References below are computed from live (grad-carrying) outputs on purpose, then compared as floats.
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")]


def tiny(**over):
    cfg = dict(vocab_size=V, hidden_size=32, num_heads=2, encoder="transformer", encoder_layers=1, H_layers=1,
               L_layers=1, decoder_layers=2, halt_max_steps=3, mamba_headdim=16, mamba_d_state=16, mamba_chunk_size=4)
    cfg.update(over)
    return HRMLanguageModel(cfg)


def make_batch(B=3, Lp=7, Lt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(3, V, (B, Lp), generator=g)
    emask = torch.ones(B, Lp, dtype=torch.bool)
    emask[0, 4:] = False
    dec = torch.randint(3, V, (B, Lt), generator=g)
    dec[:, 0] = 1
    labels = torch.cat([dec[:, 1:], torch.full((B, 1), 2)], 1)
    labels[1, 4:] = -100
    return dict(encoder_ids=enc, encoder_mask=emask, decoder_input_ids=dec,
                decoder_mask=labels != -100, labels=labels)


def fwd(model, batch):
    return model(batch["encoder_ids"], batch["encoder_mask"], batch["decoder_input_ids"])


@pytest.mark.parametrize("core", ["hrm", "trm"])
@pytest.mark.parametrize("encoder", ["transformer", "mamba2"])
@pytest.mark.parametrize("training", [True, False])
def test_decoder_is_causal_and_encoder_ignores_targets(encoder, training, core):
    model = tiny(encoder=encoder, core=core).train(training)
    batch = make_batch()
    base = fwd(model, batch)
    t = 2  # change target token t (= decoder input t+1) and every later one
    changed = dict(batch)
    changed["decoder_input_ids"] = batch["decoder_input_ids"].clone()
    changed["decoder_input_ids"][:, t + 1:] = (changed["decoder_input_ids"][:, t + 1:] + 7) % V
    changed["labels"] = torch.zeros_like(batch["labels"])
    out = fwd(model, changed)
    torch.testing.assert_close(out["logits"][:, : t + 1], base["logits"][:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(out["logits"][:, t + 1:], base["logits"][:, t + 1:])
    torch.testing.assert_close(out["encoder_states"], base["encoder_states"], rtol=0, atol=0)
    if training:
        for a, b in zip(out["segment_logits"], base["segment_logits"]):
            torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("encoder", ["transformer", "mamba2"])
def test_prompt_padding_does_not_change_real_positions(encoder):
    model = tiny(encoder=encoder).eval()
    batch = make_batch(B=2)
    padded = dict(batch)
    extra = 5
    padded["encoder_ids"] = torch.cat([batch["encoder_ids"], torch.zeros(2, extra, dtype=torch.long)], 1)
    padded["encoder_mask"] = torch.cat([batch["encoder_mask"], torch.zeros(2, extra, dtype=torch.bool)], 1)
    a, b = fwd(model, batch), fwd(model, padded)
    Lp = batch["encoder_ids"].shape[1]
    torch.testing.assert_close(b["encoder_states"][:, :Lp], a["encoder_states"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["logits"], a["logits"], atol=1e-4, rtol=1e-4)


def _perturb_hrm(model):
    with torch.no_grad():
        core = (model.L_level, model.H_level) if model.config.core == "hrm" else (model.L_level,)  # trm: one network
        for mod in (*core, model.hrm_in, model.hrm_out, model.gate_proj):
            for p in mod.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)


@pytest.mark.parametrize("core", ["hrm", "trm"])
@pytest.mark.parametrize("gate_mode", ["token", "channel"])
def test_gate_warmup_isolates_decoder_from_hrm_then_opens(gate_mode, core):
    model = tiny(hrm_gate_warmup_steps=5, hrm_gate_ramp_steps=4, gate_mode=gate_mode, core=core).train()
    head = LMLossHead(model)
    assert [model.gate_scale_at(s) for s in (0, 4, 5, 6, 8, 100)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    batch = make_batch()
    head.on_train_step(3)
    closed = fwd(model, batch)
    assert float(closed["gate/max"]) == 0.0
    # every deep-supervision pass goes through the same closed gate: all segments decode identically
    for seg in closed["segment_logits"]:
        torch.testing.assert_close(seg, closed["logits"], rtol=0, atol=0)
    # the encoder still learns while the gate is closed (the decoder cross-attends to its token states)
    _, loss, *_ = head(carry={}, batch=batch)
    loss.backward()
    assert model.encoder.layers[0].attn.qkv_proj.weight.grad.abs().sum() > 0
    assert model.L_level.layers[0].mlp.down_proj.weight.grad is None or model.L_level.layers[0].mlp.down_proj.weight.grad.abs().sum() == 0

    head.on_train_step(10)
    opened = fwd(model, batch)
    assert float(opened["gate/mean"]) > 0
    model.zero_grad()
    head(carry={}, batch=batch)[1].backward()
    # W_m starts at zero (opening is a no-op); it learns first, then the HRM core receives gradient
    assert model.hrm_out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.01 * p.grad
    model.zero_grad()
    head(carry={}, batch=batch)[1].backward()
    assert model.L_level.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    head.on_train_step(3)
    closed = fwd(model, batch)
    head.on_train_step(10)
    opened = fwd(model, batch)

    _perturb_hrm(model)
    head.on_train_step(3)
    torch.testing.assert_close(fwd(model, batch)["logits"], closed["logits"], rtol=0, atol=0)
    head.on_train_step(10)
    assert (fwd(model, batch)["logits"] - opened["logits"]).abs().max() > 1e-3


def test_moe_capacity_topk_and_matches_per_token_reference():
    torch.manual_seed(0)  # only this test's input tensors; the module draws from its own generator
    D, E, k = 8, 4, 2
    moe = MoEFeedForward(D, E, top_k=k, capacity_factor=0.5, ff_multiplier=2.0)
    with torch.no_grad():  # skew the router so capacity binds
        moe.router.weight[0] += 1.0
    x = torch.randn(2, 9, D)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    y, aux, drop = moe(x, mask)
    tokens, valid = x.reshape(-1, D), mask.reshape(-1)
    probs, top_e, weights, slot, keep, C = moe.route(tokens, valid)
    assert C == math.ceil(0.5 * 18 * k / E)
    kept = keep.view(k, -1).t()  # [N, k]
    per_expert = torch.zeros(E, dtype=torch.long)
    for n in range(18):
        assert len(set(top_e[n].tolist())) == k  # k distinct experts per token
        for j in range(k):
            if kept[n, j]:
                per_expert[top_e[n, j]] += 1
    assert (per_expert <= C).all() and per_expert.max() == C  # capacity respected and binding
    assert not kept[~valid].any()
    assert 0 < float(drop) < 1

    # reference: loop over tokens and their kept experts
    ref = torch.zeros_like(tokens)
    for n in range(18):
        for j in range(k):
            if kept[n, j]:
                e = top_e[n, j]
                a, b = (tokens[n] @ moe.w_in[e]).chunk(2)
                ref[n] += weights[n, j] * ((F.silu(a) * b) @ moe.w_out[e])
    torch.testing.assert_close(y.reshape(-1, D), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(y.reshape(-1, D)[~valid] == 0)

    # Switch aux loss: E * sum_e f_e P_e over valid tokens
    f = torch.zeros(E)
    for n in range(18):
        if valid[n]:
            for j in range(k):
                f[top_e[n, j]] += 1
    f /= valid.sum() * k
    P = probs[valid].mean(0)
    assert abs(float(aux.detach()) - float(E * (f * P).sum().detach())) < 1e-6
    # uniform router -> aux == 1
    with torch.no_grad():
        moe.router.weight.zero_()
    assert abs(float(moe(x, mask)[1].detach()) - 1.0) < 1e-6
    aux.backward()  # the router gets gradient through P_e
    assert moe.router.weight.grad.abs().sum() > 0


def test_moe_encoder_trains_end_to_end():
    model = tiny(encoder_ffn="moe", moe_num_experts=3, moe_top_k=2, moe_dropout=0.1).train()
    head = LMLossHead(model)
    _, loss, metrics, _, _ = head(carry={}, batch=make_batch())
    loss.backward()
    assert model.encoder.layers[0].ffn.ffn.w_in.grad.abs().sum() > 0
    assert 0.5 < float(metrics["moe/aux"]) < 3.0


def test_halting_ends_compute_early_per_row():
    model = tiny(halt_max_steps=4).eval()
    batch = make_batch(B=3)
    with torch.no_grad():
        model.halt_head.bias.fill_(20.0)  # p = 1 after the first segment: everyone halts at once
    model.num_segment_calls = model.num_segment_rows = 0
    out = fwd(model, batch)
    assert model.num_segment_calls == 1 and out["steps"].tolist() == [1, 1, 1]
    with torch.no_grad():
        model.halt_head.bias.fill_(-20.0)  # p ~ 0: nobody halts before halt_max_steps
    model.num_segment_calls = 0
    assert fwd(model, batch)["steps"].tolist() == [4, 4, 4] and model.num_segment_calls == 4

    # Row 0 halts after segment 1; the others run on, and row 0 is no longer computed.
    calls = []

    def fake_halt(z_H, mask):
        calls.append(z_H.shape[0])
        first = torch.zeros(z_H.shape[0])
        if len(calls) == 1:
            first[0] = 1.0
        return first

    model.halt_prob = fake_halt
    model.num_segment_rows = 0
    out = fwd(model, batch)
    assert out["steps"].tolist() == [1, 4, 4]
    assert calls == [3, 2, 2, 2] and model.num_segment_rows == 9
    del model.halt_prob
    # the halted row's memory is the one after segment 1: same logits as a 1-segment model for that row
    one = tiny(halt_max_steps=1).eval()
    one.load_state_dict(model.state_dict())
    torch.testing.assert_close(fwd(one, batch)["logits"][0], out["logits"][0], atol=1e-5, rtol=1e-5)


def test_training_runs_all_segments_and_halting_loss():
    model = tiny(halt_max_steps=3, halting_weight=1.0, halting_target=2.0, ds_weight=0.5,
                 halt_objective="sum_target").train()
    head = LMLossHead(model)
    batch = make_batch()
    _, loss, m, _, _ = head(carry={}, batch=batch)
    out = fwd(model, batch)
    assert len(out["segment_logits"]) == 3 and out["halt_probs"].shape == (3, 3)
    mask = batch["labels"] != -100
    valid = mask.any(-1)
    per_row = [(F.cross_entropy(lg.transpose(1, 2), batch["labels"], reduction="none").sum(-1) / mask.sum(-1)).sum()
               for lg in out["segment_logits"]]
    halt = ((out["halt_probs"].sum(-1) - 2.0).square() * valid).sum()
    expected = per_row[-1] + 0.5 * (per_row[0] + per_row[1]) + out["gate/mean"] * halt
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-4
    assert abs(float(m["lm_loss"]) - float(per_row[-1].detach())) < 1e-4
    ce = F.cross_entropy(out["logits"].transpose(1, 2), batch["labels"], reduction="sum")
    assert abs(float(m["ce_sum"]) - float(ce.detach())) < 1e-3 and float(m["num_tokens"]) == mask.sum()
    red = head.reduce_metrics({k: float(v) for k, v in m.items()}, "eval", 3)
    assert abs(red["ppl"] - math.exp(red["ce"])) < 1e-9 and abs(red["ce"] - float(ce.detach()) / float(mask.sum())) < 1e-5
    assert red["halt/steps"] == 3.0 and abs(red["halt/sum_p"] - float(out["halt_probs"].detach().sum(-1).mean())) < 1e-5
    train_red = head.reduce_metrics({k: float(v) for k, v in m.items()}, "train", 6)
    assert abs(train_red["lm_loss"] - float(per_row[-1].detach()) / 6) < 1e-5


def test_kv_cache_decoding_equals_full_forward():
    model = tiny(encoder="mamba2").eval()
    batch = make_batch(B=2)
    g = torch.Generator().manual_seed(0)
    toks = torch.stack(list(model.generate(batch["encoder_ids"][:2], batch["encoder_mask"][:2], 8,
                                           greedy=True, generator=g)), 1)
    dec_in = torch.cat([torch.ones(2, 1, dtype=torch.long), toks[:, :-1]], 1)
    full = model(batch["encoder_ids"][:2], batch["encoder_mask"][:2], dec_in)["logits"]
    assert torch.equal(full.argmax(-1), toks)
    state = model.prepare_generation(batch["encoder_ids"][:2], batch["encoder_mask"][:2])
    steps = torch.stack([model.decode_step(dec_in[:, i], state) for i in range(dec_in.shape[1])], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, -1.0, -5.0]])
    assert sample_next(logits, greedy=True).item() == 0
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    p = torch.softmax(logits, -1)[0]
    # top_p just above p0 keeps exactly the two most likely tokens
    draws = {sample_next(logits, top_p=float(p[0]) + 1e-3, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    a = [sample_next(logits, generator=torch.Generator().manual_seed(5)).item() for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw


def test_loss_by_name_from_pytorch_optimizer():
    model = tiny().train()
    batch = make_batch()
    for name, kwargs in (("bitemperedlogisticloss", {"t1": 0.8, "t2": 1.2}), ("focalloss", {})):
        head = LMLossHead(model, loss_name=name, loss_kwargs=kwargs)
        _, loss, m, _, _ = head(carry={}, batch=batch)
        assert torch.isfinite(loss) and float(m["num_tokens"]) == (batch["labels"] != -100).sum()
        loss.backward()
    with pytest.raises(ConfigError, match="unknown loss 'crossentropy'"):
        LMLossHead(model, loss_name="crossentropy")
    with pytest.raises(ConfigError, match="does not fit loss"):
        LMLossHead(model, loss_name="focalloss", loss_kwargs={"gama": 2})
    plain = LMLossHead(model)
    smooth = LMLossHead(model, loss_kwargs={"label_smoothing": 0.1})
    (_, l0, m0, _, _), (_, l1, m1, _, _) = plain(carry={}, batch=batch), smooth(carry={}, batch=batch)
    assert float(l1.detach()) != float(l0.detach()) and float(m1["ce_sum"]) == float(m0["ce_sum"])  # ce/ppl stay the true CE


def test_config_errors_and_seeded_init(monkeypatch):
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        tiny(hiden_size=64)
    with pytest.raises(ConfigError, match="arch.encoder"):
        tiny(encoder="rwkv7")
    with pytest.raises(ConfigError, match="arch.num_heads"):
        tiny(num_heads=3)
    monkeypatch.setitem(sys.modules, "models.mamba2", None)  # simulate a missing module
    with pytest.raises(ConfigError, match="encoder=mamba2 but models.mamba2.Mamba2 cannot be imported"):
        tiny(encoder="mamba2")
    monkeypatch.undo()

    state = torch.random.get_rng_state()
    a, b, c = tiny(encoder="mamba2"), tiny(encoder="mamba2"), tiny(encoder="mamba2", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # construction leaves the global RNG alone
    for (n, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.encoder.backend.startswith("mamba2[")


def test_learns_a_copy_task():
    """Small end-to-end check that the pieces learn together: the decoder must copy the prompt."""
    torch.manual_seed(0)
    model = tiny(halt_max_steps=2, hidden_size=48).train()
    head = LMLossHead(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = last = None
    for step in range(60):
        prompt = torch.randint(3, 13, (16, 5), generator=g)
        batch = dict(encoder_ids=prompt, encoder_mask=torch.ones_like(prompt, dtype=torch.bool),
                     decoder_input_ids=torch.cat([torch.ones(16, 1, dtype=torch.long), prompt[:, :-1]], 1),
                     labels=prompt)
        _, loss, m, _, _ = head(carry={}, batch=batch)
        (loss / 16).backward()
        opt.step()
        opt.zero_grad()
        ce = float(m["ce_sum"] / m["num_tokens"])
        first = ce if first is None else first
        last = ce
    assert first > 2.0 and last < 0.5 * first


def test_arch_yamls_compose_and_differ_only_in_encoder(repo_root):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from utils.config import validate_arch
    from utils.modeling import build_head

    archs = {}
    for name in ("hrm_lm_mamba", "hrm_lm_transformer"):
        with initialize_config_dir(config_dir=str(repo_root / "config"), version_base="1.3"):
            cfg = compose("cfg_pretrain", overrides=[f"arch={name}", "arch.hidden_size=32", "arch.num_heads=1"])
        archs[name] = OmegaConf.to_container(cfg.arch, resolve=True)
        validate_arch(archs[name])
    a, b = archs["hrm_lm_mamba"], archs["hrm_lm_transformer"]
    assert {k for k in a if a[k] != b[k]} == {"encoder"} and b["encoder"] == "transformer"
    for arch, backend in ((a, "mamba2["), (b, "transformer")):
        head = build_head(arch, {"vocab_size": V, "seq_len": 16, "batch_size": 2, "pad_id": 0, "bos_id": 1, "eos_id": 2})
        assert isinstance(head, LMLossHead) and head.model.encoder.backend.startswith(backend)


def test_one_step_gradient_and_detached_carry():
    model = tiny(H_cycles=3, L_cycles=2, halt_max_steps=2).train()
    seen = {"L": [], "H": []}
    for name, mod in (("L", model.L_level), ("H", model.H_level)):
        mod.register_forward_hook(lambda m, args, out, name=name: seen[name].append(
            (torch.is_grad_enabled(), args[0].requires_grad)))
    fwd(model, make_batch())
    # per segment: 3*2 L-calls and 3 H-calls; only the last of each runs with grad
    assert [g for g, _ in seen["L"]] == ([False] * 5 + [True]) * 2
    assert [g for g, _ in seen["H"]] == ([False] * 2 + [True]) * 2
    # the carry entering each segment is detached (no BPTT across segments)
    assert not seen["L"][6][1] and not seen["H"][3][1]


def test_improvement_halting_targets_and_criterion():
    model = tiny(halt_max_steps=3, halting_weight=1.0, ds_weight=0.0, halt_tolerance=0.05).train()
    head = LMLossHead(model)
    batch = make_batch()
    _, loss, m, _, _ = head(carry={}, batch=batch)
    out = fwd(model, batch)
    assert len(out["segment_logits"]) == 3  # the halting targets need every segment's CE, even without ds
    mask = batch["labels"] != -100
    ce = torch.stack([F.cross_entropy(lg.transpose(1, 2), batch["labels"], reduction="none").sum(-1) / mask.sum(-1)
                      for lg in out["segment_logits"]], 1)
    target = (ce[:, :-1] - ce[:, 1:] < 0.05).float()
    halt = F.binary_cross_entropy(out["halt_probs"][:, :-1], target, reduction="none").sum()
    assert abs(float(loss) - float(ce[:, -1].sum() + out["gate/mean"] * halt)) < 1e-4
    assert abs(float(m["halt/target_frac"]) - float(target.mean())) < 1e-6
    loss.backward()
    assert model.halt_head.weight.grad.abs().sum() > 0  # the halting head learns (not a dead regularizer)
    # untrained: p = 0.12 < 0.5, every segment runs; p_s >= threshold halts that row
    model.eval()
    assert fwd(model, batch)["steps"].tolist() == [3, 3, 3]
    with torch.no_grad():
        model.halt_head.bias.fill_(0.1)  # p = 0.525 >= 0.5
    assert fwd(model, batch)["steps"].tolist() == [1, 1, 1]


def test_trm_core_is_one_network_with_the_last_outer_cycle_differentiated():
    model = tiny(core="trm", H_cycles=3, L_cycles=2, halt_max_steps=2).train()
    assert not hasattr(model, "H_level") and not any(k.startswith("H_level.") for k in model.state_dict())
    calls = []
    model.L_level.register_forward_hook(lambda m, args, out: calls.append(
        (torch.is_grad_enabled(), args[0].requires_grad)))
    with torch.no_grad():  # W_m starts at zero, which would keep the core's gradient at zero
        model.hrm_out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    out = fwd(model, make_batch())
    # per segment 3 outer cycles of (2 z-updates + 1 y-update) through the same network; the last cycle has grad
    assert [g for g, _ in calls] == ([False] * 6 + [True] * 3) * 2
    assert not calls[9][1]  # the carry entering segment 2 is detached
    out["logits"].sum().backward()
    assert model.L_level.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    hrm = tiny(core="hrm", H_cycles=3, L_cycles=2)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(hrm) - n(model) == n(hrm.H_level)
    assert model.estimate_flops(4) < hrm.estimate_flops(4)
    with pytest.raises(ConfigError, match="arch.core"):
        tiny(core="gru")


# Names of a tiny (transformer, swiglu) model's renamed tensors as the LM wrote them before it moved onto
# models/layers.py; every other key kept its name.
LEGACY_KEYS = {
    "encoder.layers.0.attn.qkv.weight": "encoder.layers.0.attn.qkv_proj.weight",
    "encoder.layers.0.attn.o.weight": "encoder.layers.0.attn.o_proj.weight",
    "encoder.layers.0.ffn.ffn.gate_up.weight": "encoder.layers.0.ffn.ffn.gate_up_proj.weight",
    "encoder.layers.0.ffn.ffn.down.weight": "encoder.layers.0.ffn.ffn.down_proj.weight",
    "L_level.layers.0.attn.qkv.weight": "L_level.layers.0.self_attn.qkv_proj.weight",
    "L_level.layers.0.attn.o.weight": "L_level.layers.0.self_attn.o_proj.weight",
    "L_level.layers.0.mlp.gate_up.weight": "L_level.layers.0.mlp.gate_up_proj.weight",
    "L_level.layers.0.mlp.down.weight": "L_level.layers.0.mlp.down_proj.weight",
    "H_level.layers.0.attn.qkv.weight": "H_level.layers.0.self_attn.qkv_proj.weight",
    "H_level.layers.0.attn.o.weight": "H_level.layers.0.self_attn.o_proj.weight",
    "H_level.layers.0.mlp.gate_up.weight": "H_level.layers.0.mlp.gate_up_proj.weight",
    "H_level.layers.0.mlp.down.weight": "H_level.layers.0.mlp.down_proj.weight",
    **{f"decoder_layers.{i}.{old}.weight": f"decoder_layers.{i}.{new}.weight" for i in (0, 1) for old, new in (
        ("self_attn.qkv", "self_attn.qkv_proj"), ("self_attn.o", "self_attn.o_proj"),
        ("cross_attn.q", "cross_attn.q_proj"), ("cross_attn.kv", "cross_attn.kv_proj"),
        ("cross_attn.o", "cross_attn.o_proj"), ("mlp.gate_up", "mlp.gate_up_proj"), ("mlp.down", "mlp.down_proj"))},
}


def test_checkpoints_with_the_lm_s_earlier_names_still_load():
    from models.common import load_state_dict_strict
    from utils.checkpoint import apply_weights

    model = tiny().eval()
    batch = make_batch()
    ref = fwd(model, batch)["logits"]
    new_to_old = {new: old for old, new in LEGACY_KEYS.items()}
    legacy = {new_to_old.get(k, k): v for k, v in model.state_dict().items()}
    assert len(set(legacy) & set(LEGACY_KEYS)) == len(LEGACY_KEYS)
    for load in (load_state_dict_strict, lambda m, sd: apply_weights(m, sd, "legacy")):
        other = tiny(seed=1).eval()
        load(other, {"_orig_mod." + k: v for k, v in legacy.items()})
        torch.testing.assert_close(fwd(other, batch)["logits"], ref, rtol=0, atol=0)


def test_core_trm_from_the_command_line(repo_root):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from utils.config import validate_arch
    from utils.modeling import build_head

    with initialize_config_dir(config_dir=str(repo_root / "config"), version_base="1.3"):
        cfg = compose("cfg_pretrain", overrides=["arch=hrm_lm_mamba", "arch.core=trm", "arch.hidden_size=32",
                                                 "arch.num_heads=1"])
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    validate_arch(arch)
    head = build_head(arch, {"vocab_size": V, "seq_len": 16, "batch_size": 2, "pad_id": 0, "bos_id": 1, "eos_id": 2})
    assert head.model.config.core == "trm" and not hasattr(head.model, "H_level")
