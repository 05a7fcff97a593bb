"""`python -m dataset.build_lm_dataset reasoning`: every task's answers against an independent computation
(Python ints, eval, sorted, dict.fromkeys, a Sudoku checker, BFS, a re-implemented rewrite), seeding,
train/validation disjointness, extrapolation splits that are only harder, byte-identical rebuilds, the
group tags, mixing with language data, and one-line errors for bad inputs."""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from dataset.build_lm_dataset import SPLITS, main as build_lm
from dataset.lm_reasoning import TASKS, ReasoningConfig, build_reasoning
from dataset.lm_tokenizer import LMTokenizer
from lm_dataset import LMSplit

SMALL = {"train_items": 300, "val_items": 40, "test_items": 40}


def build(tmp_path: Path, task: str, name: str = "d", seed: int = 0, **kw) -> Path:
    out = tmp_path / name
    args = {**SMALL, **kw}
    knobs = args.pop("knobs", {})
    build_reasoning(ReasoningConfig(task=task, output_dir=str(out), seed=seed, knobs=knobs, **args))
    return out


def read(d: Path) -> dict:
    """split -> list of (prompt, answer, group name), decoded from the token files."""
    meta = json.loads((d / "meta.json").read_text())
    tok = LMTokenizer.from_dataset(d)
    out = {}
    for split in SPLITS:
        s = LMSplit(d, split)
        g = np.load(d / split / "groups.npy")
        assert g.dtype == np.int32 and g.shape == (len(s),)
        out[split] = [(tok.decode(s.example(i)[0]), tok.decode(s.example(i)[1]), meta["reasoning"]["groups"][g[i]])
                      for i in range(len(s))]
    return out


def level(group: str) -> int:
    return int(group.rsplit("_", 1)[1])


# ---- independent answers and difficulty measures, one per task: (prompt, answer) -> measured level --------

def check_pair(op):
    def check(prompt, answer):
        a, b = prompt.removesuffix("=").split(op)
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert len(a) == len(b) and str(int(a)) == a  # exactly D digits, no leading zeros
        return len(a)
    return check


def check_arithmetic(prompt, answer):
    expr = prompt.removesuffix("=")
    assert set(expr) <= set("0123456789+-*")
    assert int(answer) == eval(expr)
    return sum(expr.count(c) for c in "+-*")


def check_worked(prompt, answer):
    expr = prompt.removesuffix("=")
    steps = answer.split("=")
    assert all(eval(s) == eval(expr) for s in steps) and steps[-1] == str(eval(expr))
    assert len(steps) == sum(expr.count(c) for c in "+-*")  # one reduction per operation
    return len(steps)


def check_list(fn):
    def check(prompt, answer):
        name, *xs = prompt.removesuffix("=").split(" ")
        assert answer.split(" ") == [str(x) for x in fn([int(x) for x in xs])]
        return len(xs)
    return check


def check_sudoku(prompt, answer):
    head, *rows = prompt.rstrip("\n").split("\n")
    sol = answer.split("\n")
    n = len(rows)
    br, bc = {4: (2, 2), 6: (2, 3), 9: (3, 3)}[n]
    digits = {str(d) for d in range(1, n + 1)}
    units = [set(r) for r in sol] + [{sol[r][c] for r in range(n)} for c in range(n)]
    units += [{sol[r][c] for r in range(R, R + br) for c in range(C, C + bc)} for R in range(0, n, br) for C in range(0, n, bc)]
    assert head == "sudoku" and all(u == digits for u in units)
    assert all(q in (".", a) for qr, ar in zip(rows, sol) for q, a in zip(qr, ar))  # givens kept
    return sum(r.count(".") for r in rows)


def bfs(rows, start, cells_ok):
    dist = {start: 0}
    todo = deque([start])
    while todo:
        r, c = todo.popleft()
        for nxt in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if nxt not in dist and 0 <= nxt[0] < len(rows) and 0 <= nxt[1] < len(rows) and cells_ok(rows[nxt[0]][nxt[1]]):
                dist[nxt] = dist[(r, c)] + 1
                todo.append(nxt)
    return dist


def check_maze(prompt, answer):
    head, *rows = prompt.rstrip("\n").split("\n")
    sol = answer.split("\n")
    find = lambda ch: next((r, c) for r, row in enumerate(rows) for c, x in enumerate(row) if x == ch)
    s, g = find("S"), find("G")
    shortest = bfs(rows, s, lambda x: x != "#")[g]
    assert head == "maze" and len(sol) == len(rows)
    assert all(q == a or (q, a) == (" ", "o") for qr, ar in zip(rows, sol) for q, a in zip(qr, ar))
    assert sum(r.count("o") for r in sol) == shortest - 1
    assert bfs(sol, s, lambda x: x in "oG").get(g) == shortest  # the marked cells connect S to G
    return len(rows)


def check_rewrite(prompt, answer):
    *rule, times, s = prompt.removesuffix("=").split(" ")
    table = str.maketrans({a: b for a, b in (r.split(">") for r in rule)})
    k = int(times.removeprefix("x"))
    for _ in range(k):
        s = s.translate(table)
    assert answer == s
    return k


CHECKS = {"addition": check_pair("+"), "multiplication": check_pair("*"), "arithmetic": check_arithmetic,
          "sort": check_list(sorted), "dedup": check_list(lambda xs: list(dict.fromkeys(xs))),
          "sudoku": check_sudoku, "maze": check_maze, "rewrite": check_rewrite}


@pytest.mark.parametrize("task", list(TASKS))
def test_answers_are_right_splits_are_disjoint_and_extrapolation_is_only_harder(tmp_path, task):
    assert set(CHECKS) == set(TASKS)
    d = build(tmp_path, task)
    meta = json.loads((d / "meta.json").read_text())
    r = meta["reasoning"]
    data = read(d)
    lo, hi = r["settings"]["train_range"]
    xlo, xhi = r["settings"]["extrap_range"]
    assert r["task"] == task and {s: len(v) for s, v in data.items()} == {"train": 300, "validation": 40, "test": 40}
    for split, items in data.items():
        for prompt, answer, group in items:
            measured = CHECKS[task](prompt, answer)
            assert measured == level(group), (prompt, group)
            assert (xlo <= measured <= xhi) if split == "test" else (lo <= measured <= hi)
        counts = {}
        for *_, g in items:
            counts[g] = counts.get(g, 0) + 1
        assert counts == r["group_counts"][split]
    assert min(level(g) for *_, g in data["test"]) > max(level(g) for *_, g in data["train"])
    prompts = {s: [p for p, *_ in v] for s, v in data.items()}
    assert all(len(set(v)) == len(v) for v in prompts.values())  # no repeats inside a split
    assert not set(prompts["train"]) & set(prompts["validation"])


@pytest.mark.parametrize("task", list(TASKS))
def test_seeded_rebuild_is_byte_identical_and_another_seed_differs(tmp_path, task):
    a, b = build(tmp_path, task, "a"), build(tmp_path, task, "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 5 * 3  # meta, tokenizer; 4 token files + groups.npy per split
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    other = read(build(tmp_path, task, "c", seed=1))
    same = read(a)
    for split in SPLITS:
        assert [x[0] for x in other[split]] != [x[0] for x in same[split]]


def test_knobs_worked_steps_reverse_answer_values_grid_alphabet(tmp_path):
    worked = read(build(tmp_path, "arithmetic", "w", knobs={"worked_steps": True, "operand_max": 20}))
    for split in SPLITS:
        for p, a, g in worked[split]:
            assert check_worked(p, a) == level(g)
            assert max(int(x) for x in p.removesuffix("=").replace("-", "+").replace("*", "+").split("+")) <= 20
    rev = read(build(tmp_path, "addition", "r", knobs={"reverse_answer": True}))
    for p, a, _ in rev["test"]:
        x, y = p.removesuffix("=").split("+")
        assert a == str(int(x) + int(y))[::-1]
    big = read(build(tmp_path, "sort", "v", knobs={"values": 1000}))
    assert max(int(x) for p, *_ in big["train"] for x in p.removesuffix("=").split()[1:]) >= 100
    six = read(build(tmp_path, "sudoku", "s6", knobs={"grid": 6}, train_range="6..8", extrap_range="12",
                     train_items=20, val_items=5, test_items=5))
    assert all(check_sudoku(p, a) == level(g) and len(a.split("\n")) == 6 for s in SPLITS for p, a, g in six[s])
    rw = read(build(tmp_path, "rewrite", "rw", knobs={"alphabet": 6, "string_len": "9"}))
    assert {len(p.split(" ")[-1]) for p, *_ in rw["train"]} == {10}  # 9 letters + '='
    assert {c for p, *_ in rw["train"] for c in p.split(" ")[-1][:-1]} <= set("abcdef")


def test_small_levels_come_out_complete_and_the_tokenizer_is_per_digit(tmp_path):
    """1-digit sums have 100 distinct items: the range spread gives all of them (train + validation) and
    the 2-digit level the rest; the default tokenizer has no merges, so '12' is two tokens."""
    d = build(tmp_path, "addition", train_range="1..2", extrap_range="3", train_items=1000, val_items=100)
    data = read(d)
    ones = {p for s in ("train", "validation") for p, _, g in data[s] if g == "len_1"}
    assert ones == {f"{a}+{b}=" for a in range(10) for b in range(10)}
    tok = LMTokenizer.from_dataset(d)
    assert tok.vocab_size == 260 and len(tok.encode("123+456=579")) == 11


def test_mix_with_language_data_loads_and_drops_group_tags(tmp_path):
    from lm_dataset import LMDataset, LMDatasetConfig
    math = build(tmp_path, "addition", "math")
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(["to", "be", "or", "not"], 40)) for _ in range(60)))
    build_lm(["--source", str(corpus), "--output-dir", str(tmp_path / "lang"), "--tokenizer", str(math / "tokenizer.json"),
              "--max-seq-len", "32", "--doc-chars", "200", "--val-ratio", "0.1"])
    build_lm(["mix", "--inputs", f"{tmp_path / 'lang'}:0.9", f"{math}:0.1", "--output-dir", str(tmp_path / "mix")])
    meta = json.loads((tmp_path / "mix" / "meta.json").read_text())
    assert meta["mix"]["per_source"]["train"][str(math)] > 0
    assert "reasoning" not in meta and not (tmp_path / "mix" / "train" / "groups.npy").exists()
    sort = build(tmp_path, "sort", "sort", tokenizer=str(math / "tokenizer.json"))  # reused, not retrained
    assert (sort / "tokenizer.json").read_bytes() == (math / "tokenizer.json").read_bytes()
    cfg = LMDatasetConfig(seed=0, dataset_path=str(tmp_path / "mix"), global_batch_size=8, test_set_mode=False,
                          epochs_per_iter=1, rank=0, num_replicas=1)
    _, batch, n = next(iter(LMDataset(cfg, "train")))
    assert n == 8 and batch["encoder_ids"].shape[0] == 8


def bad(tmp_path, capsys, *argv) -> str:
    out = tmp_path / "bad-out"
    with pytest.raises(SystemExit) as e:
        build_lm(["reasoning", "--output-dir", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob("bad-out.partial-*"))  # nothing half-written
    return err


@pytest.mark.parametrize("argv, words", [
    (["--task", "additon"], "did you mean 'addition'"),
    (["--task", "sudoko"], "did you mean 'sudoku'"),
    (["--task", "addition", "--train-digits", "5..3"], "empty range"),
    (["--task", "addition", "--train-digits", "0..2"], "digits >= 1"),
    (["--task", "addition", "--train-digits", "x"], "expects K or LO..HI"),
    (["--task", "addition", "--train-digits", "1..3", "--extrap-digits", "3..4"], "must start above"),
    (["--task", "addition", "--train-digits", "1", "--extrap-digits", "2", "--train-items", "90", "--val-items", "20"],
     "only has 100 distinct items, fewer than the 110"),
    (["--task", "sort", "--train-len", "2", "--extrap-len", "3", "--values", "2", "--train-items", "3",
      "--val-items", "1", "--test-items", "9"],
     "only has 8 distinct items, fewer than the 9"),
    (["--task", "addition", "--val-items", "0"], "--val-items must be >= 1"),
    (["--task", "addition", "--grid", "6"], "--grid is a knob of sudoku"),
    (["--task", "addition", "--train-len", "2..3"], "--train-digits and --extrap-digits"),
    (["--task", "sudoku", "--extrap-blanks", "16"], "blanks <= 15"),
    (["--task", "maze", "--train-side", "8"], "odd side only"),
    (["--task", "sudoku", "--grid", "5"], "--grid must be 4, 6 or 9"),
    (["--task", "maze", "--train-side", "5", "--extrap-side", "7", "--train-items", "200", "--val-items", "10"],
     "maze --train-side 5..5 (--train-items 200 + --val-items 10): only "),
    (["--task", "arithmetic", "--operand-max", "0"], "--operand-max must be >= 1, got 0"),
    (["--task", "rewrite", "--string-len", "0..3"], "--string-len must be >= 1, got 0..3"),
])
def test_bad_inputs_give_one_line(tmp_path, capsys, argv, words):
    assert words in bad(tmp_path, capsys, *argv)


def test_help_lists_every_task(capsys):
    with pytest.raises(SystemExit):
        build_lm(["reasoning", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert all(t in out for t in TASKS) and "bytes only, no BPE merges" in out
