"""Viewer benchmark: page size, build time and how fast headless Chromium shows 10,000 puzzles with
per-segment predictions (time to first render, filter, next puzzle, segment step). Prints a markdown table.

    python -m bench.bench_viewer [--workdir /tmp/bench_viewer] [--puzzles 10000] [--screenshot docs/x.png]

Datasets are synthetic (random tokens, written with the project's writer): a Sudoku-shaped one (9x9,
vocab 11, 16 segments, the HRM default halt_max_steps) and a 30x30 maze-shaped one (900 cells, the ARC
canvas size, 8 segments). Predictions are the labels with ~30% of rows wrong in 1-6 cells, and earlier
segments wrong in more cells. Needs Debian's chromium and chromium-driver and selenium."""
from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from dataset.common import BLANK_IDENTIFIER, PuzzleSetArrays, split_metadata, write_puzzle_dataset

CASES = {"sudoku 9x9": (81, 11, 16, (2, 11)), "maze 30x30": (900, 6, 8, (1, 6))}


def make_case(root: Path, n: int, seq_len: int, vocab: int, segments: int, tokens: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = rng.integers(*tokens, size=(n, seq_len)).astype(np.uint8)
    inputs = np.where(rng.random((n, seq_len)) < 0.5, tokens[0], labels).astype(np.uint8)
    sets = {"all": PuzzleSetArrays(inputs=inputs, labels=labels, puzzle_identifiers=np.zeros(n, np.int32),
                                   puzzle_indices=np.arange(n + 1, dtype=np.int32),
                                   group_indices=np.arange(n + 1, dtype=np.int32))}
    meta = split_metadata(sets, vocab_size=vocab, seq_len=seq_len, num_puzzle_identifiers=1, ignore_label_id=None)
    write_puzzle_dataset(root, {"train": (meta, sets), "test": (meta, sets)}, [BLANK_IDENTIFIER])
    preds = labels.astype(np.int32).copy()
    wrong = rng.random(n) < 0.3
    for r in np.flatnonzero(wrong):
        cells = rng.choice(seq_len, size=rng.integers(1, 7), replace=False)
        preds[r, cells] = tokens[0] + (preds[r, cells] - tokens[0] + 1) % (tokens[1] - tokens[0])
    segs = np.repeat(preds[:, None, :].astype(np.uint8), segments, axis=1)
    for k in range(segments - 1):
        extra = rng.random((n, seq_len)) < 0.3 * (segments - 1 - k) / segments
        segs[:, k] = np.where(extra, tokens[0], segs[:, k])
    np.savez(root / "predictions.npz", inputs=inputs.astype(np.int32), labels=labels.astype(np.int32),
             puzzle_identifiers=np.zeros(n, np.int32), preds=preds, q_halt_logits=rng.normal(size=n).astype(np.float32),
             segment_preds=segs, segment_steps=np.full(n, segments, np.int32))
    return root


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)


def timed_js(driver, action: str, ready: str) -> float:
    """ms from running `action` until the JS expression `ready` holds, measured inside the page."""
    return driver.execute_async_script(f"""
        const done = arguments[0]; const t0 = performance.now(); {action};
        const poll = () => ({ready}) ? done(performance.now() - t0) : requestAnimationFrame(poll); poll();""")


def measure(driver, page: Path, reps: int) -> dict:
    loads, firsts, seg_ready, filters, nexts, segs = [], [], [], [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        driver.get(page.as_uri())
        while driver.execute_script("return document.body.dataset.ready || ''") != "1":
            time.sleep(0.01)
        loads.append(1000 * (time.perf_counter() - t0))
        first = driver.execute_script("return window.viewerTimings")  # ms from the script's start
        firsts.append(first["firstRenderMs"])
        seg_ready.append(first["segmentsMs"])
        filters.append(timed_js(driver, "document.querySelector('#filters [data-filter=wrong]').click()",
                                "document.querySelector('#filters [data-filter=wrong]').classList.contains('active')"))
        nexts.append(timed_js(driver, "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'j'}))",
                              "document.querySelector('.card.selected')?.dataset.pos === '1'"))
        segs.append(timed_js(driver, "const s = document.getElementById('step-slider'); s.value = 1; s.dispatchEvent(new Event('input'))",
                             "document.getElementById('seg-label').textContent.startsWith('segment 1 ')"))
    return {"load_ms": np.median(loads), "first_render_ms": np.median(firsts), "segments_ms": np.median(seg_ready),
            "filter_ms": np.median(filters), "next_ms": np.median(nexts), "segment_ms": np.median(segs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/bench_viewer")
    p.add_argument("--puzzles", type=int, default=10000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--screenshot", default=None, help="also save a screenshot of the first case's page here")
    args = p.parse_args()
    from utils import viewer
    work = Path(args.workdir)
    driver = chromium()
    rows = []
    try:
        for name, (seq_len, vocab, segments, tokens) in CASES.items():
            root = make_case(work / name.replace(" ", "_"), args.puzzles, seq_len, vocab, segments, tokens)
            t0 = time.perf_counter()
            html = viewer.render_html(viewer.build_payload(str(root), predictions=str(root)))
            build_s = time.perf_counter() - t0
            page = viewer.write_atomic(html, root / "viewer.html")
            m = measure(driver, page, args.reps)
            rows.append((name, segments, len(html.encode()) / 2**20, build_s, m))
            if args.screenshot and len(rows) == 1:
                driver.save_screenshot(args.screenshot)
    finally:
        driver.quit()
    print(f"viewer, {args.puzzles} puzzles, Chromium {driver.capabilities.get('browserVersion', '?')}, "
          f"{platform.processor() or platform.machine()}, median of {args.reps} loads\n")
    print("| dataset | segments | page MB | build s | first render ms | + segments ms | load to ready ms | filter ms | next puzzle ms | segment step ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, segments, mb, build_s, m in rows:
        print(f"| {name} | {segments} | {mb:.1f} | {build_s:.1f} | {m['first_render_ms']:.0f} | {m['segments_ms']:.0f} | {m['load_ms']:.0f} | "
              f"{m['filter_ms']:.0f} | {m['next_ms']:.0f} | {m['segment_ms']:.0f} |")


if __name__ == "__main__":
    main()
