"""Train an HRM (or any model + loss head with the same API) on a puzzle or LM dataset.

    python pretrain.py data_path=data/sudoku-6x6 arch=hrm_v1 lr=1e-4
    torchrun --nproc-per-node 8 pretrain.py experiment=sudoku_extreme_1k
    python pretrain.py --multirun arch=hrm_v1,hrm_v1_gated lr=1e-4,3e-4
    python pretrain.py --cfg job            # the resolved config

Config: config/cfg_pretrain.yaml (schema: utils/config.py). The loop below is the original's: one ACT
segment per optimizer step for every row (halted rows take new data), a sparse sign-SGD optimizer for
the puzzle embeddings and a dense one for the rest, eval every `eval_interval` epochs. Added: exact
resume from full-state checkpoints, gradient accumulation, clipping, other optimizers/schedules, W&B
plus JSONL metrics under flat keys, throughput/MFU, early stopping, best-model tracking."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

if __name__ == "__main__":
    # Before the heavy imports (torch takes 3-25 s): --help, --cfg job and every config error answer in
    # about a second. utils/cli.py imports only Hydra, OmegaConf and the schema.
    from utils.cli import preflight
    sys.argv = preflight(sys.argv, __doc__)

import torch

from utils import checkpoint as ckpt
from utils.config import INJECTED_ARCH_KEYS, PretrainConfig, build_config, default_names
from utils.data import batches_per_epoch, data_errors, dataset_kind, make_dataset, make_loader, validate_dataset
from utils.distributed import (DistInfo, all_gather_object, all_reduce_grads, barrier, broadcast_module_state,
                               broadcast_object, init_distributed, shutdown_distributed)
from utils.ema import WeightEMA
from utils.eval_metrics import dataset_task, summary_line
from utils.evaluation import (ARC_KEYS, SEGMENT_KEYS, MetricAccumulator, check_inference_support, evaluate,
                              reduce_metrics, score_arc)
from utils.inference import InferenceSettings
from utils.lm_eval import LMEvalSettings, check_settings as check_lm_eval_settings, lm_eval, loss_pass_rows
from utils.logger import MetricLogger
from utils.modeling import (autocast_context, bf16_cpu_warning, build_head, compile_decision, derive_seed, inner_model,
                            prepare_for_training, puzzle_embedding, set_exploration_generator,
                            set_linear_backend)
from utils.optim import SCHEDULE_BASE_LR, build_optimizer, build_scheduler, current_lr
from utils.schema import ConfigError

KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}  # dense bf16


class TrainError(RuntimeError):
    """A failure during training that the user should see as one line (non-finite loss, ...)."""


# ----------------------------------------------------------------------------------------------
# run state


@dataclass
class Run:
    cfg: PretrainConfig
    info: DistInfo
    head: torch.nn.Module                 # uncompiled: its state_dict has the original names
    step_module: torch.nn.Module          # what the step calls (maybe compiled)
    train_loader: Any
    eval_loader: Any
    optimizers: list
    schedulers: list
    sparse_accum: Optional[dict]          # grad-accumulation buffers of the puzzle embedding
    logger: MetricLogger
    run_dir: str
    total_steps: int
    stop_step: int
    micro_batches: int
    flops_per_step: float
    exploration_gen: Optional[torch.Generator]
    config_yaml: str
    ema: Optional[WeightEMA] = None       # shadow weights (cfg.ema); evals and best/ use them
    step: int = 0
    carries: list = field(default_factory=list)
    pending_carries: Optional[list] = None  # restored carry tensors, applied at the first batch
    acc: MetricAccumulator = field(default_factory=MetricAccumulator)
    bad_step: Optional[torch.Tensor] = None
    skipped_steps: int = 0
    consecutive_skips: int = 0
    reported_skips: int = 0       # skipped_steps already announced on the console
    best_value: Optional[float] = None
    evals_without_improvement: int = 0
    last_log_time: float = 0.0
    last_log_step: int = 0
    bar: Any = None
    stopped_early: bool = False
    last_eval: dict = field(default_factory=dict)
    last_saved_step: int = -1
    lock: Optional[ckpt.RunDirLock] = None  # rank 0's exclusive hold on run_dir


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: PretrainConfig, group: Optional[str] = None, arch_choice: Optional[str] = None) -> dict:
    """Train to the end (or max_steps / early stop). Returns the last eval metrics + a summary.
    arch_choice (hrm_v1_gated, ...) names default run names; the model class name otherwise."""
    info = init_distributed(cfg.device)
    held: list = []
    try:
        run = setup_run(cfg, info, group, held, arch_choice)
    except BaseException:
        for lock in held:
            lock.release(failed=True)  # and remove the run dir if this start created it and it is still empty
        raise
    t0 = time.time()
    if run.step >= run.stop_step:
        run.logger.close()
        if run.lock is not None:
            run.lock.release()
        if info.is_main:
            print(f"nothing to do: {run.run_dir} is already at step {run.step} of {run.stop_step}", flush=True)
        return {"step": run.step, "seconds": 0.0, "skipped_steps": run.skipped_steps}
    try:
        while run.step < run.stop_step:
            for _set_name, batch, _ in run.train_loader:
                train_step(run, batch)
                if run.step % cfg.log_every == 0:
                    log_train_metrics(run)
                if cfg.checkpoint_interval_steps and run.step % cfg.checkpoint_interval_steps == 0:
                    save_now(run)
                if run.step >= run.stop_step:
                    break
            if at_window_end(run) or run.step >= run.total_steps:
                run_eval(run)  # also checkpoints, tracks the best model and early-stops
            if run.stopped_early or data_exhausted(run):
                break
        if run.step % cfg.log_every:
            log_train_metrics(run)
        if not run.last_eval.get("_step") == run.step and run.step >= run.stop_step:
            run_eval(run)  # the end, by epochs or max_steps: eval_interval=null evaluates here only
        if run.last_saved_step != run.step:
            save_now(run)  # the final (or stopped-by-max_steps) state
    finally:
        if run.bar is not None:
            run.bar.close()
        run.logger.close()
        if run.lock is not None:
            run.lock.release()
    summary = {"step": run.step, "seconds": time.time() - t0, "skipped_steps": run.skipped_steps, **run.last_eval}
    summary.pop("_step", None)
    if info.is_main:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in run.last_eval.items() if k.startswith("eval/") and isinstance(v, float))
        skipped = f" ({run.skipped_steps} skipped: non-finite loss)" if run.skipped_steps else ""
        print(f"done: {run.step} steps{skipped} in {summary['seconds']:.1f} s; " + (f"{shown}; " if shown else "")
              + f"checkpoints in {run.run_dir}", flush=True)
    return summary


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> None:
    """One optimizer step = one ACT segment for every row, over `micro_batches` accumulation chunks."""
    cfg, info = run.cfg, run.info
    run.step += 1
    if hasattr(run.head, "on_train_step"):
        run.head.on_train_step(run.step)
    batch = {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}
    micro = split_batch(batch, run.micro_batches)
    if not run.carries:
        run.carries = [run.head.initial_carry(mb) for mb in micro]
        if run.pending_carries is not None:
            run.carries = [ckpt.restore_state(c, flat) for c, flat in zip(run.carries, run.pending_carries)]
            run.pending_carries = None
    total_loss = torch.zeros((), device=info.device)
    for i, mb in enumerate(micro):
        with autocast_context(info.device, cfg.mixed_precision):
            run.carries[i], loss, metrics, _, _ = run.step_module(return_keys=[], carry=run.carries[i], batch=mb)
        # The head's loss is a SUM over rows; 1/global_batch makes the summed-over-ranks grad the global mean.
        (loss / cfg.global_batch_size).backward()
        total_loss = total_loss + loss.detach()
        run.acc.add(metrics)
        stash_sparse_grads(run, i)
    finite = torch.isfinite(total_loss)
    if cfg.nonfinite_loss == "skip" and not bool(finite):  # a host sync per step, only in skip mode
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        run.skipped_steps += 1
        run.consecutive_skips += 1
        if run.consecutive_skips >= cfg.nonfinite_max_skips:
            raise TrainError(f"{run.consecutive_skips} consecutive steps (up to step {run.step}) had a non-finite loss "
                             f"(nonfinite_max_skips={cfg.nonfinite_max_skips}); stopping (lower lr or set grad_clip); "
                             f"the last checkpoint in {run.run_dir} is intact")
        return
    run.consecutive_skips = 0
    run.bad_step = torch.where(~finite & (run.bad_step < 0), run.step, run.bad_step)

    dense = [p for p in run.head.parameters() if p.requires_grad]
    all_reduce_grads(dense, info)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(dense, cfg.grad_clip, foreach=True)
    load_sparse_grads(run)
    for opt, sched in zip(run.optimizers, run.schedulers):
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    if run.ema is not None:
        run.ema.update()
    if run.bar is not None:
        run.bar.update(1)


def split_batch(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    if n == 1:
        return [batch]
    return [dict(zip(batch, parts)) for parts in zip(*(v.chunk(n) for v in batch.values()))]


def stash_sparse_grads(run: Run, micro_index: int) -> None:
    """With grad accumulation the puzzle embedding's batch-local leaf is overwritten by each micro-batch;
    keep each micro-batch's (ids, grads) so that one sign-SGD step sees all of them."""
    acc = run.sparse_accum
    if acc is None:
        return
    emb = acc["emb"]
    B = emb.local_ids.shape[0]
    with torch.no_grad():
        acc["ids"][micro_index * B:(micro_index + 1) * B] = emb.local_ids
        grad = emb.local_weights.grad
        acc["grads"][micro_index * B:(micro_index + 1) * B] = 0 if grad is None else grad
    emb.local_weights.grad = None


def load_sparse_grads(run: Run) -> None:
    acc = run.sparse_accum
    if acc is not None:
        acc["leaf"].grad = acc["grads"].clone()


def at_window_end(run: Run) -> bool:
    """The train loader finished an iteration window (eval_interval epochs)."""
    state = run.train_loader.state_dict()
    epi = run.train_loader.dataset.config.epochs_per_iter
    return state.get("batch", 0) == 0 and state.get("set_index", 0) == 0 and state["epoch"] % epi == 0 \
        and state["epoch"] > 0


def data_exhausted(run: Run) -> bool:
    return run.train_loader.state_dict()["epoch"] >= run.cfg.epochs


# ----------------------------------------------------------------------------------------------
# metrics, eval, checkpoints


def log_train_metrics(run: Run) -> None:
    """Sync the accumulated metric tensors (one collective), reduce them, log on rank 0."""
    cfg, info = run.cfg, run.info
    steps = run.step - run.last_log_step
    sums = run.acc.reduce(info)
    run.acc.reset()
    check_finite(run)
    now = time.time()
    dt = max(now - run.last_log_time, 1e-9)
    metrics = {f"train/{k}": v for k, v in reduce_metrics(run.head, sums, "train", cfg.global_batch_size * max(steps, 1)).items()}
    metrics["train/lr"] = current_lr(run.optimizers[-1])
    if "count" in sums:  # rows that halted per step (a count; the per-count reduction made it count/count = 1)
        metrics["train/count"] = float(sums["count"]) / max(steps, 1)
    if steps > 0:
        metrics["perf/samples_per_s"] = cfg.global_batch_size * steps / dt
        metrics["perf/step_ms"] = 1000.0 * dt / steps
        if "num_tokens" in sums:
            metrics["perf/tokens_per_s"] = sums["num_tokens"] / dt
        metrics["perf/peak_mem_mib"] = peak_memory_mib(info.device)
        if run.flops_per_step > 0:
            metrics["perf/tflops"] = run.flops_per_step * steps / dt / 1e12
            peak = cfg.peak_flops or detect_peak_flops(info.device)
            if peak:
                metrics["perf/mfu"] = run.flops_per_step * steps / dt / (peak * info.world_size)
    if run.skipped_steps:
        metrics["train/skipped_steps"] = float(run.skipped_steps)
        if info.is_main and run.skipped_steps > run.reported_skips:
            print(f"warning: skipped {run.skipped_steps - run.reported_skips} steps with a non-finite loss up to step "
                  f"{run.step} ({run.skipped_steps} in all; nonfinite_loss=skip)", file=sys.stderr, flush=True)
        run.reported_skips = run.skipped_steps
    run.last_log_time, run.last_log_step = now, run.step
    run.logger.log(metrics, step=run.step)
    shown = {k.split("/")[-1]: metrics[k] for k in ("train/lm_loss", "train/exact_accuracy", "perf/samples_per_s")
             if k in metrics}
    if run.bar is not None:  # a bar on a terminal; else these ride on the plain line printed every 30 s
        run.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})


def check_finite(run: Run) -> None:
    if run.bad_step is not None and int(run.bad_step) >= 0:
        raise TrainError(f"non-finite loss at step {int(run.bad_step)} (set nonfinite_loss=skip to skip such steps, "
                         f"or lower lr); the last checkpoint in {run.run_dir} is intact")


def weights_finite(module: torch.nn.Module) -> bool:
    """One fused check of every floating tensor that a checkpoint stores (the puzzle table is a buffer):
    the max-abs norm is finite exactly when no element is NaN or inf, and cannot overflow."""
    tensors = [t for t in module.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, ord=float("inf"))
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def run_eval(run: Run) -> None:
    """Evaluate (the EMA weights when cfg.ema), log, checkpoint, track the best model, early-stop."""
    cfg, info = run.cfg, run.info
    task = dataset_task(cfg.data_path)  # the context-format ARC build votes differently (evaluate.py only)
    save_keys = list(cfg.eval_save_outputs) + ([k for k in ARC_KEYS if k not in cfg.eval_save_outputs] if task == "arc" else [])
    with run.ema.applied() if run.ema is not None else contextlib.nullcontext():
        metrics, outputs = evaluate(run.head, run.eval_loader, info, device=info.device,
                                    mixed_precision=cfg.mixed_precision, max_batches=cfg.max_eval_batches,
                                    save_keys=save_keys, global_batch_size=cfg.eval_batch_size or cfg.global_batch_size,
                                    progress=True, settings=InferenceSettings.from_config(cfg), task=task,
                                    save_segments=cfg.eval_save_segments)
        if dataset_kind(cfg.data_path) == "lm":  # bits per character, answer accuracy (+ extrapolation split)
            metrics.update(run_lm_eval(run, metrics))
        log_example_panel(run, outputs)  # the weights the eval used
    if task == "arc":  # pass@1/2 in every eval, as evaluate.py reports them
        metrics.update(score_arc(outputs, cfg.data_path, info)[0])
        outputs = {k: v for k, v in outputs.items() if k in cfg.eval_save_outputs or k in SEGMENT_KEYS} \
            if outputs else outputs
    run.logger.log(metrics, step=run.step)
    if info.is_main:
        summary = summary_line(metrics)
        print(f"eval at step {run.step}: " + (f"{summary}; " if summary else "") + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                                                    if isinstance(v, (int, float))), flush=True)
    run.last_eval = {**metrics, "_step": run.step}
    improved = track_best(run, metrics)
    if cfg.checkpoint_every_eval:
        save_now(run, eval_outputs=outputs)
    if improved:
        save_now(run, name="best", eval_outputs=None)
    if cfg.eval_patience and run.step >= cfg.eval_patience_grace_steps:
        run.evals_without_improvement = 0 if improved else run.evals_without_improvement + 1
        if run.evals_without_improvement >= cfg.eval_patience:
            run.stopped_early = True
            if info.is_main:
                print(f"early stop at step {run.step}: {cfg.save_best.metric} did not improve in "
                      f"{cfg.eval_patience} evals", flush=True)


def run_lm_eval(run: Run, metrics: dict) -> dict:
    cfg, info = run.cfg, run.info
    gbs = cfg.eval_batch_size or cfg.global_batch_size
    rows = loss_pass_rows(len(run.eval_loader.dataset.data), cfg.max_eval_batches, gbs)
    return lm_eval(inner_model(run.head), cfg.data_path, cfg.eval_split, metrics, info, device=info.device,
                   batch_size=gbs // info.world_size, settings=LMEvalSettings.from_config(cfg), rows_evaluated=rows,
                   mixed_precision=cfg.mixed_precision, progress=True)


PANEL_KEYS = ("inputs", "labels", "puzzle_identifiers", "preds")


def log_example_panel(run: Run, outputs: Optional[dict]) -> None:
    """A few wrong and right eval predictions as one picture: W&B image `eval/examples` and a PNG in the run
    dir. Uses the eval's saved outputs when they hold the keys, else re-runs the first eval batch for them."""
    cfg, info = run.cfg, run.info
    if not cfg.eval_examples or dataset_kind(cfg.data_path) != "puzzle":  # LM datasets have no puzzle grids
        return
    meta = run.eval_loader.metadata
    if not (outputs and all(k in outputs for k in PANEL_KEYS)):
        _, outputs = evaluate(run.head, run.eval_loader, info, device=info.device, mixed_precision=cfg.mixed_precision,
                              max_batches=1, save_keys=PANEL_KEYS,
                              global_batch_size=cfg.eval_batch_size or cfg.global_batch_size)
    if not info.is_main or not outputs or not len(outputs["preds"]):
        return
    from dataset.common import guess_kind
    from utils import puzzle_view as pv
    labels = outputs["labels"].astype("int64")
    preds = outputs["preds"].astype("int64")
    exact, _ = pv.exact_and_wrong(preds, labels)
    chosen = pv.pick_examples(exact, cfg.eval_examples)
    kind = guess_kind(meta, labels[0])
    names = None
    ident = Path(cfg.data_path) / "identifiers.json"
    if kind == "arc" and ident.is_file():
        import json
        table = json.loads(ident.read_text())
        names = [table[int(outputs["puzzle_identifiers"][i])] for i in chosen]
    img = pv.example_panel(pv.make_style(kind, meta.seq_len, meta.vocab_size), outputs["inputs"].astype("int64"), labels,
                           preds, chosen, names=names, q_halt=outputs.get("q_halt_logits"),
                           steps=outputs.get("segment_steps"),
                           title=f"{cfg.run_name}, eval at step {run.step}: {int((~exact).sum())} of {len(exact)} rows wrong")
    run.logger.log_image("eval/examples", img, step=run.step)


def track_best(run: Run, metrics: dict[str, float]) -> bool:
    key = run.cfg.save_best.metric
    if not key:
        return False
    if key not in metrics:
        raise TrainError(f"save_best.metric '{key}' is not an eval metric; available: {', '.join(sorted(metrics))}")
    value = metrics[key]
    better = run.best_value is None or (value > run.best_value if run.cfg.save_best.mode == "max" else value < run.best_value)
    if better:
        run.best_value = value
    return better


def save_now(run: Run, name: Optional[str] = None, eval_outputs: Optional[dict] = None) -> None:
    """Checkpoint `step_N` (or `best`); every rank contributes its carry and RNG states, rank 0 writes."""
    info = run.info
    check_finite(run)  # never write weights that already saw a non-finite update
    if not weights_finite(run.head):
        raise TrainError(f"the weights are non-finite at step {run.step} (an update overflowed: lower lr or set "
                         f"grad_clip); not checkpointed; the last checkpoint in {run.run_dir} is intact")
    state = {
        "format": 1,
        "step": run.step,
        "world_size": info.world_size,
        "data": ckpt.to_plain(run.train_loader.state_dict()),
        "optimizers": [ckpt.to_plain(o.state_dict()) for o in run.optimizers],
        "schedulers": [ckpt.to_plain(scheduler_state(s)) for s in run.schedulers],
        "best_value": run.best_value,
        "evals_without_improvement": run.evals_without_improvement,
        "skipped_steps": run.skipped_steps,
    }
    per_rank = {
        "carries": [ckpt.flatten_state(c) for c in run.carries],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(info.device) if info.device.type == "cuda" else None,
        "exploration_rng": run.exploration_gen.get_state() if run.exploration_gen is not None else None,
    }
    gathered = all_gather_object(per_rank, info)
    if info.is_main:
        state["ranks"] = gathered
        name = name or f"step_{run.step}"
        extra = {}
        tokenizer = Path(run.cfg.data_path) / "tokenizer.json"
        if tokenizer.is_file():  # LM datasets: a checkpoint then generates without its dataset
            extra["tokenizer.json"] = tokenizer.read_text()
        if name == "best":
            extra["best.json"] = f'{{"metric": "{run.cfg.save_best.metric}", "value": {run.best_value}, "step": {run.step}}}\n'
        arrays = {"eval_outputs.npz": eval_outputs} if eval_outputs else None
        ckpt.save_checkpoint(run.run_dir, name, run.head.state_dict(), state, run.config_yaml, extra, arrays,
                             ema_weights=run.ema.state_dict() if run.ema is not None else None)
        if name.startswith("step_"):
            ckpt.rotate_checkpoints(run.run_dir, run.cfg.checkpoint_limit)
    if name is None or name.startswith("step_"):
        run.last_saved_step = run.step
    barrier(info)


def scheduler_state(sched) -> dict:
    sd = sched.state_dict() if hasattr(sched, "state_dict") else {}
    # LambdaLR keeps callables only for objects; ours is a plain function, stored as None.
    return {k: v for k, v in sd.items() if not callable(v)}


def restore(run: Run, path, weights_only: bool) -> None:
    """Resume from a step dir: with weights_only=False everything (live weights, EMA, optimizers, data,
    carries, RNGs); with weights_only=True only the checkpoint's model (its EMA weights when it has them)."""
    info = run.info
    ckpt.apply_weights(run.head, ckpt.load_weights(path, ema=weights_only), str(path))
    if weights_only:
        return
    state = ckpt.load_train_state(path)
    run.step = int(state["step"])
    run.train_loader.load_state_dict(state["data"])
    try:
        for opt, sd in zip(run.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        for sched, sd in zip(run.schedulers, state["schedulers"]):
            if hasattr(sched, "load_state_dict"):
                sched.load_state_dict({**sched.state_dict(), **sd})
    except (ValueError, KeyError, RuntimeError) as e:
        raise ckpt.CheckpointError(f"checkpoint '{path}': optimizer state does not fit this config "
                                   f"({str(e).splitlines()[0]})") from None
    run.best_value = state.get("best_value")
    run.evals_without_improvement = int(state.get("evals_without_improvement", 0))
    run.skipped_steps = run.reported_skips = int(state.get("skipped_steps", 0))
    ranks = state.get("ranks", [])
    if int(state.get("world_size", 1)) == info.world_size and len(ranks) == info.world_size:
        mine = ranks[info.rank]
        run.pending_carries = mine["carries"] or None
        torch.set_rng_state(mine["torch_rng"])
        if mine.get("cuda_rng") is not None and info.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda_rng"], info.device)
        if mine.get("exploration_rng") is not None and run.exploration_gen is not None:
            run.exploration_gen.set_state(mine["exploration_rng"])
    elif info.is_main:
        print(f"warning: checkpoint was written by {state.get('world_size')} ranks, now {info.world_size}: "
              f"ACT carries and RNG streams restart (resume is not bit-exact)", file=sys.stderr)


# Keys whose change a resume cannot honour: key -> why.
RESUME_FIXED = {
    "data_path": "the saved data position and puzzle table belong to the old dataset",
    "seed": "the data order and RNG streams continue from the checkpoint",
    "global_batch_size": "the data position and ACT carries are per batch",
    "grad_accum_steps": "the ACT carries are per micro-batch",
    "optimizer.name": "the optimizer state belongs to the old optimizer",
    "lr_scheduler.name": "the schedule state belongs to the old scheduler",
}
# Keys that only name or locate the run, or only matter for a fresh start: never reported.
RESUME_IGNORED = ("project_name", "run_name", "checkpoint_path", "experiment", "init_from", "reset_progress")
# Keys that shape the LR schedule: re-planned on resume for the default schedule only.
SCHEDULE_KEYS = ("lr", "puzzle_emb_lr", "lr_warmup_steps", "lr_min_ratio", "epochs", "lr_scheduler.kwargs")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.endswith("kwargs"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def apply_resume_changes(run: Run, step_dir: Path, config_dict: dict) -> list[str]:
    """Compare the config in force with the checkpoint's: refuse what cannot change on resume (ConfigError),
    re-apply the optimizer/schedule values that the restored state just overwrote, and return one line per
    changed key. (Arch shape changes were already refused while loading the weights.)"""
    from omegaconf import OmegaConf
    try:
        old = _flat(OmegaConf.to_container(OmegaConf.load(Path(step_dir) / ckpt.CONFIG_FILE), resolve=True))
    except Exception:  # an original-format or damaged config: nothing to compare against
        return []
    new = _flat(config_dict)
    changed = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k] and k not in RESUME_IGNORED}
    cfg = run.cfg
    for key, (a, b) in changed.items():
        why = RESUME_FIXED.get(key)
        if why is None and key in SCHEDULE_KEYS and cfg.lr_scheduler.name != "cosine_warmup":
            why = f"lr_scheduler '{cfg.lr_scheduler.name}' cannot be re-planned mid-run"
        if why is not None:
            raise ConfigError(f"cannot resume {step_dir} with {key} changed ({a!r} -> {b!r}): {why}; restore the old "
                              f"value, or start a new checkpoint_path (init_from={step_dir} keeps the weights)")
    dense, sparse = run.optimizers[-1], (run.optimizers[0] if len(run.optimizers) > 1 else None)
    muon_groups = any("use_muon" in g for g in dense.param_groups)
    for key in ("weight_decay", "optimizer.kwargs"):
        if muon_groups and key in changed:  # each group took its value from a different key
            raise ConfigError(f"cannot resume {step_dir} with {key} changed under optimizer '{cfg.optimizer.name}' "
                              f"(its Muon and AdamW groups are set up once); restore the old value, or start a new "
                              f"checkpoint_path (init_from={step_dir} keeps the weights)")
    for group in dense.param_groups:  # the restored optimizer state carried the old hyperparameters
        if "betas" in group and ("beta1" in changed or "beta2" in changed):
            group["betas"] = (cfg.beta1, cfg.beta2)
        if "weight_decay" in changed and "weight_decay" in group:
            group["weight_decay"] = cfg.weight_decay
        for k, v in cfg.optimizer.kwargs.items():
            if "optimizer.kwargs" in changed and k in group:
                group[k] = v
    if sparse is not None and "puzzle_emb_weight_decay" in changed:
        for group in sparse.param_groups:
            group["weight_decay"] = cfg.puzzle_emb_weight_decay
    if any(k in changed for k in SCHEDULE_KEYS):
        bases = ([cfg.puzzle_emb_lr] if sparse is not None else []) + [cfg.lr]
        for sched, base in zip(run.schedulers, bases):  # LambdaLR: fresh lambda (new warmup/total), new base
            sched.base_lrs = [g.get(SCHEDULE_BASE_LR, base) for g in sched.optimizer.param_groups]
            for group, lam in zip(sched.optimizer.param_groups, sched.lr_lambdas):
                group["initial_lr"] = group.get(SCHEDULE_BASE_LR, base)
                group["lr"] = group["initial_lr"] * lam(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
    return [f"resume: {key} changed {a!r} -> {b!r}, in force from step {run.step + 1}" for key, (a, b) in changed.items()]


def restore_ema(run: Run, path) -> None:
    shadow = ckpt.load_ema(path)
    if shadow is None:
        if run.info.is_main:
            print(f"note: checkpoint '{path}' has no EMA weights (written with ema=false); the EMA starts "
                  f"from the resumed weights", file=sys.stderr, flush=True)
        return
    try:
        run.ema.load_state_dict(shadow, str(path))
    except ValueError as e:
        raise ckpt.CheckpointError(str(e)) from None


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def detect_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in KNOWN_PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------
# set-up


def setup_run(cfg: PretrainConfig, info: DistInfo, group: Optional[str], held: Optional[list] = None,
              arch_choice: Optional[str] = None) -> Run:
    """Everything before the first step, with every user error raised before any training work. The run dir
    lock taken here is appended to `held` at once, so that the caller releases it if set-up fails."""
    world, accum = info.world_size, cfg.grad_accum_steps
    if cfg.global_batch_size % (world * accum):
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} must be divisible by world_size {world} "
                          f"x grad_accum_steps {accum} = {world * accum}")
    eval_gbs = cfg.eval_batch_size or cfg.global_batch_size
    if eval_gbs % world:
        raise ConfigError(f"eval_batch_size {eval_gbs} must be divisible by world_size {world}")
    validate_dataset(cfg.data_path)
    epochs_per_iter = cfg.eval_interval or cfg.epochs
    train_ds = make_dataset(cfg.data_path, "train", seed=cfg.seed, global_batch_size=cfg.global_batch_size,
                            test_set_mode=False, epochs_per_iter=epochs_per_iter, rank=info.rank, world_size=world)
    eval_ds = make_dataset(cfg.data_path, cfg.eval_split, seed=cfg.seed, global_batch_size=eval_gbs,
                           test_set_mode=True, epochs_per_iter=1, rank=info.rank, world_size=world)
    per_epoch = batches_per_epoch(train_ds)
    if per_epoch < 1:
        meta = train_ds.metadata
        size = getattr(meta, "num_examples", None) if hasattr(meta, "num_examples") else meta.total_groups
        if not size:
            raise ConfigError(f"data_path '{cfg.data_path}': the train split is empty (0 examples); rebuild the dataset")
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} is larger than one epoch of '{cfg.data_path}' "
                          f"({size} {'examples' if hasattr(meta, 'num_examples') else 'puzzle groups'})")
    total_steps = cfg.epochs * per_epoch

    meta = train_ds.metadata
    micro_batch = cfg.global_batch_size // (world * accum)
    injected = {k: getattr(meta, k, None) for k in INJECTED_ARCH_KEYS if k != "batch_size"}
    injected["batch_size"] = micro_batch
    head = build_head(cfg.arch, injected, seed=cfg.seed)
    check_inference_support(head, InferenceSettings.from_config(cfg))
    if dataset_kind(cfg.data_path) == "lm":
        check_lm_eval_settings(LMEvalSettings.from_config(cfg), inner_model(head), cfg.data_path)
    elif cfg.eval_extrap_split is not None or cfg.eval_answers is True:
        raise ConfigError(f"eval_answers/eval_extrap_split apply to LM datasets; '{cfg.data_path}' is a puzzle dataset")
    arch_full = dict(cfg.arch)
    arch_full.update({k: v for k, v in injected.items() if k in dataclass_fields(inner_model(head))})

    # Names: rank 0 decides (random slug), every rank uses the same.
    model_name = type(inner_model(head)).__name__
    project, run_name, run_dir = broadcast_object(default_names(cfg, model_name, arch_choice=arch_choice) if info.is_main else None, info)
    cfg = dataclasses.replace(cfg, project_name=project, run_name=run_name, checkpoint_path=run_dir)
    error, lock = None, None
    if info.is_main:
        try:
            lock = ckpt.RunDirLock(run_dir).acquire()  # before the clean-up: it deletes temp dirs
            if held is not None:
                held.append(lock)
            ckpt.check_writable(run_dir)
            for path in ckpt.remove_stale_temps(run_dir):
                print(f"recovered {path}: a kill had interrupted its replacement", flush=True)
        except ckpt.CheckpointError as e:
            error = str(e)
    error = broadcast_object(error, info)
    if error:
        raise ckpt.CheckpointError(error)

    stop_step = min(total_steps, cfg.max_steps or total_steps)
    use_compile, compile_why = compile_decision(cfg.compile, info.device, stop_step)
    _, linear_why = set_linear_backend(head, cfg.linear_backend, info.device)
    step_module = prepare_for_training(head, info.device, use_compile)
    if info.is_main:
        print(linear_why, flush=True)
        if cfg.compile == "auto":
            print(f"{compile_why}: {'compiling' if use_compile else 'eager'}", flush=True)
        warning = bf16_cpu_warning(info.device, cfg.mixed_precision, arch_full.get("forward_dtype"))
        if warning:
            print(warning, flush=True)
    broadcast_module_state(head, info)
    exploration_gen = set_exploration_generator(head, cfg.seed, info.rank, info.device)
    torch.manual_seed(derive_seed(cfg.seed, info.rank, 0x6A7))  # for heads that still draw from the global RNG
    optimizers, base_lrs, sparse_accum = build_optimizers(head, cfg, info, accum)
    schedulers = [build_scheduler(o, cfg.lr_scheduler.name, cfg.lr_scheduler.kwargs, base_lr=lr,
                                  warmup_steps=cfg.lr_warmup_steps, total_steps=total_steps, min_ratio=cfg.lr_min_ratio)
                  for o, lr in zip(optimizers, base_lrs)]

    from omegaconf import OmegaConf
    config_dict = dataclasses.asdict(cfg)
    config_dict["arch"] = arch_full
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(config_dict))
    estimate = getattr(inner_model(head), "estimate_flops", None)
    flops = float(estimate(cfg.global_batch_size // world)) * world if estimate else 0.0

    run = Run(cfg=cfg, info=info, head=head, step_module=step_module,
              train_loader=make_loader(train_ds, num_workers=cfg.loader_workers),
              eval_loader=make_loader(eval_ds, num_workers=cfg.loader_workers),
              optimizers=optimizers, schedulers=schedulers, sparse_accum=sparse_accum, logger=None, run_dir=run_dir,
              total_steps=total_steps, stop_step=stop_step, micro_batches=accum,
              flops_per_step=flops, exploration_gen=exploration_gen, config_yaml=config_yaml, lock=lock)
    run.bad_step = torch.full((), -1, dtype=torch.long, device=info.device)

    latest = ckpt.latest_checkpoint(run_dir)
    resume_step = None
    if latest is not None:
        restore(run, latest, weights_only=cfg.reset_progress)
        resume_step = run.step
        if not cfg.reset_progress:
            for line in apply_resume_changes(run, latest, config_dict):
                if info.is_main:
                    print(line, flush=True)
        if cfg.reset_progress and info.is_main:
            ckpt.archive_run(run_dir, "before_reset")  # so the next auto-resume finds the new progress
        barrier(info)
        if info.is_main:
            what = "weights only (reset_progress)" if cfg.reset_progress else f"step {run.step}"
            print(f"resuming from {latest}: {what}", flush=True)
    elif cfg.init_from:
        notes = ckpt.apply_weights(head, ckpt.load_weights(cfg.init_from, ema=True), cfg.init_from,
                                   resize_puzzle_emb=True)
        if ckpt.ema_file(cfg.init_from) is not None:
            notes.insert(0, "its EMA weights")
        if info.is_main:
            print(f"initialised weights from {cfg.init_from}" + (f" ({'; '.join(notes)})" if notes else ""), flush=True)
    broadcast_module_state(head, info)
    if cfg.ema:  # the shadow starts from the initial (or loaded) weights; a full resume restores it
        run.ema = WeightEMA(head, cfg.ema_rate)
        if latest is not None and not cfg.reset_progress:
            restore_ema(run, latest)

    run.logger = MetricLogger(cfg.logger, run_dir, project=project, run_name=run_name, config=config_dict,
                              group=group, is_main=info.is_main, resume_step=resume_step if not cfg.reset_progress else None)
    if info.is_main:
        n_params = sum(p.numel() for p in head.parameters())
        run.logger.log({"num_params": float(n_params)}, step=run.step)
        from utils.progress import Progress
        # wall-clock progress lines every 30 s in logs, however slow a step and whatever log_every is
        run.bar = Progress(run.stop_step, desc=run_name, unit="step", initial=run.step)
        print(f"training {model_name} ({n_params / 1e6:.2f}M params) on {cfg.data_path}: {total_steps} steps "
              f"({per_epoch}/epoch), world {world}, device {info.device}, run dir {run_dir}", flush=True)
    run.last_log_time, run.last_log_step = time.time(), run.step
    return run


def dataclass_fields(model: torch.nn.Module) -> set[str]:
    cls = getattr(type(model), "config_class", None)
    return {f.name for f in dataclasses.fields(cls)} if cls is not None else set(INJECTED_ARCH_KEYS)


def build_optimizers(head: torch.nn.Module, cfg: PretrainConfig, info: DistInfo, accum: int):
    """[sparse sign-SGD for the puzzle table (if any), dense optimizer], their base LRs, accum buffers."""
    optimizers, base_lrs, sparse_accum = [], [], None
    emb = puzzle_embedding(head)
    if emb is not None:
        from models.sparse_embedding import CastedSparseEmbeddingSignSGD_Distributed
        tensors = list(emb.buffers())
        if accum > 1:
            B, dim = emb.local_weights.shape
            leaf = torch.zeros(accum * B, dim, device=emb.weights.device, requires_grad=True)
            sparse_accum = {"emb": emb, "leaf": leaf, "grads": torch.zeros(accum * B, dim, device=emb.weights.device),
                            "ids": torch.zeros(accum * B, dtype=emb.local_ids.dtype, device=emb.weights.device)}
            tensors = [leaf, sparse_accum["ids"], emb.weights]
        optimizers.append(CastedSparseEmbeddingSignSGD_Distributed(
            tensors, world_size=info.world_size, lr=cfg.puzzle_emb_lr, weight_decay=cfg.puzzle_emb_weight_decay))
        base_lrs.append(cfg.puzzle_emb_lr)
    optimizers.append(build_optimizer(head, cfg.optimizer.name, cfg.lr, (cfg.beta1, cfg.beta2),
                                      cfg.weight_decay, cfg.optimizer.kwargs))
    base_lrs.append(cfg.lr)
    return optimizers, base_lrs, sparse_accum


# ----------------------------------------------------------------------------------------------
# entry points


def user_errors() -> tuple[type, ...]:
    from utils.logger import MetricLogError
    return (ConfigError, ckpt.CheckpointError, TrainError, MetricLogError) + data_errors()


def launch(dict_cfg) -> dict:
    """Hydra task function: validate the composed config strictly, then train."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    raw = OmegaConf.to_container(dict_cfg, resolve=True)
    group, job, arch_choice = None, None, None
    try:
        hc = HydraConfig.get()
        arch_choice = hc.runtime.choices.get("arch")
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            group = "sweep-" + os.path.basename(os.path.normpath(hc.sweep.dir))
            job = hc.job.num
    except ValueError:
        pass
    try:
        cfg = build_config(raw)
        if job is not None:
            cfg = per_job_run_dir(cfg, job)
        group = cfg.wandb_group or group
        return train(cfg, group=group, arch_choice=arch_choice)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is intact (no partial files are left)", file=sys.stderr)
        sys.exit(130)
    finally:
        shutdown_distributed()


def per_job_run_dir(cfg: PretrainConfig, job: int) -> PretrainConfig:
    """A --multirun job with a fixed run_name/checkpoint_path gets its own dir (`-job<N>` suffix): the jobs
    would otherwise all share one dir, and job 2 would "resume" job 1 and do nothing."""
    changes = {}
    if cfg.run_name is not None:
        changes["run_name"] = f"{cfg.run_name}-job{job}"
    if cfg.checkpoint_path is not None:
        changes["checkpoint_path"] = f"{os.path.normpath(cfg.checkpoint_path)}-job{job}"
    return dataclasses.replace(cfg, **changes)


def main() -> None:
    import logging

    import hydra
    # Hydra's own logging config is off (no outputs/ dirs); library messages such as the AdamATan2 backend
    # choice still reach the console, from rank 0 only.
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(message)s")
    from utils.cli import preflight
    sys.argv = preflight(sys.argv, __doc__)  # a no-op when the script's first lines already checked this argv
    config_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
    hydra.main(config_path=config_dir, config_name="cfg_pretrain", version_base="1.3")(launch)()


if __name__ == "__main__":
    main()
