"""The README's rules-experiment table: exact accuracy with a 95 % Wilson interval per test set, per rule family.

    python evaluate.py checkpoint=checkpoints/rules/context/step_1200        # writes predictions.npz there
    python evaluate.py checkpoint=checkpoints/rules/puzzle-id/step_1200
    python -m scripts.rules_report checkpoints/rules/context/step_1200 checkpoints/rules/puzzle-id/step_1200

Each argument is a step dir holding evaluate.py's predictions.npz (one rank writes rows in dataset order,
set after set) and its config.yaml (for data_path). A row is exact when every labelled cell is right. The
baseline rows answer every query with the query itself or with an all-background grid of its shape.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import yaml

from dataset import context as cx
from dataset.common import PuzzleDatasetMetadata, arc_grid_from_tokens
from utils.eval_metrics import wilson_interval

def cell(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] ({k}/{n})"


def family_of(rule) -> str:
    return rule[0][0] if len(rule) == 1 else "+".join(sorted(f for f, _ in rule))


def per_set(data_path: Path) -> list[tuple[str, int]]:
    meta = PuzzleDatasetMetadata.load(data_path / "test" / "dataset.json")
    return [(s, len(np.load(data_path / "test" / f"{s}__inputs.npy", mmap_mode="r"))) for s in meta.sets]


def baselines(data_path: Path, set_name: str) -> dict[str, np.ndarray]:
    """Trivial answers, per row: the query input itself; an all-background grid of the query's shape."""
    inputs = np.load(data_path / "test" / f"{set_name}__inputs.npy")
    labels = np.load(data_path / "test" / f"{set_name}__labels.npy")
    if (inputs == cx.ANS).any():
        pairs = [(cx.query_grid(i), cx.answer_grid(i, l)) for i, l in zip(inputs, labels)]
    else:
        side = math.isqrt(inputs.shape[1])
        pairs = [(arc_grid_from_tokens(i, side), arc_grid_from_tokens(l, side)) for i, l in zip(inputs, labels)]
    return {"copy the query input": np.array([np.array_equal(q, a) for q, a in pairs]),
            "all background, query's shape": np.array([np.array_equal(np.zeros_like(q), a) for q, a in pairs])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step_dirs", nargs="+")
    args = ap.parse_args(argv)
    rows, fam_rows, data_paths = [], {}, []
    for step in map(Path, args.step_dirs):
        cfg = yaml.safe_load((step / "config.yaml").read_text())
        data = Path(cfg["data_path"])
        data_paths.append(data)
        p = np.load(step / "predictions.npz")
        exact = np.all((p["preds"] == p["labels"]) | (p["labels"] == -100), axis=1)
        tasks = json.loads((data / "tasks.json").read_text())
        start, out = 0, [f"{cfg.get('run_name', step.parent.name)} ({data.name})"]
        for set_name, n in per_set(data):
            e = exact[start:start + n]
            start += n
            out.append(cell(int(e.sum()), n))
            for t, rule in enumerate(tasks[f"test/{set_name}"]):
                k = (set_name, family_of(rule))
                fam_rows.setdefault(k, {}).setdefault(out[0], []).append(bool(e[t]))
        assert start == len(exact), f"{step}: {len(exact)} predictions but the test split has {start} rows"
        rows.append(out)
    sets = [s for s, _ in per_set(data_paths[0])]
    base = {s: baselines(data_paths[0], s) for s in sets}
    base_rows = [[f"baseline: {name}"] + [cell(int(base[s][name].sum()), len(base[s][name])) for s in sets]
                 for name in base[sets[0]]]
    print("| run | " + " | ".join(f"test/{s} exact [95 % Wilson]" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for r in rows + base_rows:
        print("| " + " | ".join(r) + " |")
    runs = [r[0] for r in rows]
    print("\n| set | rule family | " + " | ".join(runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for (set_name, fam), by_run in sorted(fam_rows.items()):
        print(f"| {set_name} | {fam} | " + " | ".join(
            f"{sum(by_run[r])}/{len(by_run[r])}" for r in runs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
