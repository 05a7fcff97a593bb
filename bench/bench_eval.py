"""Evaluation throughput with test-time sampling: puzzles/s for K = 1, 4, 16 trajectories per puzzle
(batched: one forward of B*K rows per segment), printed as a markdown table.

Runs utils.evaluation.evaluate (the code pretrain.py and evaluate.py call) on a checkpoint's test split,
or on a freshly initialised model of the CPU demo's shape (hidden 64, 1+1 layers, 2x2 cycles,
3 segments) over random 6x6-Sudoku-shaped inputs when no checkpoint is given. Each K is timed `--repeats`
times; the table shows the median. eval_halting=all, so every trajectory runs the full budget and the
time measures the sampling cost alone.

    python -m bench.bench_eval --checkpoint checkpoints/demo/sudoku-6x6/step_2496 --puzzles 500
    python -m bench.bench_eval                  # no checkpoint: random demo-shaped model and inputs
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from utils.distributed import DistInfo
from utils.evaluation import evaluate
from utils.inference import InferenceSettings


class FixedLoader:
    """The evaluate() loader protocol over fixed batches."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter([("all", b, b["inputs"].shape[0]) for b in self.batches])

    def __len__(self):
        return len(self.batches)

    def state_dict(self):
        return {}

    def load_state_dict(self, _):
        pass


def demo_shaped_head():
    from utils.modeling import build_head
    arch = {"name": "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1",
            "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
            "hidden_size": 64, "num_heads": 2, "H_layers": 1, "L_layers": 1, "H_cycles": 2, "L_cycles": 2,
            "halt_max_steps": 3, "forward_dtype": "float32", "puzzle_emb_ndim": 64}
    return build_head(arch, {"batch_size": 64, "seq_len": 36, "vocab_size": 8, "num_puzzle_identifiers": 1}).eval()


def batches_for(head, puzzles: int, batch_size: int, data_path: str | None):
    if data_path:
        from utils.data import make_dataset
        ds = make_dataset(data_path, "test", seed=0, global_batch_size=batch_size, test_set_mode=True,
                          epochs_per_iter=1, rank=0, world_size=1)
        out, n = [], 0
        for _, batch, _ in ds:
            out.append(batch)
            n += batch["inputs"].shape[0]
            if n >= puzzles:
                break
        return out
    cfg = head.model.config
    g = torch.Generator().manual_seed(0)
    return [{"inputs": torch.randint(1, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g, dtype=torch.int32),
             "labels": torch.randint(2, cfg.vocab_size, (batch_size, cfg.seq_len), generator=g, dtype=torch.int32),
             "puzzle_identifiers": torch.zeros(batch_size, dtype=torch.int32)}
            for _ in range(max(1, puzzles // batch_size))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--puzzles", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=100, help="puzzles per eval batch (rows = batch x K)")
    p.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--noise-std", type=float, default=0.1)
    p.add_argument("--select", default="vote")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data_path = None
    if args.checkpoint:
        from utils.checkpoint import load_model_from_checkpoint
        cfg, head = load_model_from_checkpoint(args.checkpoint)
        data_path = cfg.data_path
    else:
        head = demo_shaped_head()
    batches = batches_for(head, args.puzzles, args.batch_size, data_path)
    n = sum(b["inputs"].shape[0] for b in batches)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    print(f"# eval throughput, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {n} puzzles, batch {args.batch_size}, sigma {args.noise_std}, "
          f"select {args.select}, {'checkpoint ' + args.checkpoint if args.checkpoint else 'random demo-shaped model'}")
    print("| K | rows per batch | puzzles/s (median) | trajectories/s | s per run | exact |")
    print("|---|---|---|---|---|---|")
    base = None
    for K in args.samples:
        settings = InferenceSettings(samples=K, noise_std=args.noise_std if K > 1 else 0.0, select=args.select)
        times, metrics = [], {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            metrics, _ = evaluate(head, FixedLoader(batches), info, device=info.device, settings=settings)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        base = base or n / t
        print(f"| {K} | {args.batch_size * K} | {n / t:.0f} ({n / t / base:.2f}x) | {n * K / t:.0f} | {t:.2f} | "
              f"{100 * metrics.get('eval/exact_accuracy', float('nan')):.1f} % |", flush=True)


if __name__ == "__main__":
    main()
