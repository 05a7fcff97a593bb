"""ARC voting and pass@K on hand-made predictions: augmentations undone, votes ranked by count then
mean q_halt confidence, a task counts only if all its test inputs are right."""
from __future__ import annotations

import numpy as np
import pytest

from dataset.common import arc_identifier, dihedral_transform
from utils import arc_scoring

EOS, OFFSET = 1, 2


def canvas(grid: np.ndarray) -> np.ndarray:
    """A grid as the builder encodes it: colours +2 at the top-left of 30x30, EOS below and to the right."""
    g = np.asarray(grid)
    out = np.zeros((30, 30), dtype=np.int64)
    r, c = g.shape
    out[:r, :c] = g + OFFSET
    out[r, :c] = EOS
    out[:r, c] = EOS
    return out.reshape(-1)


def augment(grid: np.ndarray, tid: int, cmap: np.ndarray) -> np.ndarray:
    return dihedral_transform(cmap[np.asarray(grid)], tid)


class Rows:
    def __init__(self):
        self.identifiers = ["<blank>"]
        self.inputs, self.labels, self.preds, self.pids, self.q = [], [], [], [], []

    def add(self, task, tid, cmap, inp, label, pred, q_logit):
        name = arc_identifier(task, tid, cmap)
        if name not in self.identifiers:
            self.identifiers.append(name)
        self.inputs.append(canvas(augment(inp, tid, cmap)))
        self.labels.append(canvas(augment(label, tid, cmap)))
        self.preds.append(canvas(augment(pred, tid, cmap)))
        self.pids.append(self.identifiers.index(name))
        self.q.append(q_logit)

    def vote(self):
        return arc_scoring.vote(np.stack(self.inputs), np.stack(self.labels), np.stack(self.preds),
                                np.array(self.pids), np.array(self.q), self.identifiers)


IDENT = np.arange(10)
SWAP = np.array([0, 2, 1, 3, 4, 5, 6, 7, 8, 9])  # colours 1 <-> 2


def test_voting_and_pass_at_k():
    rng = np.random.default_rng(0)
    grid = lambda shape: rng.integers(0, 4, size=shape)  # noqa: E731
    rows = Rows()
    # Task A, one test input: 2 of 3 variants predict the answer -> solved at k=1.
    a_in, a_out = grid((3, 4)), grid((3, 4))
    rows.add("aaaa0001", 0, IDENT, a_in, a_out, a_out, 1.0)
    rows.add("aaaa0001", 1, SWAP, a_in, a_out, a_out, 1.0)
    rows.add("aaaa0001", 6, IDENT, a_in, a_out, (a_out + 1) % 4, 5.0)
    # Task B, two test inputs. Input 1 right. Input 2: wrong and right answers tie on votes (1 each);
    # the wrong one has the higher confidence -> right only at k=2. Task solved at k=2, not k=1.
    b1_in, b1_out, b2_in, b2_out = grid((2, 2)), grid((2, 2)), grid((5, 3)), grid((5, 3))
    rows.add("bbbb0002", 0, IDENT, b1_in, b1_out, b1_out, 0.0)
    rows.add("bbbb0002", 0, IDENT, b2_in, b2_out, np.zeros((5, 3), int), 3.0)
    rows.add("bbbb0002", 2, SWAP, b2_in, b2_out, b2_out, -3.0)
    # Task C: never right.
    c_in, c_out = grid((4, 4)), grid((4, 4))
    rows.add("cccc0003", 3, IDENT, c_in, c_out, np.full((4, 4), 9), 0.0)
    rows.add("cccc0003", 5, SWAP, c_in, c_out, np.full((2, 2), 9), 0.0)

    tasks = rows.vote()
    assert set(tasks) == {"aaaa0001", "bbbb0002", "cccc0003"}
    assert len(tasks["bbbb0002"]) == 2
    top_a = next(iter(tasks["aaaa0001"].values())).ranked()[0]
    assert top_a.votes == 2 and np.array_equal(top_a.grid, a_out)  # de-augmented before voting
    scores = arc_scoring.pass_at_k(tasks)
    assert scores["pass@1"] == pytest.approx(1 / 3)
    assert scores["pass@2"] == pytest.approx(2 / 3)
    assert scores["pass@10"] == pytest.approx(2 / 3)
    assert scores["num_tasks"] == 3

    sub = arc_scoring.submission(tasks)
    assert list(sub) == ["aaaa0001", "bbbb0002", "cccc0003"]
    assert sub["aaaa0001"][0]["attempt_1"] == a_out.tolist()
    assert sub["bbbb0002"][1]["attempt_1"] == np.zeros((5, 3), int).tolist()  # higher q wins the tie
    assert sub["bbbb0002"][1]["attempt_2"] == b2_out.tolist()
    assert len(sub["cccc0003"][0]) == 2


def test_blank_rows_are_ignored_and_votes_beat_confidence():
    rows = Rows()
    inp, out = np.array([[1, 2], [3, 0]]), np.array([[2, 2], [0, 1]])
    wrong = np.array([[0, 0], [0, 0]])
    rows.add("dddd0004", 0, IDENT, inp, out, wrong, 9.0)
    rows.add("dddd0004", 1, IDENT, inp, out, out, -9.0)
    rows.add("dddd0004", 7, SWAP, inp, out, out, -9.0)
    rows.inputs.append(np.zeros(900, np.int64)); rows.labels.append(np.full(900, -100))  # noqa: E702
    rows.preds.append(np.zeros(900, np.int64)); rows.pids.append(0); rows.q.append(0.0)  # noqa: E702
    tasks = rows.vote()
    assert list(tasks) == ["dddd0004"]
    assert arc_scoring.pass_at_k(tasks)["pass@1"] == 1.0  # 2 votes beat 1 vote with higher confidence


def test_predictions_that_crop_to_nothing_never_reach_the_submission():
    rows = Rows()
    inp, out = np.array([[1, 2], [3, 0]]), np.array([[2, 2], [0, 1]])
    rows.add("eeee0005", 0, IDENT, inp, out, out, 0.0)
    for tid in (1, 2):  # the most-voted "prediction" is an empty crop (EOS at the top-left corner)
        rows.add("eeee0005", tid, IDENT, inp, out, out, 0.0)
        rows.preds[-1] = np.full(900, EOS)
    rows.add("ffff0006", 0, IDENT, inp, out, out, 0.0)
    rows.preds[-1] = np.zeros(900, np.int64)  # only an empty candidate: the 1x1 fallback
    tasks = rows.vote()
    assert next(iter(tasks["eeee0005"].values())).ranked()[0].grid.size == 0  # it still counts as a (wrong) vote
    sub = arc_scoring.submission(tasks)
    assert arc_scoring.submission_errors(sub) == []
    assert sub["eeee0005"][0] == {"attempt_1": out.tolist(), "attempt_2": out.tolist()}
    assert sub["ffff0006"][0] == {"attempt_1": [[0]], "attempt_2": [[0]]}


@pytest.mark.parametrize("bad,message", [
    ({"t": [{"attempt_1": [], "attempt_2": [[1]]}]}, "t[0].attempt_1: not a non-empty list of non-empty rows"),
    ({"t": [{"attempt_1": [[1, 2], [3]], "attempt_2": [[1]]}]}, "t[0].attempt_1: not a rectangle"),
    ({"t": [{"attempt_1": [[10]], "attempt_2": [[1]]}]}, "t[0].attempt_1: cells must be ints 0-9"),
    ({"t": [{"attempt_1": [[1]]}]}, "t[0]: expected keys attempt_1 and attempt_2"),
])
def test_submission_format_check_names_the_bad_attempt(bad, message):
    assert any(e.startswith(message) for e in arc_scoring.submission_errors(bad))


def _write_arc_tasks(root, rng, n_train=4, n_eval=2):
    import json
    for sub, n in (("training", n_train), ("evaluation", n_eval)):
        (root / sub).mkdir(parents=True)
        for t in range(n):
            def pair():
                h, w = rng.integers(2, 6, size=2)
                g = rng.integers(0, 10, size=(h, w))
                return {"input": g.tolist(), "output": np.rot90(g).tolist()}
            task = {"train": [pair(), pair()], "test": [pair()]}
            (root / sub / f"{sub[0]}{t:07x}.json").write_text(json.dumps(task))


def test_evaluate_writes_a_valid_arc_submission_and_refuses_arc_on_other_data(tmp_path):
    """End to end on a hand-made ARC corpus: a barely trained model predicts mostly garbage (much of it
    crops to nothing), and submission.json must still be valid ARC Prize format."""
    import json

    import evaluate
    from dataset import build_arc_dataset
    from trainer_helpers import build_tiny_sudoku, compose, tiny_overrides, train
    from utils.schema import ConfigError
    _write_arc_tasks(tmp_path / "src", np.random.default_rng(0))
    data = tmp_path / "arc"
    build_arc_dataset.main(["--dataset-dirs", str(tmp_path / "src"), "--output-dir", str(data), "--num-aug", "2"])
    train(tiny_overrides(data, tmp_path / "run", global_batch_size=8, max_steps=2, epochs=1, eval_interval=None))
    evaluate.run(evaluate.parse_args([f"checkpoint={tmp_path / 'run' / 'step_2'}", "device=cpu"]))
    sub = json.loads((tmp_path / "run" / "step_2" / "submission.json").read_text())
    assert len(sub) == 2 and arc_scoring.submission_errors(sub) == []
    metrics = json.loads((tmp_path / "run" / "step_2" / "metrics.json").read_text())
    assert "arc/pass@1" in metrics and metrics["arc/num_tasks"] == 2

    sudoku = build_tiny_sudoku(tmp_path / "sudoku")
    train(tiny_overrides(sudoku, tmp_path / "srun", max_steps=1, epochs=1))
    with pytest.raises(ConfigError, match="arc=true, but '.*sudoku' is not an ARC dataset .*seq_len 16"):
        evaluate.run(evaluate.parse_args([f"checkpoint={tmp_path / 'srun' / 'step_1'}", "arc=true", "device=cpu"]))
    assert not (tmp_path / "srun" / "step_1" / "metrics.json").exists()


def test_pretrain_evals_report_arc_pass_at_k(tmp_path):
    """pretrain.py's evals on an ARC dataset vote and report pass@1/2/10 with the same code as evaluate.py."""
    from dataset import build_arc_dataset
    from trainer_helpers import tiny_overrides, train
    _write_arc_tasks(tmp_path / "src", np.random.default_rng(1))
    data = tmp_path / "arc"
    build_arc_dataset.main(["--dataset-dirs", str(tmp_path / "src"), "--output-dir", str(data), "--num-aug", "2"])
    summary = train(tiny_overrides(data, tmp_path / "run", global_batch_size=8, epochs=1, eval_interval=None))
    assert summary["arc/num_tasks"] == 2
    assert {"arc/pass@1", "arc/pass@2", "arc/pass@10"} <= set(summary)
    assert 0.0 <= summary["arc/pass@1"] <= summary["arc/pass@2"] <= 1.0
