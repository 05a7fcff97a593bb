"""Issue 12's ablation: does the hybrid LM's HRM core earn its place on reasoning tasks?

    .venv/bin/python bench/lm_ablation.py                  # data, 2 tasks x 3 arms x 3 seeds + the HRM settings, table
    .venv/bin/python bench/lm_ablation.py --smoke          # 1 seed, 200 steps, every arm and setting once
    .venv/bin/python bench/lm_ablation.py --table          # only print the table of the finished runs
    .venv/bin/python bench/lm_ablation.py --tasks addition --arms hrm nocore transformer \
        --out checkpoints/lm-ablation-long epochs=12       # longer training: overrides apply to every run

Arms (config/experiment/lm_<task>_<arm>.yaml, one training recipe: lm_ablation_base.yaml):
    hrm          (a) the HRM core with a learned gate
    nocore       (b) the same model with the core removed: gate held at 0, core never run (arch.gate_mode=off)
    transformer  (c) arch=lm_transformer, a plain decoder-only stack of about the hybrid's FLOPs per step
plus more settings of (a) (SETTINGS: cycles, gate schedule, halting), each tried before concluding.
Tasks: addition (train 1-3 digit operands, extrapolation 4-5) and rewrite (a letter-substitution rule applied
K = 1-3 times, extrapolation 4-6), from `build_lm_dataset reasoning` (16k train, 500 validation, 500 test).

Every run is one `pretrain.py` process on one thread (OMP_NUM_THREADS=1), `--jobs` at a time (default 2 =
this machine's cores). A run writes checkpoints/lm-ablation/<task>-<arm>-s<seed>/ (ablation.json: its final
eval metrics, parameter count and wall-clock seconds); a run whose ablation.json exists is not run again.
The table: mean +- sample standard deviation over seeds of eval/answer_exact (validation = in-distribution)
and eval_extrap/answer_exact (test = extrapolation), the eval gate mean and the mean ACT segments used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
OUT = Path("checkpoints/lm-ablation")
TASKS = {  # the dataset's build command arguments (lmdata's default difficulty ranges)
    "addition": ["--task", "addition", "--train-digits", "1..3", "--extrap-digits", "4..5"],
    "rewrite": ["--task", "rewrite", "--train-steps", "1..3", "--extrap-steps", "4..6"],
}
ARMS = ("hrm", "nocore", "transformer")
# More settings of arm (a), as overrides of lm_<task>_hrm: more recursion, a gate schedule that makes the
# decoder read the core early, and halting that never stops before the last segment.
SETTINGS = {
    "hrm_cycles3": ["arch.H_cycles=3", "arch.L_cycles=3"],
    "hrm_floor": ["arch.gate_floor=0.5", "arch.gate_floor_steps=500"],
    "hrm_allseg": ["arch.halt_max_steps=3", "arch.halt_threshold=1.0"],
}
SEEDS = (0, 1, 2)
# Parameters that gate_mode=off keeps (so that the arms start from the same weights) but never uses.
CORE_MODULES = ("L_level", "H_level", "hrm_in", "hrm_out", "gate_proj", "halt_head")


def build_data(task: str) -> Path:
    out = REPO / "data" / f"lm-{task}"
    if (out / "meta.json").is_file():
        return out
    cmd = [PY, "-m", "dataset.build_lm_dataset", "reasoning", *TASKS[task], "--train-items", "16000",
           "--val-items", "500", "--test-items", "500", "--seed", "0", "--output-dir", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def run_one(task: str, arm: str, seed: int, extra: list[str]) -> dict:
    name = f"{task}-{arm}-s{seed}"
    run_dir = REPO / OUT / name
    done = run_dir / "ablation.json"
    if done.is_file():
        return json.loads(done.read_text())
    experiment = f"lm_{task}_{arm if arm in ARMS else 'hrm'}"
    overrides = SETTINGS.get(arm, []) + extra
    cmd = [PY, "pretrain.py", f"experiment={experiment}", f"seed={seed}", f"run_name={name}",
           f"checkpoint_path={run_dir}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in rows if "eval/answer_exact" in row][-1]
    params = next(row["num_params"] for row in rows if "num_params" in row)
    if arm == "nocore":
        params -= unused_core_params(run_dir)
    result = {"task": task, "arm": arm, "seed": seed, "seconds": seconds, "num_params": params, "step": final["step"],
              "command": " ".join(cmd[1:]), "metrics": final}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, done)
    print(f"{name}: in-dist {final['eval/answer_exact']:.3f}, extrap {final['eval_extrap/answer_exact']:.3f}, "
          f"{seconds:.0f} s", flush=True)
    return result


def unused_core_params(run_dir: Path) -> int:
    """The core's parameter count in a run's final checkpoint (arm nocore: present, never used)."""
    from safetensors import safe_open
    weights = sorted(run_dir.glob("step_*/model.safetensors"))[-1]
    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.split(".")[1] in CORE_MODULES)


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "-"
    m = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def table(results: list[dict]) -> str:
    lines = ["| task | arm | seeds | params | answer exact, in-dist (%) | answer exact, extrap (%) | gate μ | "
             "segments | s/run |", "|---|---|---|---|---|---|---|---|---|"]
    order = {a: i for i, a in enumerate(ARMS + tuple(SETTINGS))}
    keys = sorted({(r["task"], r["arm"]) for r in results}, key=lambda k: (k[0], order.get(k[1], 99)))
    for task, arm in keys:
        rs = [r for r in results if r["task"] == task and r["arm"] == arm]
        get = lambda key: [r["metrics"][key] for r in rs if key in r["metrics"]]  # noqa: E731
        gate = get("eval/gate/mean")
        lines.append(f"| {task} | {arm} | {len(rs)} | {rs[0]['num_params'] / 1e3:.0f}k | "
                     f"{mean_sd(get('eval/answer_exact'), 100)} | {mean_sd(get('eval_extrap/answer_exact'), 100)} | "
                     f"{mean_sd(gate, 1, 3) if gate else '-'} | {mean_sd(get('eval/halt/steps'), 1, 2) if gate else '-'} | "
                     f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--arms", nargs="+", default=list(ARMS) + list(SETTINGS), choices=list(ARMS) + list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--settings-seeds", nargs="+", type=int, default=None,
                   help="seeds of the extra HRM settings (default: --seeds)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--smoke", action="store_true", help="1 seed, 200 steps, into checkpoints/lm-ablation-smoke")
    p.add_argument("--table", action="store_true", help="print the table of finished runs, run nothing")
    p.add_argument("--out", default=None, help="runs directory (default checkpoints/lm-ablation); a finished run there is not rerun")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretrain.py overrides for every run")
    a = p.parse_args(argv)
    global OUT
    OUT = Path(a.out) if a.out else OUT
    extra = list(a.overrides)
    if a.smoke:
        OUT, a.seeds, a.settings_seeds = Path("checkpoints/lm-ablation-smoke"), [0], [0]
        extra += ["max_steps=200"]
    jobs = [(t, arm, s) for s in a.seeds for t in a.tasks for arm in a.arms if arm in ARMS]
    jobs += [(t, arm, s) for s in (a.settings_seeds if a.settings_seeds is not None else a.seeds)
             for t in a.tasks for arm in a.arms if arm in SETTINGS]
    if a.table:
        results = [json.loads(f.read_text()) for f in sorted((REPO / OUT).glob("*/ablation.json"))]
        print(table(results))
        return
    for t in a.tasks:
        build_data(t)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        results = list(pool.map(lambda j: run_one(*j, extra), jobs))
    print(f"\n{len(results)} runs in {time.time() - t0:.0f} s ({a.jobs} at a time, one thread each)\n")
    print(table(results))


if __name__ == "__main__":
    main()
