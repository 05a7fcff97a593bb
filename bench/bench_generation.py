"""Generation throughput of the language models with and without the KV cache, at a small CPU size, one thread.

    python -m bench.bench_generation [--hidden 128] [--prompt-len 64] [--new-tokens 64] [--batches 1 8] [--repeats 3]

Models (random init, seeded; greedy decoding of a fixed number of tokens - EOS is disabled so every run
decodes exactly --new-tokens): hrm_lm with the Mamba2 and with the Transformer prompt encoder, and
lm_transformer sized to the mamba hybrid's parameter count (models/lm_transformer/sizing.py). "cached" is
model.generate() (KV cache), "uncached" is generate(use_cache=False): the hybrid recomputes its decoder over
the whole prefix each step (its prompt memory is still computed once), the plain LM recomputes prompt and prefix.
tok/s = batch x new tokens / wall time of the whole generate() call (prompt pass included; the prompt
pass alone is the "prompt ms" column). Median of --repeats timed runs after one warm-up run.
Prints the machine (CPU model, SIMD flags, load average) and a markdown table.

Answer-eval throughput (second table; needs utils/lm_eval.py, the issue-12 answer evaluation): the same three
kinds of model at vocab 260 on a generated addition dataset (`build_lm_dataset reasoning --task addition`,
1-3 digit train range, --answer-items validation prompts), utils.lm_eval.answer_eval (batched greedy decoding
with the KV cache, at most len(target) + 1 tokens per answer) at each --answer-batches; answers/s = prompts /
wall time. Random-init models rarely emit EOS, so they decode the full length: the slow end for a trained one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone

import torch

from models.hrm_lm.hrm_lm_v1 import HRMLanguageModel
from models.lm_transformer.lm_transformer import LMTransformer
from models.lm_transformer.sizing import size_like

SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
NO_EOS = -1  # an id no token has: generation never stops early, so every run decodes the same count


def machine() -> str:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = " ".join(f for f in SIMD_FLAGS if f in flags) or "none listed"
    load = "%.1f / %.1f / %.1f" % os.getloadavg()
    return (f"{model}, {os.cpu_count()} logical CPUs; SIMD flags: {simd}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s); load average (1/5/15 min) {load}")


def hybrid_config(args, encoder: str) -> dict:
    return dict(vocab_size=args.vocab, seq_len=args.prompt_len, hidden_size=args.hidden,
                num_heads=max(1, args.hidden // 32), encoder=encoder, encoder_layers=2, H_layers=1, L_layers=1,
                H_cycles=2, L_cycles=2, halt_max_steps=2, decoder_layers=2, mamba_headdim=32, mamba_d_state=32,
                mamba_chunk_size=32, eos_id=NO_EOS)


def models(args) -> list[tuple[str, torch.nn.Module]]:
    mamba = hybrid_config(args, "mamba2")
    base = dict(size_like(mamba, match="params"), eos_id=NO_EOS)
    return [("hrm_lm (mamba2 encoder)", HRMLanguageModel(mamba)),
            ("hrm_lm (transformer encoder)", HRMLanguageModel(hybrid_config(args, "transformer"))),
            (f"lm_transformer (n_layers={base['n_layers']})", LMTransformer(base))]


def time_generate(model, enc, mask, n: int, use_cache: bool, repeats: int) -> float:
    """Median seconds of one generate() call decoding n tokens."""
    def once() -> float:
        t0 = time.perf_counter()
        count = sum(1 for _ in model.generate(enc, mask, n, greedy=True, use_cache=use_cache))
        assert count == n, f"decoded {count} of {n} tokens"
        return time.perf_counter() - t0

    once()  # warm-up: allocator, first-call dispatch
    return statistics.median(once() for _ in range(repeats))


def time_prompt(model, enc, mask, repeats: int) -> float:
    def once() -> float:
        t0 = time.perf_counter()
        model.prepare_generation(enc, mask)
        return time.perf_counter() - t0

    once()
    return statistics.median(once() for _ in range(repeats))


def answer_eval_rows(args) -> None:
    """The answer-eval table (see the module docstring), or one line saying why it is left out."""
    try:
        from utils.lm_eval import answer_eval
    except ImportError:
        print("# answer eval: utils/lm_eval.py is not in this tree (the issue-12 answer evaluation); table left out")
        return
    from dataset.build_lm_dataset import main as build
    from lm_dataset import load_lm_meta
    from utils.distributed import DistInfo

    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/lm-addition"
        build(["reasoning", "--task", "addition", "--train-digits", "1..3", "--extrap-digits", "4..5",
               "--train-items", "512", "--val-items", str(args.answer_items), "--test-items", "64",
               "--output-dir", data, "--seed", "0"])
        meta = load_lm_meta(data)
        ids = dict(vocab_size=int(meta["vocab_size"]), pad_id=int(meta["pad_id"]), bos_id=int(meta["bos_id"]),
                   eos_id=int(meta["eos_id"]))
        answer_args = argparse.Namespace(**{**vars(args), "vocab": ids["vocab_size"]})
        info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        print(f"\n# answer eval: addition (1-3 digits), {args.answer_items} validation prompts, "
              f"median of {args.repeats}")
        print("| model | params | batch | s per pass | answers/s | answer_exact (random init) |")
        print("|---|---|---|---|---|---|")
        for name, model in models(answer_args):
            for key, value in ids.items():
                setattr(model.config, key, value)  # the dataset's ids (models() disables EOS for the first table)
            params = sum(q.numel() for q in model.parameters())
            for B in args.answer_batches:
                def once() -> tuple[float, dict]:
                    t0 = time.perf_counter()
                    out = answer_eval(model, data, "validation", info, device=torch.device("cpu"), batch_size=B)
                    return time.perf_counter() - t0, out

                once()
                runs = [once() for _ in range(args.repeats)]
                sec = statistics.median(r[0] for r in runs)
                exact = runs[0][1]["eval/answer_exact"]
                print(f"| {name} | {params / 1e6:.2f}M | {B} | {sec:.2f} | {args.answer_items / sec:.0f} | "
                      f"{exact:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--answer-items", type=int, default=256, help="validation prompts of the answer-eval table")
    p.add_argument("--answer-batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--skip-answers", action="store_true", help="leave the answer-eval table out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {machine()}")
    print(f"# hidden {args.hidden}, vocab {args.vocab}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"greedy, median of {args.repeats}")
    print("| model | params | batch | prompt ms | tok/s cached | tok/s uncached | cache speed-up |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, model in models(args):
        model.eval()
        params = sum(q.numel() for q in model.parameters())
        for B in args.batches:
            enc = torch.randint(3, args.vocab, (B, args.prompt_len), generator=g)
            mask = torch.ones(B, args.prompt_len, dtype=torch.bool)
            prompt_s = time_prompt(model, enc, mask, args.repeats)
            cached = time_generate(model, enc, mask, args.new_tokens, True, args.repeats)
            uncached = time_generate(model, enc, mask, args.new_tokens, False, args.repeats)
            rate = lambda s: B * args.new_tokens / s  # noqa: E731
            print(f"| {name} | {params / 1e6:.2f}M | {B} | {1e3 * prompt_s:.1f} | {rate(cached):.0f} | "
                  f"{rate(uncached):.0f} | {uncached / cached:.2f}x |", flush=True)
    if not args.skip_answers:
        answer_eval_rows(args)
    print(f"# load average after: {'%.1f / %.1f / %.1f' % os.getloadavg()}")


if __name__ == "__main__":
    main()
