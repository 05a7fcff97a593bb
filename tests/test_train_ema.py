"""EMA of the weights (`ema=true`): the formula step by step, parameters only, exact kill/resume, and that
evaluation, best/, evaluate.py and init_from use the EMA weights while model.safetensors stays the live ones."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer_helpers import compose, load_step_weights, tiny_overrides, train
from utils.checkpoint import CheckpointError, list_step_dirs
from utils.ema import WeightEMA
from utils.logger import read_jsonl
from utils.schema import ConfigError

RATE = 0.8  # far from 1 so that 8 tiny steps move the shadow visibly away from the live weights


def ema_step(shadow: torch.Tensor, param: torch.Tensor, rate: float) -> torch.Tensor:
    """The original's line (TinyRecursiveModels models/ema.py), written out."""
    return (1.0 - rate) * param + rate * shadow


@pytest.fixture(scope="module")
def ema_run(tiny_data, tmp_path_factory) -> Path:
    """8 steps with a checkpoint after every step and an eval (+ best/) after each of the 2 epochs."""
    run_dir = tmp_path_factory.mktemp("runs") / "ema"
    train(tiny_overrides(tiny_data, run_dir, ema=True, ema_rate=RATE, checkpoint_interval_steps=1,
                         **{"save_best.metric": "eval/lm_loss", "save_best.mode": "min"}))
    return run_dir


def test_weight_ema_follows_its_formula_and_skips_buffers():
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    net.register_buffer("table", torch.randn(5, 3, generator=gen))
    net[1].bias.requires_grad_(False)  # frozen parameters are not averaged either
    ema = WeightEMA(net, rate=0.9)
    assert ema.names == ["0.weight", "0.bias", "1.weight"]
    expected = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        net(torch.randn(8, 4, generator=gen)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        live = dict(net.named_parameters())
        expected = {n: ema_step(s, live[n].detach(), 0.9) for n, s in expected.items()}
        for n, s in ema.state_dict().items():
            assert torch.equal(s, expected[n]), n
    live = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert not torch.equal(live["0.weight"], expected["0.weight"])
    with ema.applied():
        for n, p in net.named_parameters():
            assert torch.equal(p, expected.get(n, live[n])), n
    for n, p in net.named_parameters():  # exactly the live weights again
        assert torch.equal(p, live[n]), n


def test_ema_rate_is_validated(tiny_data, tmp_path):
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"'ema_rate' must be in \[0\.0, 1\.0\)"):
            compose(tiny_overrides(tiny_data, tmp_path, ema=True, ema_rate=bad))
    with pytest.raises(ConfigError, match="ema"):
        compose(tiny_overrides(tiny_data, tmp_path, ema="maybe"))


def test_trainer_ema_matches_the_formula_every_step(ema_run):
    steps = [s for s, _ in list_step_dirs(ema_run)]
    assert steps == list(range(1, 9))
    live = {s: load_step_weights(ema_run / f"step_{s}") for s in steps}
    shadow = {s: load_step_weights(ema_run / f"step_{s}", "ema.safetensors") for s in steps}
    # parameters only: the puzzle table and the init states are buffers, not averaged
    assert "model.inner.puzzle_emb.weights" in live[1] and "model.inner.H_init" in live[1]
    assert set(shadow[1]) == {k for k in live[1] if "puzzle_emb" not in k and not k.endswith(("H_init", "L_init"))
                              and "rotary" not in k}
    for s in steps[1:]:
        for k in shadow[s]:
            assert torch.equal(shadow[s][k], ema_step(shadow[s - 1][k], live[s][k], RATE)), (s, k)
    assert any(not torch.equal(shadow[8][k], live[8][k]) for k in shadow[8])


def test_eval_best_and_evaluate_use_the_ema_weights(ema_run):
    import evaluate
    evals = [l for l in read_jsonl(ema_run / "metrics.jsonl") if "eval/lm_loss" in l]
    assert [l["step"] for l in evals] == [4, 8]
    step8 = ema_run / "step_8"
    ema_metrics = evaluate.run(evaluate.parse_args([f"checkpoint={step8}", f"output_dir={ema_run / 'e1'}"]))
    live_metrics = evaluate.run(evaluate.parse_args([f"checkpoint={step8}", "ema=false", f"output_dir={ema_run / 'e2'}"]))
    for key in ("eval/accuracy", "eval/exact_accuracy", "eval/lm_loss"):
        assert ema_metrics[key] == pytest.approx(evals[-1][key], rel=1e-9, abs=1e-12)  # what training saw
    assert live_metrics["eval/lm_loss"] != pytest.approx(ema_metrics["eval/lm_loss"], rel=1e-6)

    best = json.loads((ema_run / "best" / "best.json").read_text())
    assert best["value"] == pytest.approx(min(l["eval/lm_loss"] for l in evals))
    best_step = ema_run / f"step_{best['step']}"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_step_weights(ema_run / "best", name), load_step_weights(best_step, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_evaluate_ema_true_needs_ema_weights(tiny_data, tmp_path):
    import evaluate
    run_dir = tmp_path / "noema"
    train(tiny_overrides(tiny_data, run_dir, max_steps=1))
    assert not (run_dir / "step_1" / "ema.safetensors").exists()
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        evaluate.run(evaluate.parse_args([f"checkpoint={run_dir / 'step_1'}", "ema=true"]))


def test_ema_survives_kill_and_resume_bitwise(tiny_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(tiny_overrides(tiny_data, straight, ema=True, ema_rate=RATE))
    train(tiny_overrides(tiny_data, killed, ema=True, ema_rate=RATE, max_steps=3))  # "killed" after step 3
    train(tiny_overrides(tiny_data, killed, ema=True, ema_rate=RATE))
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_step_weights(straight / "step_8", name), load_step_weights(killed / "step_8", name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    ev_a = [l for l in read_jsonl(straight / "metrics.jsonl") if "eval/lm_loss" in l and l["step"] == 8]
    ev_b = [l for l in read_jsonl(killed / "metrics.jsonl") if "eval/lm_loss" in l and l["step"] == 8]
    assert ev_a[0]["eval/lm_loss"] == ev_b[0]["eval/lm_loss"]


def test_init_from_and_reset_progress_start_from_the_ema_weights(ema_run, tiny_data, tmp_path, capsys):
    source = ema_run / "step_8"
    model = {**load_step_weights(source), **load_step_weights(source, "ema.safetensors")}
    run_dir = tmp_path / "init"
    train(tiny_overrides(tiny_data, run_dir, init_from=source, max_steps=1, lr=0.0, puzzle_emb_lr=0.0, ema=True))
    assert "its EMA weights" in capsys.readouterr().out
    got, got_ema = load_step_weights(run_dir / "step_1"), load_step_weights(run_dir / "step_1", "ema.safetensors")
    for k in model:  # lr 0: the initial weights pass through; the new EMA starts from them
        assert torch.equal(got[k], model[k]), k
        if k in got_ema:  # one update at the default rate from a shadow that started at the same weights
            assert torch.equal(got_ema[k], ema_step(model[k], model[k], 0.999)), k

    again = tmp_path / "again"
    shutil.copytree(ema_run, again, ignore=shutil.ignore_patterns("step_[1-7]", "best", "e1", "e2"))
    train(tiny_overrides(tiny_data, again, epochs=1, reset_progress=True, lr=0.0, puzzle_emb_lr=0.0, ema=True))
    got = load_step_weights(again / "step_4")
    assert all(torch.equal(got[k], model[k]) for k in model)
