"""ARC context mode: serialisation round trip on all 400 real tasks, labels only on the answer region,
task-wide augmentation and its inverse, no evaluation task in training, voting, bad inputs."""
import json
import shutil

import numpy as np
import pytest

from dataset import build_arc_dataset as ba
from dataset import context as cx
from dataset.common import (DatasetError, dihedral_transform, invert_arc_augmentation,
                            parse_arc_identifier, validate_puzzle_dataset)
from data_helpers import arc_task_tree
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig
from trainer_helpers import run_cli
from utils import arc_scoring
from utils.evaluation import output_row_order

N_TRAIN, N_EVAL = 12, 6


def task_pairs(path):
    d = json.loads(path.read_text())
    to = lambda ps: [(np.array(p["input"]), np.array(p["output"])) for p in ps]  # noqa: E731
    return to(d["train"]), to(d["test"])


def error_line(proc) -> str:
    """The one `error: ...` line of a failed CLI run (progress bars aside), and no traceback."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def same_grids(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def arc_files(shared_data):
    files = sorted((shared_data / "arc-agi-1" / "training").glob("*.json"))
    assert len(files) == 400
    return files


@pytest.fixture(scope="module")
def all_400(arc_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctx400") / "ds"
    ba.main(["--mode", "context", "--dataset-dirs", str(arc_files[0].parent), "--output-dir", str(out),
             "--num-aug", "0", "--eval-subsets", "none"])
    return out


@pytest.fixture(scope="module")
def arc_src(tmp_path_factory, arc_files):
    return arc_task_tree(tmp_path_factory.mktemp("arc_src"), arc_files[:N_TRAIN], arc_files[N_TRAIN:N_TRAIN + N_EVAL])


@pytest.fixture(scope="module")
def aug_built(tmp_path_factory, arc_src):
    out = tmp_path_factory.mktemp("ctx_aug") / "ds"
    ba.main(["--mode", "context", "--dataset-dirs", str(arc_src), "--output-dir", str(out), "--num-aug", "8",
             "--max-context", "4096"])
    return out


def load_split(root, split):
    d = root / split
    return {k: np.load(d / f"all__{k}.npy") for k in ("inputs", "labels", "puzzle_indices", "example_names")}


def test_round_trip_every_arc_training_task(all_400, arc_files):
    """task -> tokens -> task for each leave-one-out row of all 400 tasks; demonstrations dropped only as the
    cap requires, and each dropped from the end."""
    validate_puzzle_dataset(all_400)
    names = json.loads((all_400 / "identifiers.json").read_text())
    a = load_split(all_400, "train")
    meta = json.loads((all_400 / "train" / "dataset.json").read_text())
    assert meta["vocab_size"] == cx.CONTEXT_VOCAB_SIZE and meta["seq_len"] <= 8192 and meta["num_puzzle_identifiers"] == 1
    assert (np.load(all_400 / "train" / "all__puzzle_identifiers.npy") == 0).all()
    by_name = {p.stem: p for p in arc_files}
    rows_seen, dropped, lengths = 0, 0, []
    for p in range(len(a["puzzle_indices"]) - 1):
        r0, r1 = a["puzzle_indices"][p], a["puzzle_indices"][p + 1]
        train, test = task_pairs(by_name[names[a["example_names"][r0]]])
        pairs = train + test
        assert r1 - r0 == len(pairs)
        for j, row in enumerate(range(r0, r1)):
            dec = cx.decode_context(a["inputs"][row], a["labels"][row])
            others = pairs[:j] + pairs[j + 1:]
            kept = cx.demos_that_fit(others, pairs[j][0], 30, 8192, "t")
            assert len(dec["demos"]) == kept and kept >= 1
            dropped += len(others) - kept
            for (di, do), (ti, to) in zip(dec["demos"], others[:kept]):
                assert np.array_equal(di, ti) and np.array_equal(do, to)
            assert np.array_equal(dec["query"], pairs[j][0]) and np.array_equal(dec["answer"], pairs[j][1])
            lengths.append(int(np.flatnonzero(a["inputs"][row])[-1]) + 1)
            rows_seen += 1
    assert rows_seen == len(a["inputs"]) and max(lengths) <= 8192
    print(f"400 tasks, {rows_seen} rows, median {np.median(lengths):.0f} tokens, max {max(lengths)}, "
          f"{dropped} demonstrations dropped")


def test_labels_only_on_the_answer_region(all_400):
    ds = PuzzleDataset(PuzzleDatasetConfig(0, str(all_400), 64, True, 1, 0, 1), split="train")
    for _, batch, _ in ds:
        inputs, labels = batch["inputs"].numpy(), batch["labels"].numpy()
        assert np.all((labels == -100) | (inputs == cx.ANS))
        real = inputs[:, 0] == cx.IN
        # every answer canvas holds a grid: colours and its EOS border are labelled
        assert np.all(((labels >= 2) & (labels < 12)).sum(1)[real] >= 1)
        assert (batch["puzzle_identifiers"] == 0).all()
        break


def test_answer_region_larger_than_canvas_is_refused(tmp_path, arc_files):
    big = next(p for p in arc_files if max(max(np.array(x["output"]).shape) for x in
                                            json.loads(p.read_text())["train"]) > 20)
    (tmp_path / "src").mkdir()
    shutil.copy(big, tmp_path / "src" / big.name)
    proc = run_cli(["-m", "dataset.build_arc_dataset", "--mode", "context", "--dataset-dirs", str(tmp_path / "src"),
                    "--output-dir", str(tmp_path / "out"), "--num-aug", "0", "--answer-side", "10"])
    assert "answer canvas" in error_line(proc)
    assert not (tmp_path / "out").exists()


def test_augmentation_is_task_wide_and_inverts(aug_built, arc_src):
    """Every grid of a row (demonstrations, query, answer) carries its variant's one augmentation: undoing it
    restores the task file exactly, on both splits."""
    names = json.loads((aug_built / "identifiers.json").read_text())
    tids = set()
    for split in ("train", "test"):
        a = load_split(aug_built, split)
        for p in range(len(a["puzzle_indices"]) - 1):
            r0, r1 = a["puzzle_indices"][p], a["puzzle_indices"][p + 1]
            name = names[a["example_names"][r0]]
            task, tid, _ = parse_arc_identifier(name)
            tids.add(tid)
            sub = "evaluation" if split == "test" else "training"
            train, test = task_pairs(arc_src / sub / f"{task}.json")
            for j, row in enumerate(range(r0, r1)):
                dec = cx.decode_context(a["inputs"][row], a["labels"][row])
                inv = lambda g: invert_arc_augmentation(g, name)  # noqa: E731
                if split == "test":
                    demos, query = train, test[j]
                else:
                    pairs = train + test
                    demos, query = pairs[:j] + pairs[j + 1:], pairs[j]
                demos = demos[:len(dec["demos"])]
                assert same_grids([inv(g) for d in dec["demos"] for g in d], [g for d in demos for g in d])
                assert np.array_equal(inv(dec["query"]), query[0]) and np.array_equal(inv(dec["answer"]), query[1])
    assert len(tids) >= 4


def _canonical(pair):
    """A pair up to the builder's augmentations (8 dihedral transforms, colour permutations fixing 0): the
    smallest encoding over the transforms, colours renumbered by first appearance (input, then output)."""
    best = None
    for t in range(8):
        i, o = (np.asarray(dihedral_transform(g, t)) for g in pair)
        flat = np.concatenate([i.ravel(), o.ravel()])
        order = [0] + [c for c in dict.fromkeys(flat.tolist()) if c != 0]
        remap = np.zeros(10, np.int64)
        remap[order] = np.arange(len(order))
        key = (i.shape, o.shape, remap[i].tobytes(), remap[o].tobytes())
        best = key if best is None or key < best else best
    return best


def test_no_evaluation_task_in_the_train_split(aug_built, arc_src):
    names = json.loads((aug_built / "identifiers.json").read_text())
    eval_tasks = {p.stem for p in (arc_src / "evaluation").glob("*.json")}
    train = load_split(aug_built, "train")
    assert not {parse_arc_identifier(names[i])[0] for i in np.unique(train["example_names"])} & eval_tasks
    # By content too: no pair of an evaluation task, under any augmentation, is in any train row.
    eval_keys = {_canonical(p) for f in (arc_src / "evaluation").glob("*.json") for ps in task_pairs(f) for p in ps}
    train_keys = set()
    for row in range(len(train["inputs"])):
        dec = cx.decode_context(train["inputs"][row], train["labels"][row])
        train_keys |= {_canonical(p) for p in dec["demos"] + [(dec["query"], dec["answer"])]}
    assert len(eval_keys) > 20 and not eval_keys & train_keys


def test_voting_on_the_context_format(aug_built):
    """Perfect predictions -> pass@1 = 1 after inverting each variant; all variants voting for a wrong grid -> 0;
    under 2 ranks, outputs come back rank-interleaved and output_row_order restores the names."""
    a = load_split(aug_built, "test")
    names = json.loads((aug_built / "identifiers.json").read_text())
    row_names = [names[i] for i in a["example_names"]]
    q = np.zeros(len(row_names))
    tasks = arc_scoring.vote_context(a["inputs"], a["labels"], a["labels"], q, row_names)
    assert len(tasks) == N_EVAL and arc_scoring.pass_at_k(tasks)["pass@1"] == 1.0
    wrong = np.where(a["inputs"] == cx.ANS, 2, 0).astype(np.uint8)  # an all-black full canvas
    assert arc_scoring.pass_at_k(arc_scoring.vote_context(a["inputs"], a["labels"], wrong, q, row_names))["pass@10"] == 0.0
    n, gb = len(a["inputs"]), 6
    order = output_row_order(n, gb, 2)
    shuffled = np.concatenate([np.arange(b * gb + r * 3, min(b * gb + (r + 1) * 3, n))
                               for r in range(2) for b in range(-(-n // gb))])
    assert np.array_equal(order, shuffled) and sorted(order.tolist()) == list(range(n))


def test_context_that_cannot_fit_is_one_error_line(tmp_path, arc_src):
    out = tmp_path / "out"
    proc = run_cli(["-m", "dataset.build_arc_dataset", "--mode", "context", "--dataset-dirs", str(arc_src),
                    "--output-dir", str(out), "--num-aug", "0", "--max-context", "300"])
    line = error_line(proc)
    assert "does not fit even with one demonstration" in line and ".json" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_task_without_demonstrations_is_one_error_line(tmp_path, arc_files):
    d = json.loads(arc_files[0].read_text())
    d["train"] = []
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "t.json").write_text(json.dumps(d))
    proc = run_cli(["-m", "dataset.build_arc_dataset", "--mode", "context", "--dataset-dirs", str(tmp_path / "src"),
                    "--output-dir", str(tmp_path / "out"), "--num-aug", "0"])
    assert "demonstrations" in error_line(proc)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DatasetError, match="no demonstrations"):
        cx.demos_that_fit([], np.zeros((2, 2), np.uint8), 30, 8192, "t.json")
