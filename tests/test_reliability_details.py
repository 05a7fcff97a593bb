"""The smaller integrity fixes of issue 13: small LM corpora still get the validation/test splits they asked
for, the `mix` repetition warning only when something repeats, `train/count` is a count, builder progress
bars stay out of logs, and Ctrl-C during checkpoint rotation leaves no `.tmp-del-*` behind."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_helpers import build_tiny_sudoku, tiny_overrides, train


def _corpus(path: Path, docs: int) -> Path:
    rng = np.random.default_rng(1)
    words = ["red", "green", "blue", "cyan", "black", "white", "grey", "pink"]
    path.write_text("\n\n".join(" ".join(rng.choice(words, 50)) for _ in range(docs)), encoding="utf-8")
    return path


def test_small_lm_corpus_still_gets_requested_splits(tmp_path, capsys):
    from dataset.build_lm_dataset import main as build_lm
    from lm_dataset import load_lm_meta
    src = _corpus(tmp_path / "c.txt", 12)
    outs = []
    for name in ("a", "b"):  # 12 documents x 5 %: the hash split alone gives validation and test nothing
        build_lm(["--source", str(src), "--output-dir", str(tmp_path / name), "--vocab-size", "300",
                  "--max-seq-len", "32", "--doc-chars", "300"])
        outs.append(tmp_path / name)
    meta = load_lm_meta(outs[0])
    assert 3 <= meta["documents"] <= 12
    assert meta["splits"]["validation"] >= 1 and meta["splits"]["test"] >= 1 and meta["splits"]["train"] >= 1
    for f in ("train/prompt_tokens.npy", "validation/prompt_tokens.npy", "test/target_tokens.npy", "tokenizer.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()  # still deterministic
    # --val-ratio 0 asks for no validation split: none is forced
    build_lm(["--source", str(src), "--output-dir", str(tmp_path / "c"), "--vocab-size", "300", "--max-seq-len", "32",
              "--doc-chars", "300", "--val-ratio", "0", "--test-ratio", "0"])
    assert load_lm_meta(tmp_path / "c")["splits"]["validation"] == 0


def test_mix_warns_only_when_a_source_repeats(tmp_path, capsys):
    from dataset.build_lm_dataset import main as build_lm
    from lm_dataset import load_lm_meta
    build_lm(["--source", str(_corpus(tmp_path / "c.txt", 30)), "--output-dir", str(tmp_path / "d"),
              "--vocab-size", "300", "--max-seq-len", "32", "--doc-chars", "300"])
    n = load_lm_meta(tmp_path / "d")["splits"]["train"]
    capsys.readouterr()
    build_lm(["mix", "--inputs", f"{tmp_path / 'd'}:1", "--output-dir", str(tmp_path / "m1"), "--train-samples", str(n)])
    assert "repeating" not in capsys.readouterr().err  # exactly one pass: nothing repeats
    build_lm(["mix", "--inputs", f"{tmp_path / 'd'}:1", "--output-dir", str(tmp_path / "m2"),
              "--train-samples", str(n + 3)])
    assert f"has {n} train examples; repeating it to reach {n + 3}" in capsys.readouterr().err


def test_train_count_is_rows_halted_per_step(tmp_path):
    from utils.logger import read_jsonl
    data = build_tiny_sudoku(tmp_path / "d")
    train(tiny_overrides(data, tmp_path / "r", epochs=1))
    counts = [l["train/count"] for l in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "train/count" in l]
    # batch 16, halt_max_steps 2: every row halts within 2 steps, so ~8-16 rows finish per step (was 1.0)
    assert counts and all(4 <= c <= 16 for c in counts), counts


def test_builder_progress_bars_stay_out_of_logs(tmp_path, capsys):
    from dataset.build_maze_dataset import main as build_maze
    from dataset.build_sudoku_dataset import main as build_sudoku
    build_sudoku(["--generate", "30", "--grid", "4", "--blanks", "6", "--test-size", "5", "--num-aug", "2",
                  "--output-dir", str(tmp_path / "s")])
    build_maze(["--generate", "5", "--size", "7", "--test-size", "2", "--output-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err  # captured: not a terminal, like a log file
    assert "\r" not in err and "it/s" not in err and "puzzle/s" not in err and "maze/s" not in err, err[-500:]


def test_ctrl_c_during_rotation_leaves_no_temp(tmp_path, monkeypatch):
    from utils import checkpoint as ckpt
    w = {"w": torch.zeros(3)}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, f"step_{step}", w, {"step": step}, "x: 1\n")

    def interrupt(op, path):
        if op == "unlink" and ".tmp-del-" in str(path):
            ckpt.fault_hook = None
            raise KeyboardInterrupt
    ckpt.fault_hook = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            ckpt.rotate_checkpoints(tmp_path, 2)
    finally:
        ckpt.fault_hook = None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]
