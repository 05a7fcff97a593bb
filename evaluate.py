"""Evaluate a checkpoint on a dataset split; write predictions and metrics (and ARC pass@K + submission).

    python evaluate.py checkpoint=checkpoints/<project>/<run>/step_N
    python evaluate.py checkpoint=path/to/original/step_26040 data_path=data/sudoku-extreme-1k-aug-1000
    python evaluate.py checkpoint=... eval_halting=q eval_samples=16 eval_noise_std=0.1 eval_select=vote
    torchrun --nproc-per-node 8 evaluate.py checkpoint=...

Accepts our step dirs and the original's `step_N` files (with `all_config.yaml` beside them). A step dir
with `ema.safetensors` (a run with ema=true) is evaluated with its EMA weights, as training evaluated it;
`ema=false` evaluates the live training weights instead. Writes to
`output_dir` (default: the step dir, or `<file>_eval/` for an original checkpoint):
  predictions.npz  inputs, labels, puzzle_identifiers, preds (argmax tokens), q_halt_logits; real rows only;
                   with save_segments also segment_preds [N, S, L] (each ACT segment's answer) and
                   segment_steps [N] (the segment each row halted at)
  metrics.json     the flat eval/... metrics (+ arc/pass@1, pass@2, pass@10 for ARC datasets; with segments
                   eval/segment_<k>/exact_accuracy)
  accuracy_by_segment.png  exact accuracy after each segment (with segments)
  submission.json  ARC-Prize format (ARC datasets only)
and prints one table: metric, value, 95 % interval, segments used, samples, dataset, checkpoint.
LM datasets (utils/lm_eval.py): decoder CE/ppl, eval/bits_per_char, and for prompt -> answer data
eval/answer_exact (+ per group, gate and halting diagnostics) from greedy KV-cache decoding
(`answers=auto|true|false`, `answer_max_examples=N`).
The inference keys (eval_halting, eval_max_segments, eval_samples, eval_noise_std, eval_select; see
config/cfg_pretrain.yaml) default to the checkpoint's config; `seed` seeds the sampling noise."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from dataset.context import EXAMPLE_NAMES, is_context_dataset

from utils.checkpoint import CheckpointError, ema_file, load_model_from_checkpoint, resolve_checkpoint, write_json_atomic
from utils.data import data_errors, dataset_kind, make_dataset, make_loader, validate_dataset
from utils.distributed import init_distributed, shutdown_distributed
from utils.config import check_eval_keys
from utils.eval_metrics import dataset_task, metrics_table
from utils.evaluation import evaluate, output_row_order, score_arc
from utils.inference import InferenceSettings
from utils.schema import ConfigError, apply_key_values

SAVE_KEYS = ["inputs", "labels", "puzzle_identifiers", "preds", "q_halt_logits"]
OPTIONS = ("checkpoint", "data_path", "output_dir", "eval_batch_size", "max_eval_batches", "device", "split", "arc",
           "ema", "eval_halting", "eval_max_segments", "eval_samples", "eval_noise_std", "eval_select", "seed",
           "save_segments", "answers", "answer_max_examples")
INT_OPTIONS = ("eval_batch_size", "max_eval_batches", "eval_max_segments", "eval_samples", "seed", "answer_max_examples")
INFERENCE_OPTIONS = ("eval_halting", "eval_max_segments", "eval_samples", "eval_noise_std", "eval_select")
# save_segments=auto keeps per-segment answers when they take at most this much memory (uint8 tokens).
AUTO_SEGMENT_BYTES = 512 * 2**20


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`key=value` words (the original's style) and `--key value` flags, same names."""
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value, keys: " + ", ".join(OPTIONS))
    parser.add_argument("--checkpoint")
    parser.add_argument("--data-path", dest="data_path")
    parser.add_argument("--output-dir", dest="output_dir")
    parser.add_argument("--eval-batch-size", dest="eval_batch_size", type=int)
    parser.add_argument("--max-eval-batches", dest="max_eval_batches", type=int)
    parser.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    parser.add_argument("--split", default=None, help="dataset split (default test)")
    parser.add_argument("--arc", default=None, help="auto | true | false: ARC voting and pass@K (default auto)")
    parser.add_argument("--ema", default=None, help="auto | true | false: the checkpoint's EMA weights (default auto: "
                                                    "when it has them)")
    for key in INFERENCE_OPTIONS + ("seed",):
        parser.add_argument("--" + key.replace("_", "-"), dest=key, default=None,
                            type=int if key in INT_OPTIONS else float if key == "eval_noise_std" else str)
    parser.add_argument("--answers", default=None, help="LM datasets: auto | true | false: greedy-decode every answer "
                        "-> eval/answer_exact (default auto: prompt -> answer data)")
    parser.add_argument("--answer-max-examples", dest="answer_max_examples", type=int, default=None,
                        help="LM datasets: answer-decode at most the first N examples")
    parser.add_argument("--save-segments", dest="save_segments", default=None,
                        help="auto | true | false: keep each segment's answer (default auto: if it fits in "
                             f"{AUTO_SEGMENT_BYTES // 2**20} MiB)")
    args = parser.parse_args(argv)
    apply_key_values(args, args.overrides, OPTIONS, ints=INT_OPTIONS, floats=("eval_noise_std",))
    check_eval_keys({k: getattr(args, k) for k in INFERENCE_OPTIONS if getattr(args, k) is not None})
    if not args.checkpoint:
        raise ConfigError("checkpoint=<step dir or original step_N file> is required")
    args.device = args.device or "auto"
    args.split = args.split or "test"
    if args.answer_max_examples is not None and args.answer_max_examples < 1:
        raise ConfigError(f"'answer_max_examples' must be >= 1; got {args.answer_max_examples}")
    for key in ("arc", "ema", "save_segments", "answers"):
        value = (getattr(args, key) or "auto").lower()
        if value not in ("auto", "true", "false"):
            raise ConfigError(f"'{key}' must be auto, true or false; got {value!r}")
        setattr(args, key, value)
    return args


def check_data_fits(head, meta, checkpoint: str, data_path: str, split: str, puzzle: bool) -> None:
    """A model and a dataset that do not fit each other fail here in one line, not deep inside the forward
    (an embedding lookup out of range, a position table too short)."""
    from utils.modeling import inner_model
    model_cfg = getattr(inner_model(head), "config", None)
    keys = ("vocab_size", "seq_len", "num_puzzle_identifiers") if puzzle else ("vocab_size",)
    for key in keys:
        have, need = getattr(model_cfg, key, None), getattr(meta, key, None)
        if have is None or need is None:
            continue
        bad = have != need if key == "seq_len" else need > have  # ids beyond the table; positions must match
        if bad:
            raise CheckpointError(f"checkpoint '{checkpoint}' does not fit data_path '{data_path}': the model has "
                                  f"{key}={have} but its {split} split has {key}={need}; evaluate on the dataset it was "
                                  f"trained on (or one built with the same settings)")


def arc_mismatch(data_path: str) -> str:
    """What makes `data_path` not an ARC dataset, for the error message."""
    if not (Path(data_path) / "identifiers.json").is_file():
        return "it has no identifiers.json"
    meta = json.loads((Path(data_path) / "train" / "dataset.json").read_text())
    return (f"ARC has seq_len 900 (30x30 grids) and vocab_size 12; this one has seq_len {meta.get('seq_len')} and "
            f"vocab_size {meta.get('vocab_size')}")


def run(args: argparse.Namespace) -> dict:
    info = init_distributed(args.device)
    t0 = time.time()
    has_ema = ema_file(args.checkpoint) is not None
    if args.ema == "true" and not has_ema:
        raise CheckpointError(f"checkpoint '{args.checkpoint}' has no EMA weights (ema.safetensors; trained with "
                              f"ema=false?); drop ema=true to evaluate its weights")
    use_ema = has_ema and args.ema != "false"
    cfg, head = load_model_from_checkpoint(args.checkpoint, device=info.device, data_path=args.data_path, ema=use_ema)
    data_path = cfg.data_path
    validate_dataset(data_path)
    gbs = args.eval_batch_size or cfg.eval_batch_size or cfg.global_batch_size
    if gbs % info.world_size:
        raise ConfigError(f"eval_batch_size {gbs} must be divisible by world_size {info.world_size}")
    dataset = make_dataset(data_path, args.split, seed=cfg.seed, global_batch_size=gbs, test_set_mode=True,
                           epochs_per_iter=1, rank=info.rank, world_size=info.world_size)
    puzzle = dataset_kind(data_path) == "puzzle"
    check_data_fits(head, dataset.metadata, args.checkpoint, data_path, args.split, puzzle)
    task = dataset_task(data_path) if puzzle else None
    in_context = puzzle and is_context_dataset(data_path, args.split)
    arc_data = puzzle and (task == "arc" or in_context)
    arc = args.arc == "true" or (args.arc == "auto" and arc_data)
    if arc and not arc_data:
        raise ConfigError(f"arc=true, but '{data_path}' is not an ARC dataset ({arc_mismatch(data_path)}); "
                          "use arc=auto or false for other puzzles")
    settings = inference_settings(cfg, args)
    if info.is_main:
        print(f"evaluating {args.checkpoint} on {data_path}/{args.split} (global batch {gbs}"
              + (", then ARC voting)" if arc else ")"), flush=True)
    segments = puzzle and want_segments(args.save_segments, dataset, head, settings, info.is_main)
    metrics, outputs = evaluate(head, make_loader(dataset, num_workers=1), info, device=info.device,
                                mixed_precision=cfg.mixed_precision, max_batches=args.max_eval_batches,
                                save_keys=SAVE_KEYS if puzzle else [], global_batch_size=gbs, progress=True,
                                settings=settings, task=task, save_segments=segments)
    if not puzzle:  # bits per character, answer accuracy: the same module as pretrain.py's evals
        from utils.lm_eval import LMEvalSettings, check_settings, lm_eval, loss_pass_rows
        from utils.modeling import inner_model
        answers = {"true": True, "false": False}.get(args.answers, "auto")
        lm_settings = LMEvalSettings(answers=answers, max_examples=args.answer_max_examples)
        check_settings(lm_settings, inner_model(head), data_path)
        rows = loss_pass_rows(len(dataset.data), args.max_eval_batches, gbs)
        metrics.update(lm_eval(inner_model(head), data_path, args.split, metrics, info, device=info.device,
                               batch_size=gbs // info.world_size, settings=lm_settings, rows_evaluated=rows,
                               mixed_precision=cfg.mixed_precision, progress=True))
    tasks = None
    if arc and not in_context:  # every rank takes part: rank 0 votes and shares the numbers
        arc_metrics, tasks = score_arc(outputs, data_path, info)
        metrics.update(arc_metrics)
    if not info.is_main:
        return metrics

    weights_file, kind = resolve_checkpoint(args.checkpoint)
    out_dir = Path(args.output_dir) if args.output_dir else (
        weights_file.parent if kind == "ours" else weights_file.with_name(weights_file.name + "_eval"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if outputs:
        tmp = out_dir / f".tmp-predictions-{os.getpid()}.npz"
        np.savez_compressed(tmp, **outputs)
        os.replace(tmp, out_dir / "predictions.npz")
    if arc and in_context and outputs:
        from utils import arc_scoring
        # names per example, in dataset order; outputs come rank-interleaved
        names = arc_scoring.load_identifiers(data_path)
        split_dir = Path(data_path) / args.split
        name_ids = [np.load(split_dir / f"{s}__{EXAMPLE_NAMES}.npy") for s in dataset.metadata.sets]
        rows = output_row_order([len(n) for n in name_ids], gbs, info.world_size, args.max_eval_batches)
        row_names = [names[i] for i in np.concatenate(name_ids)[rows]]
        tasks = arc_scoring.vote_context(outputs["inputs"], outputs["labels"], outputs["preds"],
                                         outputs["q_halt_logits"], row_names)
        metrics.update({f"arc/{k}": v for k, v in arc_scoring.pass_at_k(tasks).items()})
    if tasks is not None:
        from utils import arc_scoring
        write_json_atomic(out_dir / "submission.json", arc_scoring.submission(tasks))
    metrics["eval/num_examples"] = float(len(outputs["preds"])) if outputs else float("nan")
    if outputs and "segment_preds" in outputs:
        report_segments(outputs, metrics, out_dir)
    write_json_atomic(out_dir / "metrics.json", metrics)
    if puzzle:
        print(metrics_table(metrics, f"{data_path}/{args.split}", str(args.checkpoint)), flush=True)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())
                      if k.endswith(("accuracy", "pass@1", "pass@2", "ppl", "answer_exact", "bits_per_char")))
    print(f"evaluated {args.checkpoint} ({'EMA' if use_ema else 'live'} weights) on {data_path}/{args.split}: "
          f"{shown} ({time.time() - t0:.1f} s); "
          f"wrote {out_dir}/metrics.json", flush=True)
    return metrics


def inference_settings(cfg, args: argparse.Namespace) -> InferenceSettings:
    """The checkpoint config's inference keys, overridden by the command line's."""
    values = {k: getattr(cfg, k) for k in INFERENCE_OPTIONS}
    values.update({k: getattr(args, k) for k in INFERENCE_OPTIONS if getattr(args, k) is not None})
    return InferenceSettings(halting=values["eval_halting"], max_segments=values["eval_max_segments"],
                             samples=values["eval_samples"], noise_std=float(values["eval_noise_std"]),
                             select=values["eval_select"], seed=cfg.seed if args.seed is None else args.seed)


def want_segments(option: str, dataset, head, settings: InferenceSettings, is_main: bool) -> bool:
    """save_segments: true/false as given; auto = when the model runs ACT segments and their answers fit."""
    from utils.inference import supports_segments
    model = getattr(head, "model", None)
    if option != "auto" or model is None or not supports_segments(model):
        return option == "true"
    rows = len(dataset) * dataset.config.global_batch_size  # eval batches x batch size: at most one batch over
    size = rows * int(settings.max_segments or model.config.halt_max_steps) * dataset.metadata.seq_len
    if size > AUTO_SEGMENT_BYTES and is_main:
        print(f"note: per-segment answers would take ~{size / 2**20:.0f} MiB; not saved (save_segments=true forces them)",
              flush=True)
    return size <= AUTO_SEGMENT_BYTES


def report_segments(outputs: dict, metrics: dict, out_dir: Path) -> None:
    """Exact accuracy after each ACT segment: metrics, one printed line and accuracy_by_segment.png."""
    from utils.puzzle_view import plot_segment_accuracy, segment_exact_accuracy
    acc = segment_exact_accuracy(outputs["segment_preds"], outputs["labels"])
    for k, a in enumerate(acc, start=1):
        metrics[f"eval/segment_{k}/exact_accuracy"] = float(a)
    plot = plot_segment_accuracy(acc, out_dir / "accuracy_by_segment.png",
                                 title=f"exact accuracy by segment ({len(outputs['labels'])} examples)")
    print("exact accuracy by segment: " + ", ".join(f"{k}: {100 * a:.1f}%" for k, a in enumerate(acc, start=1))
          + f" (plot: {plot})", flush=True)


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except (ConfigError, CheckpointError) + data_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing partial was written", file=sys.stderr)
        sys.exit(130)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
