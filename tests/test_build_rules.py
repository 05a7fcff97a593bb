"""Rules generator: each family checked against an independent cell-by-cell implementation, on random grids
and on every task it writes; seeded byte-identical builds; held-out instances and compositions; formats."""
import json
from collections import deque

import numpy as np
import pytest

from dataset import build_rules_dataset as br
from dataset import context as cx
from dataset.common import arc_grid_from_tokens, validate_puzzle_dataset
from data_helpers import digest
from trainer_helpers import run_cli

SMALL = ["--train-tasks", "120", "--test-tasks", "30", "--min-size", "3", "--max-size", "6", "--demos", "3"]


# -- independent implementations (plain loops over cells) -------------------------------------------


def ref_colour_map(g, a, b):
    return [[b if v == a else v for v in row] for row in g]


def ref_dihedral(g, tid):
    h, w = len(g), len(g[0])
    at = {1: lambda i, j: g[j][w - 1 - i], 2: lambda i, j: g[h - 1 - i][w - 1 - j], 3: lambda i, j: g[h - 1 - j][i],
          4: lambda i, j: g[i][w - 1 - j], 5: lambda i, j: g[h - 1 - i][j], 6: lambda i, j: g[j][i],
          7: lambda i, j: g[h - 1 - j][w - 1 - i]}[tid]
    rows, cols = (w, h) if tid in (1, 3, 6, 7) else (h, w)
    return [[at(i, j) for j in range(cols)] for i in range(rows)]


def ref_translate(g, dy, dx):
    h, w = len(g), len(g[0])
    return [[g[i - dy][j - dx] if 0 <= i - dy < h and 0 <= j - dx < w else 0 for j in range(w)] for i in range(h)]


def ref_gravity(g, direction):
    h, w = len(g), len(g[0])
    out = [[0] * w for _ in range(h)]
    lines = [[(i, j) for i in range(h)] for j in range(w)] if direction in ("down", "up") else \
        [[(i, j) for j in range(w)] for i in range(h)]
    for cells in lines:
        vals = [g[i][j] for i, j in cells if g[i][j] != 0]
        slots = cells[len(cells) - len(vals):] if direction in ("down", "right") else cells[:len(vals)]
        for (i, j), v in zip(slots, vals):
            out[i][j] = v
    return out


def ref_size_recolour(g, c1, c2, c3):
    h, w = len(g), len(g[0])
    out = [[0] * w for _ in range(h)]
    seen = set()
    for si in range(h):
        for sj in range(w):
            if g[si][sj] == 0 or (si, sj) in seen:
                continue
            comp, todo = [], deque([(si, sj)])
            seen.add((si, sj))
            while todo:
                i, j = todo.popleft()
                comp.append((i, j))
                for ni, nj in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                    if 0 <= ni < h and 0 <= nj < w and g[ni][nj] != 0 and (ni, nj) not in seen:
                        seen.add((ni, nj))
                        todo.append((ni, nj))
            colour = c1 if len(comp) == 1 else c2 if len(comp) == 2 else c3
            for i, j in comp:
                out[i][j] = colour
    return out


REF = {"colour_map": ref_colour_map, "dihedral": ref_dihedral, "translate": ref_translate, "gravity": ref_gravity,
       "size_recolour": ref_size_recolour}


def ref_apply(rule, grid):
    g = np.asarray(grid).tolist()
    for fam, params in rule:
        g = REF[fam](g, *params)
    return np.array(g)


@pytest.mark.parametrize("family", list(br.FAMILIES))
def test_each_family_matches_the_reference(family):
    rng = np.random.default_rng(0)
    fam = br.FAMILIES[family]
    for trial in range(60):
        h, w = rng.integers(1, 9, size=2)
        g = np.where(rng.random((4, h, w)) < 0.45, rng.integers(1, 10, size=(4, h, w)), 0).astype(np.uint8)
        params = fam.instances[trial % len(fam.instances)]
        out = fam.apply(g, params)
        for k in range(4):
            assert np.array_equal(out[k], ref_apply([(family, params)], g[k])), (family, params, g[k])


@pytest.fixture(scope="module")
def ctx_built(tmp_path_factory):
    out = tmp_path_factory.mktemp("rules") / "ctx"
    br.main(["--output-dir", str(out), "--seed", "3", *SMALL])
    return out


@pytest.fixture(scope="module")
def id_built(tmp_path_factory):
    out = tmp_path_factory.mktemp("rules") / "pid"
    br.main(["--output-dir", str(out), "--seed", "3", "--format", "puzzle_id", *SMALL])
    return out


def tasks_json(root):
    return {k: [[(f, tuple(p)) for f, p in r] for r in v] for k, v in json.loads((root / "tasks.json").read_text()).items()}


def test_written_tasks_follow_their_rule(ctx_built):
    """Decode every row; its demonstrations and its answer follow the task's listed rule (reference impl)."""
    validate_puzzle_dataset(ctx_built)
    rules = tasks_json(ctx_built)
    checked = 0
    for key, rs in rules.items():
        split, set_name = key.split("/")
        d = ctx_built / split
        inputs, labels = np.load(d / f"{set_name}__inputs.npy"), np.load(d / f"{set_name}__labels.npy")
        pi = np.load(d / f"{set_name}__puzzle_indices.npy")
        assert len(pi) - 1 == len(rs)
        assert (np.load(d / f"{set_name}__puzzle_identifiers.npy") == 0).all()
        for t, rule in enumerate(rs):
            assert pi[t + 1] - pi[t] == (4 if split == "train" else 1)  # leave-one-out over 3 + 1 pairs
            for row in range(pi[t], pi[t + 1]):
                dec = cx.decode_context(inputs[row], labels[row])
                assert len(dec["demos"]) == 3
                for a, b in dec["demos"] + [(dec["query"], dec["answer"])]:
                    assert np.array_equal(ref_apply(rule, a), b), (key, t, rule)
                    assert not (a.shape == b.shape and np.array_equal(a, b))  # the rule shows
                    checked += 1
    assert checked == 120 * 4 * 4 + 2 * 30 * 4


def test_splits_hold_out_instances_and_compositions(ctx_built):
    rules = tasks_json(ctx_built)
    train_inst = {step for r in rules["train/all"] for step in r}
    train_pairs = {frozenset(f for f, _ in r) for r in rules["train/all"] if len(r) == 2}
    held = {frozenset(p.split("+")) for p in br.DEFAULT_HELD_OUT_PAIRS}
    assert not train_pairs & held and len(train_pairs) == 10 - len(held)
    assert {len(r) for r in rules["train/all"]} == {1, 2}
    for r in rules["test/instances"]:
        assert all(step not in train_inst for step in r), r
    for r in rules["test/compositions"]:
        assert len(r) == 2 and frozenset(f for f, _ in r) in held
    # compositions use train instances only (the novelty is the pairing)
    inst = br.split_instances(list(br.FAMILIES), 0.25, 3)
    for r in rules["test/compositions"]:
        assert all(p in inst[f][0] for f, p in r)
    assert all(0 < len(h) < len(t) + len(h) for t, h in inst.values())


def test_puzzle_id_format_matches_context_tasks(ctx_built, id_built):
    """Same seed, same tasks: the puzzle-id build holds the same grids as canvases, one id per task, the test
    tasks' demonstrations in train under the id of their query, and never a query."""
    validate_puzzle_dataset(id_built)
    assert json.loads((id_built / "tasks.json").read_text()) == json.loads((ctx_built / "tasks.json").read_text())
    names = json.loads((id_built / "identifiers.json").read_text())
    assert len(names) == 1 + 120 + 2 * 30
    tr = {k: np.load(id_built / "train" / f"all__{k}.npy") for k in ("inputs", "labels", "puzzle_identifiers")}
    assert tr["inputs"].shape == (120 * 4 + 2 * 30 * 3, 36)
    for set_name in ("instances", "compositions"):
        te_in = np.load(id_built / "test" / f"{set_name}__inputs.npy")
        te_ids = np.load(id_built / "test" / f"{set_name}__puzzle_identifiers.npy")
        assert set(te_ids.tolist()) <= set(tr["puzzle_identifiers"].tolist())
        ctx_in = np.load(ctx_built / "test" / f"{set_name}__inputs.npy")
        for row in range(len(te_in)):
            assert np.array_equal(arc_grid_from_tokens(te_in[row], 6), cx.query_grid(ctx_in[row]))
        train_rows = {r.tobytes() for r in tr["inputs"]}
        assert sum(r.tobytes() in train_rows for r in te_in) <= 1  # a query is not a train example (up to chance)


def test_seeded_and_byte_identical(ctx_built, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    br.main(["--output-dir", str(again), "--seed", "3", *SMALL])
    br.main(["--output-dir", str(other), "--seed", "4", *SMALL])
    assert digest(again) == digest(ctx_built) and digest(other) != digest(ctx_built)


def test_strict_puzzle_id_split_has_no_test_task_in_train(tmp_path):
    out = tmp_path / "strict"
    br.main(["--output-dir", str(out), "--format", "puzzle_id", "--no-test-demos-in-train", *SMALL])
    tr_ids = set(np.load(out / "train" / "all__puzzle_identifiers.npy").tolist())
    te_ids = set(np.load(out / "test" / "instances__puzzle_identifiers.npy").tolist())
    assert len(tr_ids) == 120 and not tr_ids & te_ids


@pytest.mark.parametrize("argv, expected", [
    (["--families", "gravty"], "unknown rule family 'gravty'; did you mean 'gravity'?"),
    (["--held-out-pairs", "dihedral+flip"], "unknown rule family 'flip'"),
    (["--families", "dihedral", "gravity", "--held-out-pairs", "dihedral+translate"], "not in --families"),
    (["--max-size", "31"], "--max-size <= 30"),
])
def test_bad_arguments_are_one_line(tmp_path, argv, expected):
    out = tmp_path / "out"
    proc = run_cli(["-m", "dataset.build_rules_dataset", "--output-dir", str(out), *argv])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not out.exists()


def test_inspect_renders_context_rows(ctx_built):
    import io

    from dataset.inspect import describe
    out = io.StringIO()
    describe(ctx_built, "test", 1, out=out)
    text = out.getvalue()
    assert "looks like: context" in text and "demo 3 out" in text and "query" in text and "answer" in text
