"""evaluate.py / load_model_from_checkpoint on the original's checkpoint layout (a torch.save'd state_dict
named `step_N`, `_orig_mod.` prefixes from torch.compile, `all_config.yaml` beside it) and on ours."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from trainer_helpers import build_tiny_sudoku, load_step_weights, run_cli, tiny_overrides, train
from utils.checkpoint import CheckpointError, load_model_from_checkpoint


def _original_layout(our_step, out_dir, data_path):
    """Write our weights the way the original pretrain.py did."""
    cfg = yaml.safe_load((our_step / "config.yaml").read_text())
    arch = {k: v for k, v in cfg["arch"].items() if k not in ("batch_size", "seq_len", "vocab_size", "num_puzzle_identifiers")}
    original_cfg = {"arch": arch, "data_path": str(data_path), "global_batch_size": 16, "epochs": 2, "eval_interval": 1,
                    "checkpoint_every_eval": True, "lr": 1e-3, "lr_min_ratio": 1.0, "lr_warmup_steps": 2, "beta1": 0.9,
                    "beta2": 0.95, "weight_decay": 0.1, "puzzle_emb_weight_decay": 0.1, "puzzle_emb_lr": 1e-3,
                    "seed": 0, "checkpoint_path": str(out_dir), "project_name": "Sudoku4 ACT-torch",
                    "run_name": "HierarchicalReasoningModel_ACTV1 tiny-test", "eval_save_outputs": []}
    out_dir.mkdir(parents=True)
    (out_dir / "all_config.yaml").write_text(yaml.safe_dump(original_cfg))
    weights = {f"_orig_mod.{k}": v for k, v in load_step_weights(our_step).items()}
    torch.save(weights, out_dir / "step_8")
    return out_dir / "step_8"


def test_original_checkpoint_evaluates_like_ours(tmp_path):
    data = build_tiny_sudoku(tmp_path / "data")
    run_dir = tmp_path / "ours"
    train(tiny_overrides(data, run_dir))
    original = _original_layout(run_dir / "step_8", tmp_path / "orig", data)

    cfg_o, head_o = load_model_from_checkpoint(original)
    cfg_u, head_u = load_model_from_checkpoint(run_dir)  # a run dir means its newest step
    assert head_o.model.config.seq_len == 16 and head_o.model.config.vocab_size == 6
    so, su = head_o.state_dict(), head_u.state_dict()
    assert all(torch.equal(so[k], su[k]) for k in su)

    proc = run_cli(["evaluate.py", f"checkpoint={original}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    m_orig = json.loads((tmp_path / "orig" / "step_8_eval" / "metrics.json").read_text())
    import evaluate
    m_ours = evaluate.run(evaluate.parse_args([f"checkpoint={run_dir / 'step_8'}", f"output_dir={tmp_path / 'e'}"]))
    assert m_orig["eval/exact_accuracy"] == m_ours["eval/exact_accuracy"]
    assert m_orig["eval/accuracy"] == pytest.approx(m_ours["eval/accuracy"], abs=1e-12)
    p = np.load(tmp_path / "orig" / "step_8_eval" / "predictions.npz")
    assert set(p.files) == {"inputs", "labels", "puzzle_identifiers", "preds", "q_halt_logits", "segment_preds",
                            "segment_steps"}  # segments: save_segments=auto, small here


def test_original_trm_checkpoint_with_data_paths_loads_like_ours(tmp_path):
    """The original TRM's all_config.yaml: `data_paths` (a list) and keys only its trainer reads."""
    data = build_tiny_sudoku(tmp_path / "data")
    run_dir = tmp_path / "ours"
    train(tiny_overrides(data, run_dir) + ["arch=trm", "arch.H_cycles=2", "arch.puzzle_emb_len=2"])
    original = _original_layout(run_dir / "step_8", tmp_path / "orig", data)
    cfg = yaml.safe_load((tmp_path / "orig" / "all_config.yaml").read_text())
    del cfg["data_path"]
    cfg.update(data_paths=[str(data)], data_paths_test=[], evaluators=[], min_eval_interval=0, freeze_weights=False,
               load_checkpoint=None, ema=True, ema_rate=0.999)
    (tmp_path / "orig" / "all_config.yaml").write_text(yaml.safe_dump(cfg))
    cfg_o, head_o = load_model_from_checkpoint(original)
    _, head_u = load_model_from_checkpoint(run_dir / "step_8")
    assert cfg_o.data_path == str(data) and type(head_o.model).__name__ == "TinyRecursiveReasoningModel_ACTV1"
    so, su = head_o.state_dict(), head_u.state_dict()
    assert so.keys() == su.keys() and all(torch.equal(so[k], su[k]) for k in su)
    cfg["data_paths"] = [str(data), str(data)]
    (tmp_path / "orig" / "all_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="data_paths has 2 entries; pass data_path="):
        load_model_from_checkpoint(original)
    assert load_model_from_checkpoint(original, data_path=str(data))[0].data_path == str(data)


def test_evaluate_cli_errors_are_one_line(tmp_path):
    proc = run_cli(["evaluate.py", "checkpoint=/nonexistent/step_3"])
    assert proc.returncode == 2 and proc.stderr.strip() == "error: checkpoint '/nonexistent/step_3' does not exist"
    proc = run_cli(["evaluate.py", "checkpont=x"])
    assert proc.returncode == 2 and "did you mean 'checkpoint'" in proc.stderr
    bad = tmp_path / "step_1"
    bad.write_bytes(b"not a checkpoint")
    (tmp_path / "all_config.yaml").write_text("arch: {}\n")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model_from_checkpoint(bad)
