"""Training-step time of HRM ACT v1 (and TRM with `--archs hrm trm`) on this machine (CPU by default),
printed as markdown tables.

One step = ACTLossHead forward (one ACT segment; HRM adds its target-Q segment, TRM with no_ACT_continue
has none) + backward + the optimizer steps (AdamATan2 + sparse sign-SGD; `--no-optim` leaves them out), on
a fixed random batch, train mode.

"original-like" rows run the same model with the original's CPU code path: SDPA attention (the
flash-attn fallback of the gating fork) and the original's RoPE formula (two separate fp32 passes
with rotate_half) and the lm_head in the target-Q forward. Ours and the baseline alternate step by
step, so machine load hits both alike; compare the ratio column, which is median(baseline)/median(ours).

TRM rows (`--archs hrm trm`) take turns with the HRM rows of the same shape and dtype too; the second
table gives median(TRM)/median(HRM) per step.

    python -m bench.bench_model --shapes tiny sudoku --dtypes float32 bfloat16 --threads 1
    python -m bench.bench_model --archs hrm trm --no-baseline --steps 6 --sudoku-steps 2
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time

import torch

import models.layers as layers
from models.hrm import hrm_act_v1
from models.hrm.hrm_act_v1 import HierarchicalReasoningModel_ACTV1
from models.losses import ACTLossHead
from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1
from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
from utils.adam_atan2 import AdamATan2

SHAPES = {
    # the CPU demo shape the issue quotes the original's speed for
    "tiny": dict(batch_size=32, seq_len=81, vocab_size=11, num_puzzle_identifiers=1, puzzle_emb_ndim=128,
                 H_cycles=2, L_cycles=2, H_layers=2, L_layers=2, hidden_size=128, num_heads=2, expansion=4,
                 halt_max_steps=4, halt_exploration_prob=0.1),
    # the CPU demo (config/experiment/sudoku_cpu_demo.yaml on the 6x6 demo data: vocab 8, 36 cells)
    "demo": dict(batch_size=64, seq_len=36, vocab_size=8, num_puzzle_identifiers=1, puzzle_emb_ndim=64,
                 H_cycles=2, L_cycles=2, H_layers=1, L_layers=1, hidden_size=64, num_heads=2, expansion=4,
                 halt_max_steps=3, halt_exploration_prob=0.1),
    # the released Sudoku-Extreme model (27.3M parameters); batch 32 so one step fits a CPU budget
    "sudoku": dict(batch_size=32, seq_len=81, vocab_size=11, num_puzzle_identifiers=1, puzzle_emb_ndim=512,
                   H_cycles=2, L_cycles=2, H_layers=4, L_layers=4, hidden_size=512, num_heads=8, expansion=4,
                   halt_max_steps=16, halt_exploration_prob=0.1),
}

# TRM at the same widths, batch and sequence: its Sudoku recipe's recursion (one 2-layer network, H_cycles 3 x
# L_cycles 6, 16 puzzle-prefix positions, attention). "sudoku" is the original's 6.83M-parameter TRM-Att shape.
TRM_SHAPES = {
    name: dict({k: v for k, v in shape.items() if k not in ("H_layers", "H_cycles", "L_cycles")},
               H_layers=0, L_layers=2, H_cycles=3, L_cycles=6, puzzle_emb_len=16, mlp_t=False)
    for name, shape in SHAPES.items()
}
ARCHS = {"hrm": (HierarchicalReasoningModel_ACTV1, SHAPES), "trm": (TinyRecursiveReasoningModel_ACTV1, TRM_SHAPES)}


def _original_rotary(x, cos, sin):
    """The original's RoPE: q and k rotated separately with rotate_half (here both halves of x)."""
    H = x.shape[2] // 2
    q, k = layers.apply_rotary_pos_emb(x[:, :, :H], x[:, :, H:], cos, sin)
    return torch.cat((q, k), dim=2)


@contextlib.contextmanager
def original_like():
    """Swap in the original's CPU code path (see module docstring) for the duration."""
    saved_rotary, saved_forward = layers.apply_rotary, hrm_act_v1.HierarchicalReasoningModel_ACTV1_Inner.forward

    def forward_with_lm_head(self, carry, batch, with_outputs=True, collect_gate_stats=True, **kwargs):
        return saved_forward(self, carry, batch, with_outputs=True, collect_gate_stats=collect_gate_stats, **kwargs)

    layers.apply_rotary = _original_rotary
    hrm_act_v1.HierarchicalReasoningModel_ACTV1_Inner.forward = forward_with_lm_head
    try:
        yield
    finally:
        layers.apply_rotary = saved_rotary
        hrm_act_v1.HierarchicalReasoningModel_ACTV1_Inner.forward = saved_forward


def build(shape: str, dtype: str, gating: bool, attn_backend: str = "auto", arch: str = "hrm"):
    model_cls, shapes = ARCHS[arch]
    cfg = dict(shapes[shape], forward_dtype=dtype, attn_backend=attn_backend)
    if arch == "hrm":
        cfg["use_gating"] = gating
    model = model_cls(cfg, generator=torch.Generator().manual_seed(0))
    model.set_generator(torch.Generator().manual_seed(0))
    head = ACTLossHead(model, "stablemax_cross_entropy")
    head.train()
    return (head, *synthetic_batch_and_optimizers(model, head, cfg))


def synthetic_batch_and_optimizers(model, head, cfg: dict):
    """A seeded random batch at the config's shape and the original's two optimizers (AdamATan2 for the
    dense weights, sign-SGD for the puzzle table), as every step bench times them."""
    g = torch.Generator().manual_seed(1)
    B, L, V = cfg["batch_size"], cfg["seq_len"], cfg["vocab_size"]
    batch = {"inputs": torch.randint(1, V, (B, L), generator=g, dtype=torch.int32),
             "labels": torch.randint(1, V, (B, L), generator=g, dtype=torch.int32),
             "puzzle_identifiers": torch.zeros(B, dtype=torch.int32)}
    opts = [AdamATan2(head.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1.0),
            CastedSparseEmbeddingSignSGD_Distributed(model.puzzle_emb.buffers(), world_size=1, lr=1e-4,
                                                     weight_decay=1.0)]
    return batch, opts


class Runner:
    def __init__(self, head, batch, opts, with_optim: bool, baseline: bool = False, arch: str = "hrm"):
        self.head, self.batch, self.opts, self.with_optim, self.baseline = head, batch, opts, with_optim, baseline
        self.arch = arch
        self.carry = head.initial_carry(batch)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        with original_like() if self.baseline else contextlib.nullcontext():
            t0 = time.perf_counter()
            self.carry, loss, _, _, _ = self.head(return_keys=[], carry=self.carry, batch=self.batch)
            (loss / self.batch["inputs"].shape[0]).backward()
            if self.with_optim:
                for o in self.opts:
                    o.step()
            for o in self.opts:
                o.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "sudoku"], choices=list(SHAPES))
    ap.add_argument("--archs", nargs="+", default=["hrm"], choices=list(ARCHS), help="trm: also time TRM")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the issue's target is 1)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sudoku-steps", type=int, default=3, help="steps at the (slow) Sudoku shape")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--gating", action="store_true", help="also time use_gating=true")
    ap.add_argument("--no-optim", action="store_true", help="forward+backward only")
    ap.add_argument("--no-baseline", action="store_true", help="skip the original-like rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    rows, versus = [], []
    for shape in args.shapes:
        for gating in ([False, True] if args.gating else [False]):
            for dtype in args.dtypes:
                ours = Runner(*build(shape, dtype, gating), with_optim=not args.no_optim)
                runners = [ours]
                if not args.no_baseline:
                    runners.append(Runner(*build(shape, dtype, gating, attn_backend="sdpa"),
                                          with_optim=not args.no_optim, baseline=True))
                if "trm" in args.archs and not gating:
                    runners.append(Runner(*build(shape, dtype, False, arch="trm"), with_optim=not args.no_optim,
                                          arch="trm"))
                n = args.sudoku_steps if shape == "sudoku" else args.steps
                warmup = args.warmup if shape == "tiny" else min(args.warmup, 1)  # a Sudoku step is long enough
                for i in range(warmup + n):
                    for r in runners:  # alternate, so load changes hit both alike
                        r.step(record=i >= warmup)
                B = ours.batch["inputs"].shape[0]
                baseline = [r for r in runners if r.baseline]
                base_med = statistics.median(baseline[0].times) if baseline else float("nan")
                for r in runners:
                    med = statistics.median(r.times)
                    name = (("TRM " if r.arch == "trm" else "") + shape + (" +gating" if gating else "")
                            + (" original-like" if r.baseline else ""))
                    ratio = base_med / med if r.arch == "hrm" else float("nan")
                    gflop_r = r.head.model.estimate_flops(B) / 1e9
                    params = sum(p.numel() for p in r.head.parameters())
                    rows.append((name, dtype, params, B, n, med, min(r.times), B / med, gflop_r / med, ratio))
                    print(f"{name} {dtype}: {med:.3f} s/step", file=sys.stderr, flush=True)
                trm = [r for r in runners if r.arch == "trm"]
                if trm:
                    hrm_med, trm_med = statistics.median(ours.times), statistics.median(trm[0].times)
                    versus.append((shape, dtype, hrm_med, trm_med, trm_med / hrm_med))

    what = "fwd+bwd" if args.no_optim else "fwd+bwd+optim"
    print(f"\n{what}, {args.threads} thread(s), torch {torch.__version__}, {platform.machine()}\n")
    print("| shape | dtype | params | batch | steps | median s/step | min s/step | samples/s | GFLOP/s (est.) "
          "| speed vs original-like |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, dtype, params, B, n, med, mn, sps, gfs, ratio in rows:
        shown = "-" if ratio != ratio else f"{ratio:.2f}x"  # NaN: no baseline for this row
        print(f"| {name} | {dtype} | {params / 1e6:.2f}M | {B} | {n} | {med:.3f} | {mn:.3f} | {sps:.1f} | {gfs:.1f} "
              f"| {shown} |")
    if versus:
        print("\n| shape | dtype | HRM s/step | TRM s/step | TRM / HRM step time |")
        print("|---|---|---|---|---|")
        for shape, dtype, h, t, ratio in versus:
            print(f"| {shape} | {dtype} | {h:.3f} | {t:.3f} | {ratio:.2f}x |")
    print(f"\n{len(rows)} rows in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
