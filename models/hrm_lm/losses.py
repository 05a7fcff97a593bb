"""Loss head for the language models (the hybrid HRM LM, and the plain arch=lm_transformer baseline, whose
outputs are only `logits`: it gets the same token loss and metrics, without the hybrid's segment, halting,
gate and MoE terms), with the trainer's loss-head API (see models/losses.py for the puzzle one):
initial_carry(batch), forward(return_keys, carry, batch) -> (new_carry, loss, metrics, outputs, all_halted),
plus the optional hooks on_train_step and reduce_metrics.

All segments run inside one call (deep supervision), so the carry is trivial and all_halted is True.

loss (training) = sum over rows of
      w_S * token_loss(final segment) + sum_{s < S} w_s * token_loss(segment s)
          (w = arch.ds_segment_weights, default [ds_weight] * (S - 1) + [1]; gate_mode=off: one pass, w = 1)
    + halting_weight * mean_gate * halt_loss
    + moe_aux_loss_weight * moe_aux            (a batch quantity, counted once per row)
where token_loss is the row's mean over its valid tokens (cross_entropy), or, for a pytorch_optimizer loss,
that loss on the batch's flattened valid tokens, and halt_loss is, per row,
    halt_objective=improvement: sum_{s<S} BCE(p_s, [CE_s - CE_{s+1} < halt_tolerance])  (CE_s: the row's
        mean decoder cross-entropy after segment s; "one more segment would not help" -> halt)
    halt_objective=sum_target:  (sum_s p_s - halting_target)^2   (the seed's regularizer)
mean_gate is detached: the halting loss should not close the gate; it also silences halting while the
gate is closed, when every segment decodes identically and the targets carry no information. The trainer multiplies by 1/global_batch_size, giving the batch mean.
gate_mode=off runs no core: no halting loss, and the halt/ metrics are 0.

Metrics are sums over rows (count, lm_loss, accuracy, ...) or over tokens (ce_sum, num_tokens), so they
add up across batches and ranks; reduce_metrics turns them into means, ce and ppl. Keys with a "/"
(gate/*, halt/*, moe/*) are batch means already; the trainer averages those over batches and ranks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.schema import ConfigError

IGNORE_LABEL_ID = -100

# pytorch_optimizer losses that want one-hot float targets instead of class ids.
_PROBE_CLASSES = 5


def _resolve_loss(loss_name: str, loss_kwargs: dict):
    """-> None for built-in cross_entropy, else (module, one_hot: bool) for a pytorch_optimizer loss, checked
    on a tiny probe so an incompatible loss fails at construction with one line, not mid-training."""
    if loss_name == "cross_entropy":
        if loss_kwargs:
            unknown = set(loss_kwargs) - {"label_smoothing"}
            if unknown:
                raise ConfigError(f"config key 'arch.loss.loss_kwargs.{sorted(unknown)[0]}' is not an argument of "
                                  "cross_entropy (allowed: label_smoothing)")
        return None
    from pytorch_optimizer.loss import LOSS_FUNCTIONS

    key = loss_name.lower()
    if key not in LOSS_FUNCTIONS:
        raise ConfigError(f"config key 'arch.loss.loss_name': unknown loss '{loss_name}'; choose cross_entropy or one "
                          f"of {', '.join(sorted(LOSS_FUNCTIONS))}")
    try:
        fn = LOSS_FUNCTIONS[key](**loss_kwargs)
    except TypeError as e:
        raise ConfigError(f"config key 'arch.loss.loss_kwargs' does not fit loss '{loss_name}': {e}") from None
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, _PROBE_CLASSES, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    for one_hot in (False, True):
        target = F.one_hot(labels, _PROBE_CLASSES).float() if one_hot else labels
        try:
            out = fn(logits, target)
        except Exception:  # noqa: BLE001 - any failure means "this target form does not work"
            continue
        if out.dim() == 0 and torch.isfinite(out):
            return fn, one_hot
    raise ConfigError(f"config key 'arch.loss.loss_name': loss '{loss_name}' does not accept token logits [N, V] with "
                      "class targets [N] or one-hot targets [N, V]")


class LMLossHead(nn.Module):
    def __init__(self, model: nn.Module, loss_name: str = "cross_entropy", loss_kwargs: dict | None = None):
        super().__init__()
        self.model = model
        self.loss_name = loss_name
        self.loss_kwargs = dict(loss_kwargs or {})
        resolved = _resolve_loss(loss_name, self.loss_kwargs)
        self.custom_loss = None if resolved is None else resolved[0]
        self.custom_one_hot = False if resolved is None else resolved[1]

    # ---- trainer hooks --------------------------------------------------------------------------
    def initial_carry(self, batch: dict):
        return {}

    def on_train_step(self, step: int) -> None:
        """Called by the trainer before each optimizer step: gate warmup / ramp (hybrid only)."""
        if hasattr(self.model, "set_gate_schedule"):
            self.model.set_gate_schedule(step)

    @staticmethod
    def reduce_metrics(sums: dict, mode: str, global_batch_size: int) -> dict:
        count = max(sums.get("count", 0.0), 1.0)
        out = {}
        for key, value in sums.items():
            if key == "count":
                continue
            if "/" in key:
                out[key] = value  # gate/, halt/, moe/: batch means already (the trainer averages them)
            elif key in ("ce_sum", "num_tokens"):
                continue
            elif key == "target_nats":
                out[key] = value  # a total over the split (utils/lm_eval.py turns it into bits per character)
            elif mode == "train" and key.endswith("loss"):
                out[key] = value / global_batch_size
            else:
                out[key] = value / count
        if sums.get("num_tokens", 0) > 0:
            ce = sums["ce_sum"] / sums["num_tokens"]
            out["ce"] = ce
            out["ppl"] = math.exp(min(ce, 50.0))
        if "num_tokens" in sums:
            out["num_tokens"] = sums["num_tokens"]
        return out

    # ---- loss -----------------------------------------------------------------------------------
    def token_loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, divisor: torch.Tensor):
        """-> (per-row loss [B] whose sum is this segment's contribution, per-token true CE [B, Lt] for the
        ce/ppl metrics, i.e. without label smoothing)."""
        V = logits.shape[-1]
        flat_logits, flat_labels = logits.reshape(-1, V), labels.reshape(-1)
        ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_LABEL_ID, reduction="none").view(labels.shape)
        if self.custom_loss is None:
            smoothing = self.loss_kwargs.get("label_smoothing", 0.0)
            tok = ce if not smoothing else F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_LABEL_ID,
                                                           reduction="none", label_smoothing=smoothing).view(labels.shape)
            return tok.sum(-1) / divisor, ce
        # pytorch_optimizer losses reduce over all tokens: flatten, drop -100 (a boolean gather; fine
        # outside CUDA graphs), spread the scalar evenly over rows so the row sum is B * loss.
        flat_mask = mask.reshape(-1)
        sel_logits = logits.reshape(-1, V)[flat_mask]
        sel_labels = labels.reshape(-1)[flat_mask]
        target = F.one_hot(sel_labels, V).float() if self.custom_one_hot else sel_labels
        value = self.custom_loss(sel_logits, target)
        return value.expand(labels.shape[0]), ce

    def forward(self, return_keys=(), carry=None, batch: dict | None = None, **_):
        cfg = self.model.config
        labels = batch["labels"].long()
        out = self.model(encoder_ids=batch["encoder_ids"], encoder_mask=batch["encoder_mask"],
                         decoder_input_ids=batch["decoder_input_ids"], decoder_mask=batch.get("decoder_mask"))
        mask = labels != IGNORE_LABEL_ID
        counts = mask.sum(-1)
        divisor = counts.clamp_min(1).to(torch.float32)
        valid_row = counts > 0

        final_rows, ce = self.token_loss(out["logits"], labels, mask, divisor)
        lm_loss = final_rows.sum()
        loss = lm_loss
        metrics = {}
        hybrid = "halt_probs" in out  # the HRM LM; a plain LM (lm_transformer) returns logits only
        if self.training and hybrid and self.model.core_enabled:
            weights = self.model.segment_loss_weights()
            loss = weights[-1] * lm_loss
            earlier = [(w, lg) for w, lg in zip(weights[:-1], out["segment_logits"][:-1]) if w > 0]
            if earlier:
                ds_loss = sum(w * self.token_loss(lg, labels, mask, divisor)[0].sum() for w, lg in earlier)
                loss = loss + ds_loss
                metrics["ds_loss"] = ds_loss.detach()  # weighted, as it enters the loss
            if cfg.halt_objective == "sum_target":
                halt_sum = out["halt_probs"].sum(-1)  # [B]
                halt_loss = ((halt_sum - cfg.halting_target).square() * valid_row).sum()
            else:
                with torch.no_grad():
                    seg_ce = torch.stack([F.cross_entropy(lg.transpose(1, 2), labels, ignore_index=IGNORE_LABEL_ID,
                                                          reduction="none").sum(-1) / divisor
                                          for lg in out["segment_logits"]], 1)  # [B, S]
                    halt_target = (seg_ce[:, :-1] - seg_ce[:, 1:] < cfg.halt_tolerance).float()
                p = out["halt_probs"][:, :-1].clamp(1e-6, 1 - 1e-6)
                halt_loss = (F.binary_cross_entropy(p, halt_target, reduction="none").sum(-1) * valid_row).sum()
                if halt_target.numel():
                    metrics["halt/target_frac"] = (halt_target.mean(-1) * valid_row).sum() / valid_row.sum().clamp_min(1)
            loss = loss + cfg.halting_weight * out["gate/mean"].detach() * halt_loss
            metrics["halt_loss"] = halt_loss.detach()
        if self.training and hybrid and cfg.encoder_ffn == "moe":
            loss = loss + cfg.moe_aux_loss_weight * out["moe_aux"] * labels.shape[0]

        with torch.no_grad():
            token_correct = (out["logits"].argmax(-1) == labels) & mask
            v = valid_row.to(torch.float32)
            n_rows = v.sum().clamp_min(1.0)
            metrics.update({
                "count": v.sum(),
                "lm_loss": (final_rows.detach() * v).sum(),
                "ce_sum": ce.detach().sum(),
                "num_tokens": mask.sum().to(torch.float32),
                "accuracy": (token_correct.sum(-1) / divisor * v).sum(),
                "exact_accuracy": ((token_correct.sum(-1) == counts) & valid_row).sum().to(torch.float32),
                # nats of the target text, EOS excluded (it is no character): bits per character's numerator
                **({} if self.training else {"target_nats": (ce.detach() * (mask & (labels != cfg.eos_id))).sum()}),
            })
            if hybrid:
                metrics.update({
                    "halt/sum_p": (out["halt_probs"].sum(-1) * v).sum() / n_rows,
                    "halt/steps": (out["steps"].to(torch.float32) * v).sum() / n_rows,
                    "gate/mean": out["gate/mean"].detach(),
                    "gate/min": out["gate/min"].detach(),
                    "gate/max": out["gate/max"].detach(),
                    "gate/saturation": out["gate/saturation"].detach(),
                    "gate/scale": self.model.gate_scale.detach().float(),
                })
                if cfg.encoder_ffn == "moe":
                    metrics["moe/aux"] = out["moe_aux"].detach()
                    metrics["moe/drop_frac"] = out["moe_drop"].detach()

        outputs = {k: out[k].detach() for k in return_keys if k in out and torch.is_tensor(out[k])}
        for k in return_keys:
            if k in batch and k not in outputs:
                outputs[k] = batch[k]
        all_halted = torch.ones((), dtype=torch.bool, device=labels.device)
        return {}, loss, metrics, outputs, all_halted
