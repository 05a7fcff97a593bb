"""optimizer.name=muon: which parameter goes to Muon and which to AdamW, the update each group gets, the
learning rates and their schedule, kwargs errors, and an exact kill/resume with Muon's state."""
from __future__ import annotations

import pytest
import torch

from trainer_helpers import build_tiny_sudoku, compose, load_step_weights, tiny_overrides, train
from utils.modeling import build_head
from utils.optim import build_optimizer, build_scheduler, muon_split
from utils.schema import ConfigError

INJECTED = dict(batch_size=4, seq_len=16, vocab_size=11, num_puzzle_identifiers=3, pad_id=0, bos_id=1, eos_id=2)


def tiny_head(arch: str, *extra: str):
    return build_head(compose([f"arch={arch}", "arch.hidden_size=32", "arch.num_heads=2", *extra]).arch, INJECTED)


def names(pairs) -> set[str]:
    return {n for n, _ in pairs}


def test_hrm_split_muon_takes_exactly_the_hidden_matrices():
    head = tiny_head("hrm_v1", "arch.H_layers=1", "arch.L_layers=1", "arch.pos_encodings=learned")
    muon, adamw = muon_split(head)
    blocks = [f"model.inner.{level}.layers.0.{m}.weight" for level in ("H_level", "L_level")
              for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    assert names(muon) == set(blocks)
    assert names(adamw) == {"model.inner.embed_tokens.embedding_weight", "model.inner.embed_pos.embedding_weight",
                            "model.inner.lm_head.weight", "model.inner.q_head.weight", "model.inner.q_head.bias"}
    assert names(muon) | names(adamw) == {n for n, _ in head.named_parameters()}  # every parameter, once
    assert not any("puzzle_emb" in n for n in names(muon) | names(adamw))  # a buffer with its own sign-SGD


@pytest.mark.parametrize("mixer", ["attention", "mlp_t"])
def test_trm_split_muon_takes_the_one_networks_matrices(mixer):
    extra = ("arch.mlp_t=true", "arch.pos_encodings=none") if mixer == "mlp_t" else ()
    head = tiny_head("trm", "arch.L_layers=2", *extra)
    muon, adamw = muon_split(head)
    mix = ("mlp_t.gate_up_proj", "mlp_t.down_proj") if mixer == "mlp_t" else ("self_attn.qkv_proj", "self_attn.o_proj")
    assert names(muon) == {f"model.inner.L_level.layers.{i}.{m}.weight" for i in range(2)
                           for m in (*mix, "mlp.gate_up_proj", "mlp.down_proj")}
    assert names(adamw) == {"model.inner.embed_tokens.embedding_weight", "model.inner.lm_head.weight",
                            "model.inner.q_head.weight", "model.inner.q_head.bias"}


def test_lm_split_keeps_embeddings_heads_gains_and_filters_on_adamw():
    head = tiny_head("hrm_lm_mamba")
    muon, adamw = muon_split(head)
    assert names(muon) | names(adamw) == {n for n, _ in head.named_parameters()} and not names(muon) & names(adamw)
    embedding_params = {n for m_name, m in head.named_modules() if isinstance(m, torch.nn.Embedding)
                        for n in (f"{m_name}.{k}" for k, _ in m.named_parameters(recurse=False))}
    assert embedding_params and embedding_params <= names(adamw)
    assert "model.lm_head.weight" in names(adamw)
    for n, p in adamw:
        assert p.ndim != 2 or min(p.shape) == 1 or n in embedding_params or n.rsplit(".", 2)[-2].endswith("head"), n
    assert any(p.ndim == 1 for _, p in adamw) and any(p.ndim == 3 for _, p in adamw)  # gains/SSM scalars, conv1d
    assert len(muon) >= 10 and all(p.ndim == 2 and min(p.shape) > 1 for _, p in muon)  # attention, MLP, Mamba proj


def test_muon_orthogonalizes_hidden_matrices_and_adamw_steps_the_rest():
    head = tiny_head("hrm_v1", "arch.H_layers=1", "arch.L_layers=1")
    opt = build_optimizer(head, "muon", 1e-3, (0.9, 0.95), 0.0, {"lr": 0.02})
    muon_group, adamw_group = opt.param_groups
    assert muon_group["use_muon"] and not adamw_group["use_muon"]
    assert (muon_group["lr"], adamw_group["lr"], adamw_group["betas"]) == (0.02, 1e-3, (0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in head.named_parameters()}
    for n, p in head.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    muon, adamw = muon_split(head)
    for n, p in muon:  # Newton-Schulz output: singular values near 1, not an elementwise sign
        rows, cols = p.shape
        update = (before[n] - p.detach()) / (0.02 * max(1.0, rows / cols) ** 0.5)  # Muon's shape scaling of the LR
        s = torch.linalg.svdvals(update)
        assert 0.5 < s.min() and s.max() < 1.5, (n, s.min(), s.max())
        assert not torch.allclose(update.abs(), torch.ones_like(update), atol=0.1), n
    for n, p in adamw:  # Adam's first step (bias-corrected): exactly lr * sign(grad)
        torch.testing.assert_close(before[n] - p.detach(), 1e-3 * grads[n].sign(), rtol=1e-4, atol=1e-8)


def test_muon_lrs_follow_one_schedule_and_kwargs_are_checked():
    head = tiny_head("hrm_v1", "arch.H_layers=1", "arch.L_layers=1")
    opt = build_optimizer(head, "muon", 1e-3, (0.9, 0.95), 0.1, {"adamw_wd": 0.0})
    assert opt.param_groups[0]["lr"] == 0.02  # pytorch_optimizer's Muon default
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    sched = build_scheduler(opt, "cosine_warmup", {}, base_lr=1e-3, warmup_steps=4, total_steps=20, min_ratio=0.1)
    for step in range(12):
        lr_muon, lr_adamw = (g["lr"] for g in opt.param_groups)
        assert lr_muon == pytest.approx(20 * lr_adamw, rel=1e-12), step
        opt.step()
        sched.step()
    assert lr_adamw < 1e-3  # warmed up and decaying
    with pytest.raises(ConfigError, match="optimizer.kwargs.adamw_lr is set by the config key lr"):
        build_optimizer(head, "muon", 1e-3, (0.9, 0.95), 0.0, {"adamw_lr": 1e-3})
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.kwargs.momentun' .*'momentum'"):
        build_optimizer(head, "muon", 1e-3, (0.9, 0.95), 0.0, {"momentun": 0.9})
    with pytest.raises(ConfigError, match="sets one absolute LR"):
        build_scheduler(opt, "rex", {}, base_lr=1e-3, warmup_steps=0, total_steps=20, min_ratio=0.1)
    normuon = build_optimizer(head, "normuon", 1e-3, (0.9, 0.95), 0.0, {})  # the variants split the same way
    assert [g["use_muon"] for g in normuon.param_groups] == [True, False]


def test_muon_trains_and_resumes_bitwise(tmp_path):
    data = build_tiny_sudoku(tmp_path / "data")
    muon = {"optimizer.name": "muon"}
    summary = train(tiny_overrides(data, tmp_path / "straight", **muon))
    assert summary["step"] == 8 and summary["eval/accuracy"] > 0
    train(tiny_overrides(data, tmp_path / "killed", max_steps=3, **muon))
    train(tiny_overrides(data, tmp_path / "killed", **muon))
    a, b = load_step_weights(tmp_path / "straight" / "step_8"), load_step_weights(tmp_path / "killed" / "step_8")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = torch.load(tmp_path / "straight" / "step_8" / "train_state.pt", weights_only=True)
    groups = state["optimizers"][-1]["param_groups"]
    assert [g["use_muon"] for g in groups] == [True, False]
    assert any("momentum_buffer" in s for s in state["optimizers"][-1]["state"].values())
    with pytest.raises(ConfigError, match="weight_decay changed under optimizer 'muon'"):
        train(tiny_overrides(data, tmp_path / "killed", epochs=3, weight_decay=0.05, **muon))
