"""Progress you can trust in a log file (a wall-clock line with ETA, whatever log_every is) and the eval at
the end of every run, also one stopped by max_steps with eval_interval=null."""
from __future__ import annotations

import json

import pytest

from trainer_helpers import build_tiny_sudoku, tiny_overrides, train
from utils import progress


def test_plain_progress_lines_carry_count_rate_and_eta(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    bar = progress.Progress(4, desc="eval", unit="batch")
    assert bar.disable  # pytest's stderr is not a terminal: no bar, plain lines instead
    bar.set_postfix({"lm_loss": "1.23"})
    for _ in range(2):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("eval: 2/4 batch (50%), ") and "ETA " in lines[1] and lines[1].endswith("lm_loss=1.23")
    assert list(progress.track(range(3), desc="x")) == [0, 1, 2]
    assert progress.format_seconds(4000) == "1h06m" and progress.format_seconds(75) == "1m15s"


def test_training_prints_a_progress_line_between_metric_syncs_and_evaluates_at_max_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    data = build_tiny_sudoku(tmp_path / "data")
    summary = train(tiny_overrides(data, tmp_path / "run", eval_interval=None, epochs=4, max_steps=3, log_every=1000))
    out = capsys.readouterr().out
    step_lines = [l for l in out.splitlines() if l.startswith("t: ")]
    assert [l.split()[1] for l in step_lines] == ["1/3", "2/3", "3/3"], out  # no metric sync happened before step 3
    assert all("ETA" in l for l in step_lines)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/exact_accuracy" in r]
    assert [r["step"] for r in evals] == [3]  # eval_interval=null: evaluated at the end, and a max_steps stop is an end
    assert "eval/exact_accuracy" in summary
    done = next(l for l in out.splitlines() if l.startswith("done: "))
    assert "; ;" not in done and "eval/exact_accuracy=" in done
