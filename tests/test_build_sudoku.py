"""Sudoku builder: validity of every augmented puzzle, determinism, the generator, and bad CSV input."""
import csv
import subprocess
import sys

import numpy as np
import pytest

from dataset import build_sudoku_dataset as bs
from dataset.common import validate_puzzle_dataset
from data_helpers import digest
from puzzle_dataset import PuzzleDataset, PuzzleDatasetConfig


def tdoku_rows(shared_data):
    """The solved puzzles of the shared tdoku sample as (question, answer, rating)."""
    rows = []
    for line in (shared_data / "sudoku-tdoku-test" / "test_puzzles.txt").read_text().split():
        parts = line.split(":")
        if len(parts) == 3 and len(parts[2]) == 81:
            rows.append((parts[0], parts[2], parts[1]))
    return rows


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "question", "answer", "rating"])
        for q, a, r in rows:
            w.writerow(["test", q, a, r])


@pytest.fixture(scope="module")
def sudoku_src(tmp_path_factory, shared_data):
    rows = tdoku_rows(shared_data)
    assert len(rows) >= 5
    src = tmp_path_factory.mktemp("sudoku_src")
    write_csv(src / "train.csv", rows[:4])
    write_csv(src / "test.csv", rows[4:])
    return src


def run(argv):
    bs.main([str(a) for a in argv])


def grids(root, split, grid=9):
    inp = np.load(root / split / "all__inputs.npy").astype(np.int64) - 1  # 0 blank, 1..grid digits
    lab = np.load(root / split / "all__labels.npy").astype(np.int64) - 1
    return inp, lab


def test_every_augmented_sudoku_is_valid_and_matches_its_puzzle(tmp_path, sudoku_src):
    out = tmp_path / "aug"
    run(["--source", sudoku_src, "--output-dir", out, "--num-aug", 300, "--seed", 3])
    validate_puzzle_dataset(out)
    q, a = grids(out, "train")
    assert q.shape == (4 * 301, 81)
    assert not bs.invalid_solution_rows(a, 9).any()
    assert not ((q != 0) & (q != a)).any()  # every given agrees with the solution
    # augmentation keeps the blank pattern size and the puzzle's uniqueness
    base_q = q[::301]
    assert ((q == 0).sum(1) == np.repeat((base_q == 0).sum(1), 301)).all()
    for row in q[np.random.default_rng(0).choice(len(q), 20, replace=False)]:
        assert bs.count_solutions(row.tolist(), 9) == 1
    # row 0 of each group is the original; augmentations are not all identical to it
    src_q = np.array([[0 if c == "." else int(c) for c in r[0]] for r in tdoku_rows_cached(sudoku_src)])
    assert np.array_equal(base_q, src_q)
    assert len({r.tobytes() for r in q}) > 0.99 * len(q)
    gi = np.load(out / "train" / "all__group_indices.npy")
    assert gi.dtype == np.int32 and np.array_equal(gi, np.arange(0, 4 * 301 + 1, 301))
    meta = PuzzleDataset(PuzzleDatasetConfig(0, str(out), 8, False, 1, 0, 1)).metadata
    assert (meta.vocab_size, meta.seq_len, meta.num_puzzle_identifiers, meta.total_groups) == (11, 81, 1, 4)


def tdoku_rows_cached(src):
    with open(src / "train.csv") as f:
        return [(r[1], r[2]) for r in list(csv.reader(f))[1:]]


def test_build_is_byte_identical_for_same_seed(tmp_path, sudoku_src):
    for name in ("a", "b"):
        run(["--source", sudoku_src, "--output-dir", tmp_path / name, "--num-aug", 50, "--seed", 11])
    run(["--source", sudoku_src, "--output-dir", tmp_path / "c", "--num-aug", 50, "--seed", 12])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


@pytest.mark.parametrize("grid, blanks", [(4, "6..9"), (6, "12"), (9, "40")])
def test_generator_makes_unique_puzzles_with_exact_blanks(tmp_path, grid, blanks):
    out = tmp_path / f"g{grid}"
    run(["--grid", grid, "--generate", 40, "--test-size", 10, "--blanks", blanks, "--num-aug", 3,
         "--output-dir", out, "--seed", 0])
    lo, hi = bs.parse_blanks(blanks)
    train_q, train_a = grids(out, "train", grid)
    test_q, test_a = grids(out, "test", grid)
    assert train_q.shape == (40 * 4, grid * grid) and test_q.shape == (10, grid * grid)
    for q, a in ((train_q, train_a), (test_q, test_a)):
        n_blank = (q == 0).sum(1)
        assert n_blank.min() >= lo and n_blank.max() <= hi
        assert not bs.invalid_solution_rows(a, grid).any()
        assert not ((q != 0) & (q != a)).any()
        for row in q[:: max(1, len(q) // 15)]:
            assert bs.count_solutions(row.tolist(), grid) == 1
    # train and test puzzles are disjoint
    assert not {r.tobytes() for r in train_q[::4]} & {r.tobytes() for r in test_q}
    meta = PuzzleDataset(PuzzleDatasetConfig(0, str(out), 8, False, 1, 0, 1)).metadata
    assert meta.vocab_size == grid + 2 and meta.seq_len == grid * grid


def test_solver_counts_solutions():
    solved = bs.random_solution(9, np.random.default_rng(1)).tolist()
    assert bs.count_solutions(solved, 9) == 1
    assert bs.count_solutions([0] * 16, 4) == 2  # stops at the limit
    bad = list(solved)
    bad[1] = bad[0]
    assert bs.count_solutions(bad, 9) == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda r: (r[0][:80], r[1], r[2]), r"train\.csv:3: question has 80 characters; expected 81"),
    (lambda r: (r[0][:5] + "x" + r[0][6:], r[1], r[2]), r"train\.csv:3: question holds the character 'x'"),
    (lambda r: (r[0], r[1][:10] + "A" + r[1][11:], r[2]), r"train\.csv:3: answer holds the character 'A'"),
    (lambda r: (r[0], r[1][1] + r[1][0] + r[1][2:], r[2]), r"train\.csv:3: answer breaks a Sudoku rule"),
    (lambda r: (r[0], r[1], "hard"), r"train\.csv:3: rating 'hard' is not a number"),
])
def test_bad_csv_rows_exit_2_with_one_line(tmp_path, shared_data, capsys, mutate, message):
    rows = tdoku_rows(shared_data)
    rows[1] = mutate(rows[1])
    write_csv(tmp_path / "src" / "train.csv", rows[:3])
    write_csv(tmp_path / "src" / "test.csv", rows[3:])
    with pytest.raises(SystemExit) as e:
        run(["--source", tmp_path / "src", "--output-dir", tmp_path / "out"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp directory left behind


def test_answer_contradicting_question(tmp_path, shared_data, capsys):
    rows = tdoku_rows(shared_data)
    q, a, r = rows[0]
    given = next(i for i, c in enumerate(q) if c != ".")
    wrong = str(int(q[given]) % 9 + 1)
    rows[0] = (q[:given] + wrong + q[given + 1:], a, r)
    write_csv(tmp_path / "src" / "train.csv", rows[:3])
    write_csv(tmp_path / "src" / "test.csv", rows[3:])
    with pytest.raises(SystemExit):
        run(["--source", tmp_path / "src", "--output-dir", tmp_path / "out"])
    assert f"train.csv:2: answer contradicts the question at cell {given}" in capsys.readouterr().err


def test_cli_help_and_error_have_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dataset.build_sudoku_dataset", "--source", str(tmp_path / "nope"),
                        "--output-dir", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope' / 'train.csv'}: file not found "
                                             "(expected a Sudoku-Extreme style CSV)"]
    h = subprocess.run([sys.executable, "-m", "dataset.build_sudoku_dataset", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--num-aug" in h.stdout and "--blanks" in h.stdout


def test_inspector_prints_metadata_histogram_and_grid(tmp_path, sudoku_src, capsys):
    from dataset import inspect as di
    out = tmp_path / "ds"
    run(["--source", sudoku_src, "--output-dir", out, "--num-aug", 2])
    di.main([str(out), "--show", "1"])
    text = capsys.readouterr().out
    assert '"vocab_size": 11' in text and "looks like: sudoku" in text
    assert "set 'all': 12 examples, 12 puzzles, 4 groups" in text
    labels_line = next(line for line in text.splitlines() if "labels token histogram" in line)
    assert "histogram: 2:" in labels_line and " 1:" not in labels_line  # solutions hold no blanks
    q = tdoku_rows_cached(sudoku_src)[0][0]
    assert " ".join(c for c in q[:9]) in text  # first row of the first puzzle, '.' for blanks
    (out / "train" / "all__labels.npy").unlink()
    with pytest.raises(SystemExit) as e:
        di.main([str(out)])
    assert e.value.code == 2 and "all__labels.npy: file not found" in capsys.readouterr().err


def test_subsample_and_min_difficulty(tmp_path, sudoku_src, capsys):
    run(["--source", sudoku_src, "--output-dir", tmp_path / "sub", "--subsample-size", 2, "--num-aug", 1, "--seed", 5])
    q, _ = grids(tmp_path / "sub", "train")
    originals = np.array([[0 if c == "." else int(c) for c in r[0]] for r in tdoku_rows_cached(sudoku_src)])
    kept = q[::2]
    assert len(kept) == 2 and all((originals == k).all(1).any() for k in kept)
    with pytest.raises(SystemExit) as e:
        run(["--source", sudoku_src, "--output-dir", tmp_path / "hard", "--min-difficulty", 2])
    assert e.value.code == 2 and "no training puzzles left" in capsys.readouterr().err
