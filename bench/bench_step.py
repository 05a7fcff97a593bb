"""Our training step vs an "original-like" reference step, in one process, in alternating pairs.

One step = ACTLossHead forward (one ACT segment, plus HRM's target-Q segment) + backward + AdamATan2 and the
sparse sign-SGD step, on a fixed random batch, train mode. The reference is the same model on the original
code's CPU path (bench/bench_model.py `original_like`: SDPA attention, the original's two-pass rotate_half
RoPE, the lm_head in the target-Q forward). Ours is run eager and, with `--compile`, with the recursion's
blocks compiled (utils/modeling.py `compile_blocks`, the `compile=true` path of pretrain.py).

The runners take turns step by step (ref, ours, ref, ours, ...), so a load change on this shared machine
hits both alike; each pair gives a ratio ref_time / our_time and the table reports the median of those.
The reference runs in a child process of its own (driven step by step over a pipe) with the C library's
default allocator, as the original code runs; ours runs in this process with what every entry point of
this project applies (utils/modeling.py `retain_freed_host_memory`). `--same-process-reference` runs the
reference here too, so that it shares that setting: the ratio of the model code alone.
The non-matmul share is 1 - (self time of the matmul ops) / (wall time of the step), from torch.profiler
over `--profile-steps` steps of each runner: everything that is not a matrix product counts as overhead,
including Python and the optimizers. The last column, the matmul-bound ceiling, is the ratio a runner would
reach if only its matrix products took time: the most that fusing or removing the rest can give.

    python -m bench.bench_step                         # HRM and TRM, tiny shape, fp32, 1 thread, eager
    python -m bench.bench_step --compile --pairs 9
    python -m bench.bench_step --archs hrm --shape demo --compile --same-process-reference
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from bench.bench_model import SHAPES, original_like, synthetic_batch_and_optimizers
from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.layers import LINEAR_BACKENDS, resolve_linear_backend
from models.losses import ACTLossHead
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from utils.modeling import retain_freed_host_memory, set_linear_backend

ARCHS = {"hrm": HierarchicalReasoningModel_ACTV1, "trm": TinyRecursiveReasoningModel_ACTV1}
# TRM at the same tiny shape: its one network has L_layers=2 blocks; the original's 16 prefix positions.
TRM_KEYS = dict(puzzle_emb_len=16)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "mkldnn::_linear_pointwise",
              "hrm::onednn_linear")


def build(arch: str, shape: str, dtype: str, reference: bool, compiled: bool, linear_backend: str = "torch"):
    cfg = dict(SHAPES[shape], forward_dtype=dtype, attn_backend="sdpa" if reference else "auto")
    if arch == "trm":
        cfg.update(TRM_KEYS)
    model = ARCHS[arch](cfg, generator=torch.Generator().manual_seed(0))
    model.set_generator(torch.Generator().manual_seed(0))
    head = ACTLossHead(model, "stablemax_cross_entropy")
    head.train()
    if not reference:
        set_linear_backend(head, linear_backend, "cpu")
    if compiled:
        from utils.modeling import compile_blocks
        compile_blocks(head)
    return (head, *synthetic_batch_and_optimizers(model, head, cfg))


class Runner:
    def __init__(self, name: str, head, batch, opts, reference: bool):
        self.name, self.head, self.batch, self.opts, self.reference = name, head, batch, opts, reference
        self.carry = head.initial_carry(batch)
        self.times: list[float] = []

    def step(self) -> float:
        with original_like() if self.reference else contextlib.nullcontext():
            t0 = time.perf_counter()
            self.carry, loss, _, _, _ = self.head(return_keys=[], carry=self.carry, batch=self.batch)
            (loss / self.batch["inputs"].shape[0]).backward()
            for o in self.opts:
                o.step()
            for o in self.opts:
                o.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

    def non_matmul_share(self, steps: int) -> tuple[float, str]:
        """(1 - matmul self time / wall time, the top non-matmul ops) over `steps` profiled steps."""
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = sum(self.step() for _ in range(steps))
        events = prof.key_averages()
        mm_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        others: dict[str, float] = {}
        for e in events:
            if e.key not in MATMUL_OPS and e.self_cpu_time_total > 0:
                # inductor's fused kernels are named by graph hash: one "compiled kernels" entry
                name = "compiled kernels" if "CompiledFxGraph" in e.key else e.key.replace("aten::", "")
                others[name] = others.get(name, 0.0) + e.self_cpu_time_total
        top = ", ".join(f"{k} {100 * v / 1e6 / wall:.0f}%" for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:4])
        return 1.0 - mm_us / 1e6 / wall, top


class ChildRunner:
    """The reference Runner in a child process (`--worker`): same interface, one pipe round trip per call
    (the time is measured in the child, around the step only)."""

    def __init__(self, name: str, arch: str, shape: str, dtype: str, threads: int):
        self.name, self.times = name, []
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bench_step", "--worker", arch, shape, dtype,
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, line: str):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"reference worker exited with {self.proc.wait()}")
        return json.loads(answer)

    def step(self) -> float:
        return self._ask("step")

    def non_matmul_share(self, steps: int) -> tuple[float, str]:
        return tuple(self._ask(f"profile {steps}"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def worker(arch: str, shape: str, dtype: str, threads: int) -> int:
    """The child side of ChildRunner: the reference step on commands from stdin, answers as JSON lines."""
    torch.set_num_threads(threads)
    runner = Runner("original-like", *build(arch, shape, dtype, reference=True, compiled=False), reference=True)
    for line in sys.stdin:
        cmd = line.split()
        answer = runner.step() if cmd[0] == "step" else runner.non_matmul_share(int(cmd[1]))
        print(json.dumps(answer), flush=True)
    return 0


def load() -> str:
    return "load %.1f/%.1f/%.1f" % os.getloadavg()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["hrm", "trm"], choices=list(ARCHS))
    ap.add_argument("--shape", default="tiny", choices=list(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=7, help="alternating (reference, ours) pairs timed")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each runner first (compiles here)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time ours with compile=true (compiled blocks)")
    ap.add_argument("--no-eager", action="store_true", help="with --compile: skip the eager row of ours")
    ap.add_argument("--linear-backend", default="auto", choices=LINEAR_BACKENDS,
                    help="ours: config linear_backend (the reference always uses torch's F.linear)")
    ap.add_argument("--same-process-reference", action="store_true",
                    help="run the reference in this process (sharing our allocator setting), not in its own")
    ap.add_argument("--worker", nargs=4, metavar=("ARCH", "SHAPE", "DTYPE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        arch, shape, dtype, threads = args.worker
        return worker(arch, shape, dtype, int(threads))
    torch.set_num_threads(args.threads)
    retain_freed_host_memory()  # as every entry point of ours does (utils/modeling.py build_head)

    print(f"{time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.shape}, {args.dtype}; {load()} at start", file=sys.stderr)
    rows = []
    for arch in args.archs:
        variants = ([] if args.no_eager and args.compile else [False]) + ([True] if args.compile else [])
        if args.same_process_reference:
            ref = Runner("original-like", *build(arch, args.shape, args.dtype, reference=True, compiled=False),
                         reference=True)
        else:
            ref = ChildRunner("original-like (own process)", arch, args.shape, args.dtype, args.threads)
        ours = [Runner("ours compiled" if c else "ours eager",
                       *build(arch, args.shape, args.dtype, reference=False, compiled=c,
                              linear_backend=args.linear_backend), reference=False)
                for c in variants]
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            for r in [ref] + ours:
                r.step()
        warm_s = time.perf_counter() - t0
        ratios = {r.name: [] for r in ours}
        for _ in range(args.pairs):
            t_ref = ref.step()
            ref.times.append(t_ref)
            for r in ours:
                t = r.step()
                r.times.append(t)
                ratios[r.name].append(t_ref / t)
        for r in [ref] + ours:
            share, top = r.non_matmul_share(args.profile_steps)
            rat = ratios.get(r.name)
            rows.append((arch, r.name, statistics.median(r.times), share, top,
                         " ".join(f"{x:.2f}" for x in rat) if rat else "-",
                         statistics.median(rat) if rat else 1.0))
            print(f"{arch} {r.name}: {statistics.median(r.times) * 1e3:.0f} ms/step, non-matmul {100 * share:.0f}%",
                  file=sys.stderr, flush=True)
        if isinstance(ref, ChildRunner):
            ref.close()
        print(f"{arch}: warm-up {warm_s:.1f} s ({args.warmup} steps of each runner); {load()}", file=sys.stderr)

    print(f"\n{args.shape} shape, {args.dtype}, {args.threads} thread(s), torch {torch.__version__}; "
          f"{args.pairs} alternating pairs; reference {'in this process' if args.same_process_reference else 'in its own process'}"
          f"; ours: {resolve_linear_backend(args.linear_backend, 'cpu')[1]}; {load()} at the end\n")
    # ceiling = reference median / this runner's matmul time alone (see the module docstring)
    ref_med = {arch: med for arch, name, med, *_ in rows if name.startswith("original-like")}
    print("| arch | step | median ms/step | non-matmul share | top non-matmul ops | ref/ours per pair | median ratio "
          "| matmul-bound ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for arch, name, med, share, top, per_pair, ratio in rows:
        ceiling = ref_med[arch] / (med * (1 - share))
        print(f"| {arch} | {name} | {med * 1e3:.0f} | {100 * share:.0f}% | {top} | {per_pair} | {ratio:.2f}x "
              f"| {ceiling:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
