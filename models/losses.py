"""Losses of the original HRM and the ACT loss head (`losses@ACTLossHead`).

The head returns the original's normalisation: `loss` is a SUM over the local rows of each row's
mean token loss (plus 0.5 x the Q losses, also summed); the trainer scales it by 1/global_batch_size.
Metrics are 0-d tensor SUMS over the rows that halted this step with at least one label, except
the `gate/...` statistics, which are already means.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.schema import ConfigError

IGNORE_LABEL_ID = -100


def _stablemax_s(x: torch.Tensor, epsilon: float = 1e-30) -> torch.Tensor:
    # s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0: a softmax substitute that grows linearly,
    # not exponentially (avoids the "softmax collapse" the HRM authors cite).
    return torch.where(x < 0, 1 / (1 - x + epsilon), x + 1)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    s_x = _stablemax_s(x)
    return torch.log(s_x / torch.sum(s_x, dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID):
    """Per-token CE under stablemax, in float64 (as the original); 0 where the label is ignored."""
    logprobs = log_stablemax(logits.to(torch.float64), dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).to(torch.long)
    picked = torch.gather(logprobs, index=safe_labels.unsqueeze(-1), dim=-1).squeeze(-1)
    return -torch.where(valid, picked, 0)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_LABEL_ID):
    """Per-token CE under softmax in float32; 0 where the label is ignored."""
    return F.cross_entropy(logits.to(torch.float32).view(-1, logits.shape[-1]), labels.to(torch.long).view(-1),
                           ignore_index=ignore_index, reduction="none").view(labels.shape)


LOSS_FUNCTIONS = {"stablemax_cross_entropy": stablemax_cross_entropy,
                  "softmax_cross_entropy": softmax_cross_entropy}


class ACTLossHead(nn.Module):
    def __init__(self, model: nn.Module, loss_type: str):
        super().__init__()
        if loss_type not in LOSS_FUNCTIONS:
            raise ConfigError(f"config key 'arch.loss.loss_type' expects one of {', '.join(LOSS_FUNCTIONS)}, "
                              f"got {loss_type!r}")
        self.model = model
        self.loss_type = loss_type
        self.loss_fn = LOSS_FUNCTIONS[loss_type]

    def initial_carry(self, *args, **kwargs):
        return self.model.initial_carry(*args, **kwargs)

    def score(self, labels: torch.Tensor, outputs: dict[str, torch.Tensor], steps: torch.Tensor,
              halted: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(metrics over the halted rows, lm_loss, q_halt_loss) of one segment's outputs; the losses keep
        their graph. Also called by the evaluation on each row's last segment (utils/inference.py)."""
        logits = outputs["logits"]
        with torch.no_grad():
            mask = labels != IGNORE_LABEL_ID
            loss_counts = mask.sum(-1)
            loss_divisor = loss_counts.clamp_min(1).unsqueeze(-1)  # [B, 1]
            is_correct = mask & (torch.argmax(logits, dim=-1) == labels)
            seq_is_correct = is_correct.sum(-1) == loss_counts  # all-ignored rows count as correct
            valid = halted & (loss_counts > 0)
            metrics = {
                "count": valid.sum(),
                "accuracy": torch.where(valid, (is_correct.to(torch.float32) / loss_divisor).sum(-1), 0).sum(),
                "exact_accuracy": (valid & seq_is_correct).sum(),
                "q_halt_accuracy": (valid & ((outputs["q_halt_logits"] >= 0) == seq_is_correct)).sum(),
                "steps": torch.where(valid, steps, 0).sum(),
            }

        # Every row contributes at every segment (deep supervision), not only halted rows.
        lm_loss = (self.loss_fn(logits, labels, ignore_index=IGNORE_LABEL_ID) / loss_divisor).sum()
        q_halt_loss = F.binary_cross_entropy_with_logits(
            outputs["q_halt_logits"], seq_is_correct.to(outputs["q_halt_logits"].dtype), reduction="sum")
        metrics["lm_loss"] = lm_loss.detach()
        metrics["q_halt_loss"] = q_halt_loss.detach()
        return metrics, lm_loss, q_halt_loss

    def forward(self, return_keys: Sequence[str], **model_kwargs):
        new_carry, outputs = self.model(**model_kwargs)
        metrics, lm_loss, q_halt_loss = self.score(new_carry.current_data["labels"], outputs, new_carry.steps,
                                                   new_carry.halted)

        q_continue_loss = 0
        if "target_q_continue" in outputs:
            q_continue_loss = F.binary_cross_entropy_with_logits(
                outputs["q_continue_logits"], outputs["target_q_continue"], reduction="sum")
            metrics["q_continue_loss"] = q_continue_loss.detach()

        for key, value in outputs.items():
            if key.startswith("gate/"):
                metrics[key] = value.detach()

        detached_outputs = {k: outputs[k].detach() for k in return_keys if k in outputs}
        return new_carry, lm_loss + 0.5 * (q_halt_loss + q_continue_loss), metrics, detached_outputs, \
            new_carry.halted.all()
