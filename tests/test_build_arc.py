"""ARC builder: original encoding and split rule, stable ids, invertible augmentations, bad task files."""
import json
import shutil

import numpy as np
import pytest

from dataset import build_arc_dataset as ba
from dataset.common import (arc_grid_from_tokens, invert_arc_augmentation, parse_arc_identifier,
                            validate_puzzle_dataset)
from data_helpers import arc_task_tree, digest
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig

N_TRAIN, N_EVAL = 12, 6


@pytest.fixture(scope="module")
def arc_src(tmp_path_factory, shared_data):
    files = sorted((shared_data / "arc-agi-1" / "training").glob("*.json"))
    assert len(files) == 400
    return arc_task_tree(tmp_path_factory.mktemp("arc_src"), files[:N_TRAIN], files[N_TRAIN:N_TRAIN + N_EVAL])


@pytest.fixture(scope="module")
def arc_built(tmp_path_factory, arc_src):
    out = tmp_path_factory.mktemp("arc_out") / "ds"
    ba.main(["--dataset-dirs", str(arc_src), "--output-dir", str(out), "--num-aug", "8", "--seed", "42"])
    return out


def load_task(path):
    with open(path) as f:
        return json.load(f)


def test_layout_metadata_and_split_rule(arc_built, arc_src):
    validate_puzzle_dataset(arc_built)
    names = json.loads((arc_built / "identifiers.json").read_text())
    assert names[0] == "<blank>" and len(names) == 1 + (N_TRAIN + N_EVAL) * 9
    tr = PuzzleDataset(PuzzleDatasetConfig(0, str(arc_built), 4, False, 1, 0, 1)).metadata
    te = PuzzleDataset(PuzzleDatasetConfig(0, str(arc_built), 4, True, 1, 0, 1), split="test").metadata
    assert (tr.vocab_size, tr.seq_len, tr.num_puzzle_identifiers) == (12, 900, len(names))
    assert tr.total_groups == N_TRAIN + N_EVAL and te.total_groups == N_EVAL
    # train split: every pair of training tasks, only the demonstrations of evaluation tasks
    n_train = sum(len(load_task(p)["train"]) + (len(load_task(p)["test"]) if p.parent.name == "training" else 0)
                  for p in arc_src.rglob("*.json"))
    n_test = sum(len(load_task(p)["test"]) for p in (arc_src / "evaluation").glob("*.json"))
    assert len(np.load(arc_built / "train" / "all__inputs.npy")) == 9 * n_train
    assert len(np.load(arc_built / "test" / "all__inputs.npy")) == 9 * n_test
    assert np.isclose(tr.mean_puzzle_examples, n_train / ((N_TRAIN + N_EVAL)))
    # a test puzzle shares its id with the train puzzle of the same variant
    te_ids = set(np.load(arc_built / "test" / "all__puzzle_identifiers.npy").tolist())
    tr_ids = set(np.load(arc_built / "train" / "all__puzzle_identifiers.npy").tolist())
    assert te_ids <= tr_ids and len(te_ids) == 9 * N_EVAL


def test_encoding_has_eos_border(arc_built, arc_src):
    names = json.loads((arc_built / "identifiers.json").read_text())
    pids = np.load(arc_built / "test" / "all__puzzle_identifiers.npy")
    pi = np.load(arc_built / "test" / "all__puzzle_indices.npy")
    inputs = np.load(arc_built / "test" / "all__inputs.npy")
    p = int(np.flatnonzero([names[i] == names[pids[0]].split("_")[0] for i in pids])[0])
    task = load_task(arc_src / "evaluation" / f"{names[pids[p]]}.json")
    grid = np.array(task["test"][0]["input"])
    canvas = inputs[pi[p]].reshape(30, 30)
    nr, nc = grid.shape
    assert np.array_equal(canvas[:nr, :nc], grid + 2)
    if nr < 30:
        assert (canvas[nr, :nc] == 1).all()
    if nc < 30:
        assert (canvas[:nr, nc] == 1).all()
    if nr < 30 and nc < 30:
        assert canvas[nr, nc] == 0  # the corner stays PAD
    assert (canvas[nr + 1:, :] == 0).all() and (canvas[:, nc + 1:] == 0).all()


def test_inverse_augmentation_restores_original_task(arc_built, arc_src):
    """Decode every test-split example (offset 0): crop, undo its variant, compare with the task file."""
    names = json.loads((arc_built / "identifiers.json").read_text())
    d = arc_built / "test"
    inputs, labels = np.load(d / "all__inputs.npy"), np.load(d / "all__labels.npy")
    pids, pi = np.load(d / "all__puzzle_identifiers.npy"), np.load(d / "all__puzzle_indices.npy")
    seen_tids = set()
    for p, pid in enumerate(pids):
        name = names[pid]
        task_name, tid, _ = parse_arc_identifier(name)
        seen_tids.add(tid)
        task = load_task(arc_src / "evaluation" / f"{task_name}.json")
        for j, row in enumerate(range(pi[p], pi[p + 1])):
            for tokens, key in ((inputs[row], "input"), (labels[row], "output")):
                restored = invert_arc_augmentation(arc_grid_from_tokens(tokens), name)
                assert np.array_equal(restored, np.array(task["test"][j][key])), (name, j, key)
    assert len(seen_tids) >= 4


def test_translated_train_examples_hold_the_augmented_grid(arc_built, arc_src):
    names = json.loads((arc_built / "identifiers.json").read_text())
    d = arc_built / "train"
    labels = np.load(d / "all__labels.npy")
    pids, pi = np.load(d / "all__puzzle_identifiers.npy"), np.load(d / "all__puzzle_indices.npy")
    at_origin = 0
    for p in range(0, len(pids), 7):
        name = names[pids[p]]
        task_name = parse_arc_identifier(name)[0]
        path = next(arc_src.rglob(f"{task_name}.json"))
        task = load_task(path)
        pairs = task["train"] + (task["test"] if path.parent.name == "training" else [])
        outputs = {np.array(x["output"]).tobytes() + bytes(np.array(x["output"]).shape) for x in pairs}
        for row in range(pi[p], pi[p + 1]):
            canvas = labels[row].reshape(30, 30)
            colour = np.argwhere(canvas >= 2)
            r0, c0 = colour.min(0)
            r1, c1 = colour.max(0) + 1
            at_origin += (r0, c0) == (0, 0)
            g = invert_arc_augmentation(canvas[r0:r1, c0:c1].astype(np.int64) - 2, name)
            assert g.tobytes() + bytes(g.shape) in outputs
    assert at_origin >= len(range(0, len(pids), 7))  # at least one example per puzzle at (0, 0)


def test_build_is_byte_identical_and_ids_stable(tmp_path, arc_src, arc_built):
    out = tmp_path / "again"
    ba.main(["--dataset-dirs", str(arc_src), "--output-dir", str(out), "--num-aug", "8", "--seed", "42"])
    assert digest(out) == digest(arc_built)
    # a task's variants do not depend on which other tasks are present
    only = tmp_path / "only"
    (only / "evaluation").mkdir(parents=True)
    first_eval = sorted((arc_src / "evaluation").glob("*.json"))[0]
    shutil.copy(first_eval, only / "evaluation" / first_eval.name)
    ba.main(["--dataset-dirs", str(only), "--output-dir", str(tmp_path / "o1"), "--num-aug", "8", "--seed", "42"])
    sub = json.loads((tmp_path / "o1" / "identifiers.json").read_text())[1:]
    full = json.loads((arc_built / "identifiers.json").read_text())
    assert sub == [n for n in full if n.split("_")[0] == first_eval.stem]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("train"), r"task has no 'train' list"),
    (lambda t: t.pop("test"), r"task has no 'test' list"),
    (lambda t: t["train"][0].__setitem__("input", [[1] * 31]), r"train\[0\]\.input: grid is 1x31; expected at most 30x30"),
    (lambda t: t["test"][0].__setitem__("output", [[3, 10]]), r"test\[0\]\.output: cell \(0,1\) is 10; expected a colour 0\.\.9"),
    (lambda t: t["train"][1].__setitem__("output", [[1, 2], [3]]), r"train\[1\]\.output: rows must be non-empty and of equal length"),
])
def test_bad_task_exits_2_and_writes_nothing(tmp_path, shared_data, capsys, edit, message):
    import re
    src = tmp_path / "src" / "training"
    src.mkdir(parents=True)
    good = sorted((shared_data / "arc-agi-1" / "training").glob("*.json"))[:2]
    for f in good:
        shutil.copy(f, src / f.name)
    task = load_task(good[1])
    edit(task)
    (src / good[1].name).write_text(json.dumps(task))
    with pytest.raises(SystemExit) as e:
        ba.main(["--dataset-dirs", str(tmp_path / "src"), "--output-dir", str(tmp_path / "out"), "--num-aug", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and good[1].name in err and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
