"""Accuracy under eval halting and test-time sampling for one checkpoint, as a markdown table: exact
accuracy with its 95 % Wilson interval, mean segments per trajectory, FLOPs per puzzle and the share of
puzzles where ANY of the K trajectories was exact (what a perfect selector would reach).

Each row is one utils.evaluation.evaluate() call (what `python evaluate.py checkpoint=... eval_...=...`
runs), on the checkpoint's test split, seeded (seed 0): rerunning prints the same numbers.

    python -m bench.bench_sampling_accuracy --checkpoint checkpoints/demo/sudoku-6x6/step_2496
    python -m bench.bench_sampling_accuracy --checkpoint ... --samples 4 16 --noise-std 0.1 0.3
"""
from __future__ import annotations

import argparse
import time

import torch

from utils.checkpoint import load_model_from_checkpoint
from utils.data import make_dataset, make_loader
from utils.distributed import DistInfo
from utils.eval_metrics import dataset_task, format_interval
from utils.evaluation import evaluate
from utils.inference import SELECTORS, InferenceSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samples", type=int, nargs="+", default=[4, 16])
    p.add_argument("--noise-std", type=float, nargs="+", default=[0.1])
    p.add_argument("--selectors", nargs="+", default=list(SELECTORS))
    p.add_argument("--sampling-halting", default="q", help="eval_halting of the sampled rows (first_halt needs q)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--max-segments", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg, head = load_model_from_checkpoint(args.checkpoint)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    ds = make_dataset(cfg.data_path, "test", seed=cfg.seed, global_batch_size=args.batch_size, test_set_mode=True,
                      epochs_per_iter=1, rank=0, world_size=1)
    task = dataset_task(cfg.data_path)
    rows = [InferenceSettings(halting=h, max_segments=args.max_segments, seed=0) for h in ("all", "q")]
    rows += [InferenceSettings(halting=args.sampling_halting, max_segments=args.max_segments, samples=k,
                               noise_std=s, select=sel, seed=0)
             for s in args.noise_std for k in args.samples for sel in args.selectors]
    print(f"# {args.checkpoint} on {cfg.data_path}/test, budget {args.max_segments or head.model.config.halt_max_steps} "
          f"segments, {args.threads} thread(s)")
    print("| eval_halting | K | sigma | select | exact accuracy [95 % CI] | any of K exact | segments/trajectory "
          "| MFLOPs/puzzle | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for st in rows:
        t0 = time.perf_counter()
        m, _ = evaluate(head, make_loader(ds, num_workers=0), info, device=info.device, settings=st, task=task)
        dt = time.perf_counter() - t0
        exact = format_interval(m["eval/exact_accuracy"], m["eval/exact_accuracy_ci_low"], m["eval/exact_accuracy_ci_high"])
        oracle = f"{100 * m['eval/oracle_exact_accuracy']:.1f} %" if "eval/oracle_exact_accuracy" in m else "-"
        flops = f"{m['eval/flops_per_puzzle'] / 1e6:.1f}" if "eval/flops_per_puzzle" in m else "-"
        select = st.select if st.samples > 1 else "-"
        print(f"| {st.halting} | {st.samples} | {st.noise_std:g} | {select} | {exact} | {oracle} | "
              f"{m['eval/segments_mean']:.2f} | {flops} | {dt:.0f} |", flush=True)


if __name__ == "__main__":
    main()
