"""Maze builder: generated mazes are solvable with a marked shortest path, CSV checks, augmentation."""
import csv
import re

import numpy as np
import pytest

from dataset import build_maze_dataset as bm
from dataset.common import dihedral_transform, validate_puzzle_dataset
from data_helpers import digest

CH = "?# SGo"


def test_generated_mazes_have_a_shortest_path(tmp_path):
    out = tmp_path / "m"
    bm.main(["--generate", "30", "--test-size", "10", "--size", "15", "--output-dir", str(out), "--seed", "4"])
    validate_puzzle_dataset(out)
    for split in ("train", "test"):
        q = np.load(out / split / "all__inputs.npy")
        a = np.load(out / split / "all__labels.npy")
        assert q.dtype == np.uint8 and q.shape[1] == 225
        for qi, ai in zip(q, a):
            g = qi.reshape(15, 15)
            assert (g == bm.START).sum() == 1 and (g == bm.GOAL).sum() == 1 and not (g == bm.PATH).any()
            assert np.array_equal(np.where(ai == bm.PATH, bm.OPEN, ai), qi)
            s = tuple(np.argwhere(g == bm.START)[0])
            goal = tuple(np.argwhere(g == bm.GOAL)[0])
            dist = bm.bfs(g, s)
            assert (ai == bm.PATH).sum() == dist[goal] - 1  # path length = shortest distance
            # the marked cells form a connected route from S to G
            route = np.isin(ai.reshape(15, 15), (bm.PATH, bm.START, bm.GOAL)).astype(np.uint8)
            walk = np.where(route == 1, bm.OPEN, bm.WALL).astype(np.uint8)
            assert bm.bfs(walk, s)[goal] == dist[goal]
    b = tmp_path / "m2"
    bm.main(["--generate", "30", "--test-size", "10", "--size", "15", "--output-dir", str(b), "--seed", "4"])
    assert digest(b) == digest(out)


def test_dihedral_augmentation_groups(tmp_path):
    out = tmp_path / "aug"
    bm.main(["--generate", "5", "--test-size", "2", "--size", "11", "--aug", "--output-dir", str(out)])
    q = np.load(out / "train" / "all__inputs.npy").reshape(-1, 8, 11, 11)
    for t in range(8):
        assert np.array_equal(q[:, t], dihedral_transform(q[:, 0], t))
    assert np.array_equal(np.load(out / "train" / "all__group_indices.npy"), np.arange(0, 41, 8))


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "question", "answer", "rating"])
        w.writerows(rows)


@pytest.fixture()
def maze_rows():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(3):
        q, a = bm.make_maze(9, rng, 0.0)
        rows.append(["gen", "".join(CH[t] for t in q), "".join(CH[t] for t in a), "0"])
    return rows


def test_csv_source_round_trip(tmp_path, maze_rows):
    write_csv(tmp_path / "src" / "train.csv", maze_rows[:2])
    write_csv(tmp_path / "src" / "test.csv", maze_rows[2:])
    bm.main(["--source", str(tmp_path / "src"), "--output-dir", str(tmp_path / "out")])
    q = np.load(tmp_path / "out" / "train" / "all__inputs.npy")
    assert "".join(CH[t] for t in q[1]) == maze_rows[1][1]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.__setitem__(1, r[1][:-1]), r"question has 80 characters; expected a square grid"),
    (lambda r: r.__setitem__(2, r[2][:-1]), r"answer has 80 characters; expected 81"),
    (lambda r: r.__setitem__(1, "x" + r[1][1:]), r"question holds the character 'x'"),
    (lambda r: r.__setitem__(2, r[2].replace("S", "o")), r"answer contradicts the question at cell"),
    (lambda r: r.append("extra"), r"expected 4 columns"),
])
def test_bad_csv_exits_2(tmp_path, maze_rows, capsys, edit, message):
    edit(maze_rows[0])
    write_csv(tmp_path / "src" / "train.csv", maze_rows[:2])
    write_csv(tmp_path / "src" / "test.csv", maze_rows[2:])
    with pytest.raises(SystemExit) as e:
        bm.main(["--source", str(tmp_path / "src"), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and re.search(r"train\.csv:2: " + message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
