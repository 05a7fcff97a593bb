"""Inference for ACT models at evaluation: eval halting, K noisy trajectories per puzzle, and the choice
of one answer among them. Used by utils/evaluation.py (pretrain.py and evaluate.py) and solve.py.

    rows:     a batch of B puzzles becomes B*K rows, row i*K + k = sample k of puzzle i (batched, no
              Python loop over samples);
    segments: every row runs ACT segments until its halt criterion holds (eval_halting=q, the arch's own
              rule) or the budget ends (eval_max_segments, default arch.halt_max_steps); halted rows LEAVE
              the batch, so the next segment is computed on the remaining rows only;
    noise:    with eval_noise_std = sigma > 0, every recursion step adds sigma * RMS(z) * N(0, 1) to the
              updated latent state (RMS over the hidden axis, per token), drawn from one explicit
              torch.Generator;
    choice:   q          the trajectory with the highest sigmoid(q_halt) at its last segment;
              first_halt the trajectory that halted at the earliest segment (ties: highest q);
              vote       the answer most trajectories agree on (ties: highest mean q of its voters).

With K = 1, sigma = 0 and eval_halting=all this runs exactly the calls of the ACT wrapper's own eval
loop on the same tensors, so the result is bit for bit the deterministic evaluation.

The model side of the protocol (what an ACT wrapper offers): `config.halt_max_steps`, `inner.empty_carry`,
`inner.reset_carry`, `inner(carry, data)` -> (carry, logits, (q_halt, q_continue), stats), its halting
rule `q_halts(q_halt, q_continue)` (the one training uses), optionally `segment_flops(rows)` and a `hook=` argument of the inner forward, the per-recursion-step
hook of models/recursion.py (for noise)."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dataset.common import IGNORE_LABEL_ID

HALTING = ("all", "q")
SELECTORS = ("q", "first_halt", "vote")


@dataclass(frozen=True)
class InferenceSettings:
    halting: str = "all"                 # eval_halting
    max_segments: Optional[int] = None   # eval_max_segments; None = arch.halt_max_steps
    samples: int = 1                     # eval_samples (K)
    noise_std: float = 0.0               # eval_noise_std (sigma, relative to the state's RMS)
    select: str = "q"                    # eval_select
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "InferenceSettings":
        return cls(halting=cfg.eval_halting, max_segments=cfg.eval_max_segments, samples=cfg.eval_samples,
                   noise_std=cfg.eval_noise_std, select=cfg.eval_select, seed=cfg.seed)

    @property
    def deterministic(self) -> bool:
        return self.samples == 1 and self.noise_std == 0


def supports_segments(model: torch.nn.Module) -> bool:
    inner = getattr(model, "inner", None)
    return inner is not None and hasattr(inner, "empty_carry") and hasattr(inner, "reset_carry") \
        and hasattr(getattr(model, "config", None), "halt_max_steps")


def supports_noise(model: torch.nn.Module) -> bool:
    return "hook" in inspect.signature(model.inner.forward).parameters


def halt_criterion(model: torch.nn.Module, q_halt: torch.Tensor, q_continue: torch.Tensor) -> torch.Tensor:
    """The arch's own halting rule (bool [B]), `model.q_halts`; HRM's (the default) is q_halt > q_continue,
    TRM's q_halt > 0 with no_ACT_continue."""
    rule = getattr(model, "q_halts", None)
    return rule(q_halt, q_continue) if rule is not None else q_halt > q_continue


def noise_hook(std: float, generator: torch.Generator) -> Callable:
    """A models/recursion.py step hook: (step, z) -> z + std * RMS(z) * eps, eps ~ N(0, 1) drawn from
    `generator` (fp32 math), after every L and H update."""
    def hook(_step, z: torch.Tensor) -> torch.Tensor:
        zf = z.float()
        rms = zf.pow(2).mean(-1, keepdim=True).sqrt()
        eps = torch.randn(z.shape, generator=generator, device=generator.device, dtype=torch.float32).to(z.device)
        return (zf + std * rms * eps).to(z.dtype)
    return hook


def _index_carry(carry, index: torch.Tensor):
    return dataclasses.replace(carry, **{f.name: getattr(carry, f.name)[index] for f in dataclasses.fields(carry)})


@dataclass
class Trajectories:
    """Per row (B*K rows), everything at the row's last segment."""
    logits: torch.Tensor       # [R, L, V]
    q_halt: torch.Tensor       # [R] fp32
    q_continue: torch.Tensor   # [R] fp32
    steps: torch.Tensor        # [R] int32, segments run
    stats: dict                # the last inner call's extra outputs (gate statistics)
    segment_preds: Optional[torch.Tensor] = None  # [R, T, L] argmax after each segment (last one repeated)


def run_trajectories(model: torch.nn.Module, data: dict[str, torch.Tensor], *, max_segments: int, halting: str,
                     hook: Optional[Callable] = None, capture_segments: bool = False) -> Trajectories:
    """Run every row until it halts; rows that halted are dropped from the next segment's batch."""
    rows = data["inputs"].shape[0]
    device = data["inputs"].device
    inner = model.inner
    carry = inner.reset_carry(torch.ones(rows, dtype=torch.bool, device=device),
                              inner.empty_carry(rows, device=device))
    kwargs = {"hook": hook} if hook is not None else {}
    active = None  # None: every row (no gather, identical tensors to the wrapper's loop)
    sub = data
    logits = q_halt = q_continue = None
    steps = torch.zeros(rows, dtype=torch.int32, device=device)
    seg_preds = []
    stats: dict = {}
    for segment in range(1, max_segments + 1):
        carry, seg_logits, (qh, qc), stats = inner(carry, sub, **kwargs)
        if logits is None:  # the first segment covers every row
            logits, q_halt, q_continue = seg_logits, qh, qc
        else:
            logits[active], q_halt[active], q_continue[active] = seg_logits, qh, qc
        if active is None:
            steps += 1
        else:
            steps[active] += 1
        if capture_segments:
            seg_preds.append(torch.argmax(logits, dim=-1).to(torch.int32))
        if segment == max_segments:
            break
        if halting == "q":
            keep = ~halt_criterion(model, qh, qc)
            n_keep = int(keep.sum())  # one host sync per segment: eval is not the hot path
            if n_keep == 0:
                break
            if n_keep < keep.shape[0]:
                idx = keep.nonzero().squeeze(-1)
                active = idx if active is None else active[idx]
                carry = _index_carry(carry, idx)
                sub = {k: v[active] for k, v in data.items()}
    if capture_segments:
        while len(seg_preds) < max_segments:  # halted rows keep their last answer
            seg_preds.append(seg_preds[-1])
    return Trajectories(logits=logits, q_halt=q_halt, q_continue=q_continue, steps=steps, stats=stats,
                        segment_preds=torch.stack(seg_preds, dim=1) if capture_segments else None)


def select_trajectories(preds: torch.Tensor, q_halt: torch.Tensor, steps: torch.Tensor, samples: int,
                        rule: str) -> torch.Tensor:
    """Index [B] of the chosen row (in 0..B*K-1) for each puzzle. preds [B*K, L] (answers as tokens),
    q_halt [B*K], steps [B*K]; row i*K + k is sample k of puzzle i. Scores are exact lexicographic
    keys: an integer part (votes, -segments) plus a tie-break in [0, 0.5)."""
    K = samples
    B = preds.shape[0] // K
    conf = torch.sigmoid(q_halt.double()).view(B, K)
    if rule == "q":
        score = conf
    elif rule == "first_halt":
        score = -steps.view(B, K).double() + 0.5 * conf
    elif rule == "vote":
        p = preds.view(B, K, -1)
        votes = torch.zeros(B, K, dtype=torch.float64, device=preds.device)
        conf_sum = torch.zeros_like(votes)
        for k in range(K):  # K comparisons of [B, K, L], not K evaluations
            same = (p == p[:, k:k + 1]).all(-1)  # [B, K]: which samples agree with sample k
            votes[:, k] = same.sum(-1)
            conf_sum[:, k] = (same * conf).sum(-1)
        score = votes + 0.5 * conf_sum / votes
    else:
        raise ValueError(f"unknown selector {rule!r}; expected one of {', '.join(SELECTORS)}")
    return torch.arange(B, device=preds.device) * K + score.argmax(-1)


def repeat_rows(batch: dict[str, torch.Tensor], samples: int) -> dict[str, torch.Tensor]:
    if samples == 1:
        return batch
    return {k: v.repeat_interleave(samples, dim=0) for k, v in batch.items()}


def sample_generator(settings: InferenceSettings, rank: int, device: torch.device) -> Optional[torch.Generator]:
    """The explicit generator of the trajectory noise, seeded from (seed, rank); None without noise."""
    if settings.noise_std == 0:
        return None
    from utils.modeling import derive_seed
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(settings.seed, rank, 0x5A3E))
    return gen


def segment_flops_per_row(model: torch.nn.Module) -> Optional[float]:
    """Forward FLOPs of one ACT segment for one row, from the model's own estimate (matmuls and attention,
    the convention of the training MFU figure); None if the model has none."""
    estimate = getattr(model, "segment_flops", None)
    return float(estimate(1)) if estimate is not None else None

# Sums that the evaluation turns into derived metrics itself (they are not means over puzzles).
TALLY_KEYS = ("segments", "tokens", "tokens_correct")


def infer_batch(head: torch.nn.Module, batch: dict[str, torch.Tensor], settings: InferenceSettings, *,
                generator: Optional[torch.Generator] = None, task: Optional[str] = None,
                capture_segments: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One eval batch under `settings` -> (metric sums over the puzzles, outputs of the chosen trajectory
    per puzzle: logits, q_halt_logits, q_continue_logits, steps[, segment_preds]). The metrics are the
    loss head's (`head.score`) on each chosen answer, plus the TALLY_KEYS, `oracle_exact_accuracy`
    (any of the K answers right; K > 1) and `maze_optimal_path` (task == 'maze')."""
    model = head.model
    K = settings.samples
    rows = repeat_rows(batch, K)
    hook = noise_hook(settings.noise_std, generator) if settings.noise_std > 0 else None
    traj = run_trajectories(model, rows, max_segments=settings.max_segments or model.config.halt_max_steps,
                            halting=settings.halting, hook=hook, capture_segments=capture_segments)
    labels = batch["labels"]
    chosen = None
    if K > 1:
        chosen = select_trajectories(torch.argmax(traj.logits, dim=-1), traj.q_halt, traj.steps, K, settings.select)
    pick = (lambda t: t) if chosen is None else (lambda t: t[chosen])
    outputs = {"logits": pick(traj.logits), "q_halt_logits": pick(traj.q_halt),
               "q_continue_logits": pick(traj.q_continue), "steps": pick(traj.steps)}
    if capture_segments:  # each segment's answer [B, T, L] and the 1-based segment the row halted at
        outputs["segment_preds"] = pick(traj.segment_preds)
        outputs["segment_steps"] = outputs["steps"]
    everyone = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    metrics, _, _ = head.score(labels, outputs, outputs["steps"], everyone)
    metrics.update({k: v for k, v in traj.stats.items() if k.startswith("gate/")})

    mask = labels != IGNORE_LABEL_ID
    valid = mask.any(-1)  # puzzles with labels (padding rows have none)
    preds = torch.argmax(outputs["logits"], dim=-1)
    metrics["tokens"] = mask.sum()
    metrics["tokens_correct"] = (mask & (preds == labels)).sum()
    metrics["segments"] = torch.where(valid.repeat_interleave(K), traj.steps, 0).sum()
    if K > 1:
        all_preds = torch.argmax(traj.logits, dim=-1).view(-1, K, labels.shape[-1])
        right = ((all_preds == labels[:, None]) | ~mask[:, None]).all(-1).any(-1)
        metrics["oracle_exact_accuracy"] = (valid & right).sum()
    if task == "maze":
        from utils.eval_metrics import maze_optimal_path
        ok = maze_optimal_path(batch["inputs"].cpu().numpy(), preds.cpu().numpy())
        metrics["maze_optimal_path"] = (valid & torch.from_numpy(ok).to(valid.device)).sum()
    return metrics, outputs
