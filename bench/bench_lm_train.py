"""HRM-LM training throughput: full optimizer steps (forward over every HRM segment with deep supervision,
backward, AdamW) on random token batches, for the Mamba2 and Transformer encoders and the MoE option.
Prints a markdown table; decoder (target) tokens/s is the number the trainer logs.

    python -m bench.bench_lm_train [--hidden 128] [--batch 16] [--prompt-len 64] [--target-len 64] [--steps 6]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from models.hrm_lm.hrm_lm_v1 import HRMLanguageModel
from models.hrm_lm.losses import LMLossHead

VARIANTS = {
    "mamba2": dict(encoder="mamba2"),
    "transformer": dict(encoder="transformer"),
    "mamba2 + MoE(4, top-1)": dict(encoder="mamba2", encoder_ffn="moe", moe_num_experts=4, moe_top_k=1),
    "mamba2, no deep supervision": dict(encoder="mamba2", ds_weight=0.0),
}


def base_config(args) -> dict:
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, num_heads=max(1, args.hidden // 32),
                encoder_layers=2, H_layers=1, L_layers=1, H_cycles=2, L_cycles=2, halt_max_steps=2,
                decoder_layers=2, mamba_headdim=32, mamba_d_state=32, mamba_chunk_size=32)


def measure(cfg: dict, args) -> tuple[float, float, int]:
    head = LMLossHead(HRMLanguageModel(cfg)).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    B, Lp, Lt, V = args.batch, args.prompt_len, args.target_len, args.vocab
    batch = dict(encoder_ids=torch.randint(3, V, (B, Lp), generator=g),
                 encoder_mask=torch.ones(B, Lp, dtype=torch.bool),
                 decoder_input_ids=torch.randint(3, V, (B, Lt), generator=g),
                 labels=torch.randint(3, V, (B, Lt), generator=g))

    def step():
        _, loss, _, _, _ = head(carry={}, batch=batch)
        (loss / B).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    return dt, B * Lt / dt, sum(p.numel() for p in head.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--target-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"hidden {args.hidden}, batch {args.batch}, prompt {args.prompt_len}, target {args.target_len}, "
          f"vocab {args.vocab}, H/L cycles 2/2, 2 segments\n")
    print("| variant | params | s/step | target tokens/s |")
    print("|---|---:|---:|---:|")
    for name, over in VARIANTS.items():
        cfg = base_config(args) | over
        dt, tps, n = measure(cfg, args)
        print(f"| {name} | {n / 1e6:.2f}M | {dt:.3f} | {tps:,.0f} |", flush=True)
    print(f"\n{len(VARIANTS)} variants in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
