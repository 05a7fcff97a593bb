"""The evaluation loop shared by pretrain.py and evaluate.py, and the metric reduction rule.

Metrics from a loss head are 0-d tensor SUMS over rows (count, accuracy, exact_accuracy, steps, losses),
except keys containing "/" (`gate/L/mean`, `halt/...`), which are already MEANS: those are averaged over
calls and ranks here, before the head's `reduce_metrics` (or the original's rule) turns sums into means."""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from utils.distributed import DistInfo, all_gather_object, all_reduce_sum, broadcast_object
from utils.eval_metrics import wilson_interval
from utils.inference import (TALLY_KEYS, InferenceSettings, infer_batch, sample_generator, segment_flops_per_row,
                             supports_noise, supports_segments)
from utils.modeling import autocast_context
from utils.schema import ConfigError

BATCH_KEYS = ("inputs", "labels", "puzzle_identifiers")
SEGMENT_KEYS = ("segment_preds", "segment_steps")  # what save_segments adds to the outputs


def is_mean_key(key: str) -> bool:
    return "/" in key


def default_reduce_metrics(sums: dict[str, float], mode: str, global_batch_size: int) -> dict[str, float]:
    """The original rule. train: keys ending in `loss` / global batch, the rest / max(count, 1);
    eval: everything / max(count, 1). Mean-type keys pass through (already averaged)."""
    count = max(sums.get("count", 0.0), 1.0)
    out = {}
    for key, value in sums.items():
        if is_mean_key(key):
            out[key] = value
        elif mode == "train" and key.endswith("loss"):
            out[key] = value / global_batch_size
        else:
            out[key] = value / count
    if mode == "eval":
        out.pop("count", None)
    return out


def reduce_metrics(head: torch.nn.Module, sums: dict[str, float], mode: str, global_batch_size: int) -> dict[str, float]:
    hook = getattr(head, "reduce_metrics", None)
    if hook is not None:
        return hook(sums, mode, global_batch_size)
    return default_reduce_metrics(sums, mode, global_batch_size)


class MetricAccumulator:
    """Tensor sums of metric dicts; no host sync until `reduce()` (which every rank must call)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.calls = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        self.calls += 1
        for k, v in metrics.items():
            v = v.detach().to(torch.float64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def reduce(self, info: DistInfo) -> dict[str, float]:
        """Sum over ranks (one collective); mean-type keys averaged over calls and ranks. -> floats."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        stacked = torch.stack([self.sums[k] for k in keys])
        stacked = all_reduce_sum(stacked, info).cpu()
        out = {}
        for k, v in zip(keys, stacked.tolist()):
            out[k] = v / (max(self.calls, 1) * info.world_size) if is_mean_key(k) else v
        return out

    def reset(self) -> None:
        self.sums, self.calls = {}, 0


def _real_rows(effective: int, local_batch: int, rank: int) -> int:
    """Rows of this rank's slice that hold real (not padding) examples."""
    return int(min(max(effective - rank * local_batch, 0), local_batch))


@torch.inference_mode()
def evaluate(head: torch.nn.Module, loader, info: DistInfo, *, device: torch.device, mixed_precision: str = "none",
             max_batches: Optional[int] = None, save_keys: Iterable[str] = (), global_batch_size: int = 1,
             progress: bool = False, settings: Optional[InferenceSettings] = None,
             task: Optional[str] = None, save_segments: bool = False
             ) -> tuple[dict[str, float], Optional[dict[str, np.ndarray]]]:
    """Run the split once. Returns (flat `eval/...` metrics, outputs gathered on rank 0 or None).
    `save_keys` may name batch keys, output keys, and `preds` (argmax of the logits); padding rows are
    dropped from the outputs. ACT models run under `settings` (eval halting, K samples, noise; see
    utils/inference.py; default: every row for halt_max_steps segments, the original's eval); other
    heads run each batch until every row halted. `task` ('maze', 'arc', ...; utils.eval_metrics.
    dataset_task) switches on task metrics. `save_segments` adds SEGMENT_KEYS to the outputs: each
    segment's argmax [N, S, L] (a halted row repeats its answer) and the segment each row halted at [N]."""
    save_keys = list(save_keys) + [k for k in SEGMENT_KEYS if save_segments and k not in save_keys]
    settings = settings or InferenceSettings()
    segmented = check_inference_support(head, settings)
    model = getattr(head, "model", None)
    if save_segments and not segmented:
        raise ConfigError(f"{type(model or head).__name__} has no ACT segment protocol: eval_save_segments needs one "
                          "(see utils/inference.py)")
    generator = sample_generator(settings, info.rank, device)
    flops_per_segment = segment_flops_per_row(model) if segmented else None
    return_keys = sorted({("logits" if k == "preds" else k) for k in save_keys if k not in BATCH_KEYS})
    was_training = head.training
    head.eval()
    start_state = loader.state_dict()
    per_set: dict[str, MetricAccumulator] = {}
    collected: dict[str, list[np.ndarray]] = {k: [] for k in save_keys}
    bar = None
    if progress and info.is_main:
        from utils.progress import Progress
        total = len(loader) if hasattr(loader, "__len__") else None
        try:
            total = min(total, max_batches) if (total is not None and max_batches) else total
        except TypeError:
            total = None
        bar = Progress(total, desc="eval", unit="batch", leave=False)  # a bar, or a line every 30 s in logs
    try:
        for batch_index, (set_name, batch, effective) in enumerate(loader):
            if max_batches is not None and batch_index >= max_batches:
                break
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if segmented:
                with autocast_context(device, mixed_precision):
                    metrics, outputs = infer_batch(head, batch, settings, generator=generator, task=task,
                                                   capture_segments=save_segments)
            else:
                carry = head.initial_carry(batch)
                while True:
                    with autocast_context(device, mixed_precision):
                        carry, _, metrics, outputs, all_halted = head(return_keys=return_keys, carry=carry, batch=batch)
                    if bool(all_halted):  # eval is not the hot path: one sync per segment is fine
                        break
            per_set.setdefault(set_name, MetricAccumulator()).add(metrics)
            if save_keys:
                n = _real_rows(int(effective), next(iter(batch.values())).shape[0], info.rank)
                for k in save_keys:
                    if k in BATCH_KEYS:
                        value = batch[k]
                    elif k == "preds":
                        value = torch.argmax(outputs["logits"], dim=-1).to(torch.int32)
                    elif k == "segment_preds" and outputs["logits"].shape[-1] <= 256:
                        value = outputs[k].to(torch.uint8)  # [B, S, L]: 1 byte a token for every puzzle vocab
                    else:
                        value = outputs[k]
                    collected[k].append(value[:n].float().cpu().numpy() if value.dtype == torch.bfloat16
                                        else value[:n].cpu().numpy())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        loader.load_state_dict(start_state)  # the next evaluation starts from the beginning again
        head.train(was_training)

    # Every rank must take part in the same reductions in the same order.
    set_names = sorted(per_set)
    set_names = all_gather_object(set_names, info)[0] if info.distributed else set_names
    flat: dict[str, float] = {}
    total = MetricAccumulator()
    for name in set_names:
        acc = per_set.get(name, MetricAccumulator())
        sums = acc.reduce(info)
        for k, v in acc.sums.items():
            total.sums[k] = total.sums[k] + v if k in total.sums else v
        total.calls += acc.calls
        if len(set_names) > 1:
            for k, v in finish_eval_metrics(head, sums, global_batch_size, settings, flops_per_segment).items():
                flat[f"eval/{name}/{k}"] = v
    for k, v in finish_eval_metrics(head, total.reduce(info), global_batch_size, settings, flops_per_segment).items():
        flat[f"eval/{k}"] = v

    gathered = None
    if save_keys:
        local = {k: (np.concatenate(v) if v else np.zeros((0,))) for k, v in collected.items()}
        parts = all_gather_object(local, info) if info.distributed else [local]
        if info.is_main:
            gathered = _interleave_ranks(parts, save_keys)
    return flat, gathered


def check_inference_support(head: torch.nn.Module, settings: InferenceSettings) -> bool:
    """Whether the head runs ACT segments (utils/inference.py); a ConfigError if `settings` ask for what it
    cannot do (pretrain.py calls this before training, so a bad combination never waits for the first eval)."""
    model = getattr(head, "model", None)
    segmented = model is not None and hasattr(head, "score") and supports_segments(model)
    if not segmented and not (settings.deterministic and settings.halting == "all" and settings.max_segments is None):
        raise ConfigError(f"{type(model or head).__name__} does not support eval_halting/eval_max_segments/"
                          "eval_samples/eval_noise_std (no ACT segment protocol; see utils/inference.py)")
    if settings.noise_std > 0 and not supports_noise(model):
        raise ConfigError(f"{type(model).__name__} has no recursion step hook: eval_noise_std must be 0")
    return segmented


def finish_eval_metrics(head: torch.nn.Module, sums: dict[str, float], global_batch_size: int,
                        settings: InferenceSettings, flops_per_segment: Optional[float]) -> dict[str, float]:
    """Reduced metrics plus 95 % Wilson intervals (`<metric>_ci_low/high`) of every per-puzzle success rate
    and of token accuracy (over labelled tokens, taken as independent: too narrow where a model's errors
    cluster in some puzzles), the mean segments per trajectory, FLOPs per puzzle (all K trajectories,
    forward only) and K."""
    sums = dict(sums)
    tallies = {k: sums.pop(k) for k in TALLY_KEYS if k in sums}
    out = reduce_metrics(head, sums, "eval", global_batch_size)
    count = sums.get("count")
    if count is None:
        return out
    for key in ("exact_accuracy", "maze_optimal_path", "oracle_exact_accuracy"):
        if key in sums:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = wilson_interval(sums[key], count)
    if "tokens" in tallies:
        out["accuracy_ci_low"], out["accuracy_ci_high"] = wilson_interval(tallies["tokens_correct"], tallies["tokens"])
    if "segments" in tallies:
        per_puzzle = tallies["segments"] / max(count, 1.0)
        out["segments_mean"] = per_puzzle / settings.samples
        out["samples"] = float(settings.samples)
        if flops_per_segment is not None:
            out["flops_per_puzzle"] = per_puzzle * flops_per_segment
    return out


def score_arc(outputs: Optional[dict[str, np.ndarray]], data_path: str, info: DistInfo):
    """ARC pass@1/2/10 (vote over augmentations, utils/arc_scoring.py) of gathered eval outputs, for
    pretrain.py's evals and evaluate.py alike. Every rank calls it; rank 0 scores and shares the numbers.
    -> ({`arc/pass@K`: ..., `arc/num_tasks`: ...}, the voted tasks on rank 0 else None)."""
    from utils import arc_scoring
    tasks, metrics = None, None
    if info.is_main and outputs:
        tasks = arc_scoring.vote(outputs["inputs"], outputs["labels"], outputs["preds"], outputs["puzzle_identifiers"],
                                 outputs["q_halt_logits"], arc_scoring.load_identifiers(data_path))
        metrics = {f"arc/{k}": v for k, v in arc_scoring.pass_at_k(tasks).items()}
    return broadcast_object(metrics, info) or {}, tasks


ARC_KEYS = ("inputs", "labels", "puzzle_identifiers", "preds", "q_halt_logits")


def _interleave_ranks(parts: list[dict[str, np.ndarray]], keys: list[str]) -> dict[str, np.ndarray]:
    """Per-rank outputs -> dataset order. Ranks hold consecutive slices of every global batch, so the
    concatenation by rank is a permutation of dataset order; puzzle order is restored by the caller
    where it matters (ARC voting does not depend on order)."""
    return {k: np.concatenate([p[k] for p in parts]) if parts and len(parts[0][k]) else np.zeros((0,)) for k in keys}


def output_row_order(set_sizes: int | list[int], global_batch_size: int, world_size: int,
                     max_batches: Optional[int] = None) -> np.ndarray:
    """Dataset row (counted across the split's sets in order) of each row of the gathered test-mode outputs,
    which `_interleave_ranks` concatenates rank-major: rank r held rows [s + r*B, s + (r+1)*B) of every
    batch starting at s, batches running set by set (a set's last batch may be short)."""
    B = global_batch_size // world_size
    sizes = [set_sizes] if isinstance(set_sizes, int) else list(set_sizes)
    batches, offset = [], 0
    for n in sizes:
        batches += [(offset + s, offset + min(s + global_batch_size, n)) for s in range(0, n, global_batch_size)]
        offset += n
    batches = batches[:max_batches] if max_batches is not None else batches
    parts = [np.arange(min(s + r * B, e), min(s + (r + 1) * B, e)) for r in range(world_size) for s, e in batches]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
