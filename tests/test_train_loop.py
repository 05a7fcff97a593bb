"""The training loop end to end on a tiny Sudoku set: train, eval, checkpoints, evaluate.py, exact resume,
rotation/best, auto-resume, reset_progress, init_from, non-finite losses, W&B offline vs JSONL."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_helpers import load_step_weights, tiny_overrides, train
from utils.checkpoint import CheckpointError, list_step_dirs
from utils.logger import read_jsonl


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    """8 steps (2 epochs of 4 batches), eval + checkpoint after each epoch."""
    run_dir = tmp_path_factory.mktemp("runs") / "base"
    train(tiny_overrides(tiny_data, run_dir, loader_workers=1))
    return run_dir


def test_end_to_end_train_eval_checkpoint_evaluate(finished_run, tiny_data):
    steps = [s for s, _ in list_step_dirs(finished_run)]
    assert steps == [4, 8]  # 64 puzzles / 16 per batch = 4 steps per epoch, a checkpoint per eval
    step8 = finished_run / "step_8"
    weights = load_step_weights(step8)
    assert all(k.startswith("model.inner.") for k in weights)  # the original's parameter names
    assert "model.inner.puzzle_emb.weights" in weights and "model.inner.H_init" in weights
    state = torch.load(step8 / "train_state.pt", weights_only=True)
    assert state["step"] == 8 and state["data"] == {"epoch": 2, "set_index": 0, "batch": 0}
    assert len(state["optimizers"]) == 2 and len(state["ranks"]) == 1
    assert "arch:" in (step8 / "config.yaml").read_text() and "seq_len: 16" in (step8 / "config.yaml").read_text()

    log = read_jsonl(finished_run / "metrics.jsonl")
    train_lines = [l for l in log if "train/lm_loss" in l]
    assert [l["step"] for l in train_lines] == [2, 4, 6, 8]
    assert train_lines[-1]["train/lm_loss"] < train_lines[0]["train/lm_loss"]  # it learns something
    evals = [l for l in log if "eval/exact_accuracy" in l]
    assert [l["step"] for l in evals] == [4, 8]
    assert {"eval/accuracy", "eval/steps", "eval/q_halt_accuracy", "eval/lm_loss"} <= set(evals[-1])
    assert evals[-1]["eval/steps"] == 2.0  # eval always runs halt_max_steps segments
    assert {"perf/samples_per_s", "perf/step_ms", "perf/peak_mem_mib", "train/lr"} <= set(train_lines[-1])

    # evaluate.py on the same checkpoint reproduces the training-time eval exactly.
    import evaluate
    out = finished_run / "eval_out"
    metrics = evaluate.run(evaluate.parse_args([f"checkpoint={step8}", f"output_dir={out}"]))
    for key in ("eval/accuracy", "eval/exact_accuracy", "eval/lm_loss"):
        assert metrics[key] == pytest.approx(evals[-1][key], rel=1e-9, abs=1e-12)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval/num_examples"] == 32
    preds = np.load(out / "predictions.npz")
    assert preds["preds"].shape == (32, 16) and preds["labels"].shape == (32, 16)
    exact = np.mean(np.all((preds["preds"] == preds["labels"]) | (preds["labels"] == -100), axis=1))
    assert exact == pytest.approx(saved["eval/exact_accuracy"])


def test_exact_resume_after_kill_is_bitwise_identical(tiny_data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(tiny_overrides(tiny_data, straight))
    # "Kill" mid-window at step 3 (after its checkpoint), then a new process-equivalent run resumes.
    train(tiny_overrides(tiny_data, killed, max_steps=3, loader_workers=1))
    assert [s for s, _ in list_step_dirs(killed)] == [3]
    train(tiny_overrides(tiny_data, killed))
    a, b = load_step_weights(straight / "step_8"), load_step_weights(killed / "step_8")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(straight / "step_8" / "train_state.pt", weights_only=True)
    sb = torch.load(killed / "step_8" / "train_state.pt", weights_only=True)
    for ca, cb in zip(sa["ranks"][0]["carries"][0].values(), sb["ranks"][0]["carries"][0].values()):
        assert torch.equal(ca, cb)
    assert torch.equal(sa["ranks"][0]["exploration_rng"], sb["ranks"][0]["exploration_rng"])


def test_rotation_and_best_model(tiny_data, tmp_path):
    run_dir = tmp_path / "rot"
    train(tiny_overrides(tiny_data, run_dir, epochs=4, checkpoint_limit=2, **{"save_best.metric": "eval/accuracy"}))
    assert [s for s, _ in list_step_dirs(run_dir)] == [12, 16]
    evals = [l for l in read_jsonl(run_dir / "metrics.jsonl") if "eval/accuracy" in l]
    best_line = max(evals, key=lambda l: l["eval/accuracy"])  # first maximum wins (strict improvement)
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["value"] == pytest.approx(best_line["eval/accuracy"]) and best["step"] == best_line["step"]
    assert torch.load(run_dir / "best" / "train_state.pt", weights_only=True)["step"] == best_line["step"]


def test_auto_resume_then_reset_progress(finished_run, tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "resume"
    shutil.copytree(finished_run, run_dir)
    train(tiny_overrides(tiny_data, run_dir, epochs=3))  # same run dir: continues at step 8
    assert "resuming from" in capsys.readouterr().out
    assert [s for s, _ in list_step_dirs(run_dir)] == [4, 8, 12]
    steps_logged = [l["step"] for l in read_jsonl(run_dir / "metrics.jsonl") if "train/lm_loss" in l]
    assert steps_logged == [2, 4, 6, 8, 10, 12]  # no duplicates, no gap

    # reset_progress: weights of step 12, everything else from zero; old checkpoints move aside.
    before = load_step_weights(run_dir / "step_12")
    train(tiny_overrides(tiny_data, run_dir, epochs=1, reset_progress=True, lr=0.0, puzzle_emb_lr=0.0))
    assert [s for s, _ in list_step_dirs(run_dir)] == [4]
    assert [s for s, _ in list_step_dirs(run_dir / "before_reset")] == [4, 8, 12]
    after = load_step_weights(run_dir / "step_4")
    for k in before:  # lr 0: the loaded weights pass through unchanged
        assert torch.equal(before[k], after[k]), k


def test_init_from_resizes_the_puzzle_embedding(finished_run, tiny_data, tmp_path):
    data2 = tmp_path / "data3ids"
    shutil.copytree(tiny_data, data2)
    for split in ("train", "test"):
        meta_file = data2 / split / "dataset.json"
        meta = json.loads(meta_file.read_text())
        meta["num_puzzle_identifiers"] = 3
        meta_file.write_text(json.dumps(meta))
    (data2 / "identifiers.json").write_text(json.dumps(["<blank>", "extra1", "extra2"]))
    run_dir = tmp_path / "init"
    train(tiny_overrides(data2, run_dir, data_path=data2, init_from=finished_run / "step_8", max_steps=1,
                         lr=0.0, puzzle_emb_lr=0.0))
    old = load_step_weights(finished_run / "step_8")["model.inner.puzzle_emb.weights"]
    new = load_step_weights(run_dir / "step_1")["model.inner.puzzle_emb.weights"]
    assert old.shape == (1, 32) and new.shape == (3, 32)
    assert torch.equal(new[0], old[0]) and torch.allclose(new[1:], old.mean(0).expand(2, -1))


def test_checkpoint_with_other_shapes_is_refused(finished_run, tiny_data, tmp_path):
    run_dir = tmp_path / "mismatch"
    shutil.copytree(finished_run, run_dir)
    with pytest.raises(CheckpointError, match=r"key 'model\.inner\.\S+' has shape \[\d+(, \d+)*\] but the config gives \[\d+(, \d+)*\]"):
        train(tiny_overrides(tiny_data, run_dir) + ["arch.hidden_size=64", "arch.puzzle_emb_ndim=64"])


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(_Evil.marker),))


def test_pickled_checkpoint_is_refused_not_executed(tiny_data, tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    bad = tmp_path / "orig" / "step_5"
    bad.parent.mkdir()
    torch.save({"model.inner.x": torch.zeros(1), "payload": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="pickled Python objects; refused"):
        train(tiny_overrides(tiny_data, tmp_path / "r", init_from=bad, max_steps=1))
    assert not Path(_Evil.marker).exists()


def test_unwritable_checkpoint_dir(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="is not writable"):
        train(tiny_overrides(tiny_data, blocker / "sub"))


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tiny_data, tmp_path, monkeypatch):
    from models import losses
    real = losses.ACTLossHead.forward

    def nan_loss(self, *a, **kw):
        carry, loss, metrics, outputs, halted = real(self, *a, **kw)
        return carry, loss * float("nan"), metrics, outputs, halted

    monkeypatch.setattr(losses.ACTLossHead, "forward", nan_loss)
    import pretrain
    with pytest.raises(pretrain.TrainError, match="non-finite loss at step 1"):
        train(tiny_overrides(tiny_data, tmp_path / "stop", max_steps=2))
    assert list_step_dirs(tmp_path / "stop") == []  # nothing written after a bad update

    summary = train(tiny_overrides(tiny_data, tmp_path / "skip", max_steps=2, nonfinite_loss="skip"))
    assert summary["skipped_steps"] == 2


def _wandb_history(run_dir: Path) -> list[dict]:
    """Read the history records of an offline W&B run (its .wandb file is a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, "no offline W&B run written"
    data, pos, block, pending, out = files[-1].read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full record / last fragment
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return out


def test_wandb_offline_and_jsonl_hold_the_same_metrics(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "wb"
    train(tiny_overrides(tiny_data, run_dir, logger="wandb", epochs=1))
    jsonl: dict[int, dict] = {}
    for line in read_jsonl(run_dir / "metrics.jsonl"):  # W&B merges the logs of one step into one row
        jsonl.setdefault(line["step"], {}).update(line)
    import time
    for _ in range(50):  # the W&B service writes its log file asynchronously; give it a moment under load
        history = _wandb_history(run_dir)
        if any("eval/exact_accuracy" in rec for rec in history):
            break
        time.sleep(0.2)
    seen = 0
    for rec in history:
        step = rec.get("_step")
        for key in ("train/lm_loss", "eval/exact_accuracy", "eval/accuracy", "train/lr"):
            if key in rec:
                assert rec[key] == pytest.approx(jsonl[step][key], rel=1e-12), (key, step, rec, jsonl[step])
                seen += 1
    assert seen >= 5, history


def test_interrupted_checkpoint_write_leaves_nothing_partial(finished_run, tmp_path, monkeypatch):
    """Ctrl-C while a checkpoint is being written: no step dir, no temp dir, the previous one intact."""
    from utils import checkpoint as ckpt
    run_dir = tmp_path / "ctrlc"
    shutil.copytree(finished_run, run_dir)
    before = load_step_weights(run_dir / "step_8")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run_dir, "step_9", before, {"step": 9}, "x: 1\n")
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run_dir, "step_8", before, {"step": 8}, "x: 1\n")  # overwrite attempt
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".tmp", "step_"))) == ["step_4", "step_8"]
    after = load_step_weights(run_dir / "step_8")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ckpt.latest_checkpoint(run_dir) == run_dir / "step_8"


def test_early_stopping_after_patience(tiny_data, tmp_path, capsys):
    # lr 0: the metric never improves after the first eval, so patience 2 stops after the 3rd eval
    summary = train(tiny_overrides(tiny_data, tmp_path / "es", epochs=6, lr=0.0, puzzle_emb_lr=0.0, eval_patience=2,
                                   **{"save_best.metric": "eval/lm_loss", "save_best.mode": "min"}))
    assert summary["step"] == 12 and "early stop at step 12" in capsys.readouterr().out


def test_eval_save_outputs_land_in_the_step_dir(tiny_data, tmp_path):
    run_dir = tmp_path / "eso"
    train(tiny_overrides(tiny_data, run_dir, epochs=1) + ["eval_save_outputs=[inputs,labels,preds,q_halt_logits]"])
    saved = np.load(run_dir / "step_4" / "eval_outputs.npz")
    assert saved["preds"].shape == (32, 16) and saved["q_halt_logits"].shape == (32,)
    evals = [l for l in read_jsonl(run_dir / "metrics.jsonl") if "eval/exact_accuracy" in l]
    exact = np.mean(np.all((saved["preds"] == saved["labels"]) | (saved["labels"] == -100), axis=1))
    assert exact == pytest.approx(evals[-1]["eval/exact_accuracy"])
