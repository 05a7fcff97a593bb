"""LM data pipeline throughput on tinyshakespeare: tokenizer training/encoding/decoding, dataset build,
and the loader. Prints a markdown table (MB = 10^6 bytes of UTF-8 source text).

    .venv/bin/python -m bench.bench_lm_data [--source PATH] [--repeat-corpus 8] [--vocab-size 2048]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from dataset.build_lm_dataset import BuildConfig, build
from dataset.lm_tokenizer import LMTokenizer, train_bpe_tokenizer
from lm_dataset import LMDataset, LMDatasetConfig, create_dataloader

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def timed(fn, repeats: int = 3):
    """Best of `repeats` wall-clock runs (least disturbed by other load on a shared machine)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--repeat-corpus", type=int, default=8, help="also measure on the corpus repeated N times")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--max-seq-len", type=int, default=256)
    args = ap.parse_args()

    text = Path(args.source).read_text(encoding="utf-8")
    mb = len(text.encode()) / 1e6
    rows = []

    docs = [text[i:i + 8192] for i in range(0, len(text), 8192)]
    t, tok = timed(lambda: LMTokenizer(train_bpe_tokenizer(iter(docs), args.vocab_size)), repeats=2)
    rows.append((f"train BPE tokenizer (vocab {args.vocab_size})", mb, t))
    t, ids = timed(lambda: tok.encode_batch(docs))
    rows.append(("encode (encode_batch, 8 KB docs)", mb, t))
    t, _ = timed(lambda: [tok.decode(x) for x in ids])
    rows.append(("decode", mb, t))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "big.txt"
        big.write_text(text * args.repeat_corpus, encoding="utf-8")
        tok.save(tmp / "tokenizer.json")
        for src, label, size in ((args.source, "1x", mb), (str(big), f"{args.repeat_corpus}x", mb * args.repeat_corpus)):
            for tokfile in (None, str(tmp / "tokenizer.json")):
                what = "train tokenizer + build" if tokfile is None else "build with given tokenizer"
                t, meta = timed(lambda: build(BuildConfig(
                    source=src, output_dir=str(tmp / "out"), tokenizer=tokfile, vocab_size=args.vocab_size,
                    max_seq_len=args.max_seq_len, overwrite=True)), repeats=2)
                rows.append((f"dataset build, {what} ({label} corpus)", size, t))

        cfg = LMDatasetConfig(seed=0, dataset_path=str(tmp / "out"), global_batch_size=64, test_set_mode=False,
                              epochs_per_iter=1, rank=0, num_replicas=1)
        loader = create_dataloader(LMDataset(cfg, "train"), num_workers=0)

        def drain():
            n = 0
            for _, b, _ in loader:
                n += int(b["encoder_mask"].sum() + b["decoder_mask"].sum())
            return n
        t, ntok = timed(drain)
        loader_row = (len(loader), ntok, t)

    print(f"_{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, corpus {Path(args.source).name} ({mb:.2f} MB)_\n")
    print("| stage | MB | seconds | MB/s |")
    print("|---|---:|---:|---:|")
    for name, size, t in rows:
        print(f"| {name} | {size:.2f} | {t:.3f} | {size / t:.2f} |")
    nb, ntok, t = loader_row
    print(f"\nLoader (in-process, batch 64, {args.repeat_corpus}x corpus): {nb} batches in {t:.3f} s = "
          f"{nb / t:.0f} batches/s, {ntok / t / 1e6:.2f} M tokens/s.")


if __name__ == "__main__":
    main()
