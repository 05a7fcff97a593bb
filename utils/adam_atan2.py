"""AdamATan2 in pure PyTorch, with exactly the update of the `adam-atan2` 0.0.3 CUDA package that the
original HRM trains with (that package has no CPU path and often fails to build).

Per step, per parameter (no epsilon; atan2 bounds the update to +-pi/2 * lr / (1 - b1^t)):
    t += 1
    p *= 1 - lr * wd                              (decoupled weight decay)
    m += (1 - b1) * (g - m)
    v += (1 - b2) * (g^2 - v)
    p -= lr / (1 - b1^t) * atan2(m, sqrt(v) / sqrt(1 - b2^t))

Note: lucidrains' `adam-atan2-pytorch` is a different update (scale a=1.27, both corrections inside).
"""
from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
from torch.optim import Optimizer

log = logging.getLogger(__name__)


class AdamATan2(Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            wd = group["weight_decay"]
            # Tensors are bucketed by (step count, device, dtype) so each bucket is one set of
            # foreach kernels; normally there is a single bucket.
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamATan2 does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)  # CPU scalar: reading it is no device sync
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                key = (float(state["step"]), p.device, p.dtype)
                buckets.setdefault(key, []).append((p, p.grad, state["exp_avg"], state["exp_avg_sq"]))

            for (t, _, _), items in buckets.items():
                params, grads, exp_avgs, exp_avg_sqs = (list(x) for x in zip(*items))
                if wd != 0.0:
                    torch._foreach_mul_(params, 1.0 - lr * wd)
                # Both moments in the package's lerp form: x += (1 - beta) * (target - x).
                torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
                torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)

                step_size = lr / (1.0 - beta1 ** t)
                denoms = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denoms, math.sqrt(1.0 - beta2 ** t))
                # No foreach atan2 in torch: one kernel per tensor, written into the denominators.
                for m, d in zip(exp_avgs, denoms):
                    torch.atan2(m, d, out=d)
                torch._foreach_add_(params, denoms, alpha=-step_size)
        return loss


def _cuda_adam_atan2_class():
    try:
        from adam_atan2 import AdamATan2 as CudaAdamATan2  # type: ignore
        return CudaAdamATan2
    except Exception:  # the package imports its compiled backend at import time; any failure means unusable
        return None


def make_adam_atan2(params: Iterable, backend: str = "auto", **kwargs) -> Optimizer:
    """AdamATan2 from the CUDA package (`backend="cuda"`), ours (`"torch"`), or the CUDA one when it
    is importable and the parameters are on CUDA (`"auto"`). Logs the choice."""
    if backend not in ("auto", "cuda", "torch"):
        raise ValueError(f"AdamATan2 backend must be 'auto', 'cuda' or 'torch', got {backend!r}")
    params = list(params)
    cuda_cls = _cuda_adam_atan2_class() if backend in ("auto", "cuda") else None
    if backend == "cuda" and cuda_cls is None:
        raise RuntimeError("AdamATan2 backend 'cuda' requested but the adam_atan2 package (with its CUDA "
                           "extension) is not importable; use backend 'torch'")

    def on_cuda(ps):
        for p in ps:
            if isinstance(p, dict):
                if not on_cuda(p["params"]):
                    return False
            elif not p.is_cuda:
                return False
        return len(ps) > 0

    if cuda_cls is not None and (backend == "cuda" or on_cuda(params)):
        log.info("AdamATan2 backend: cuda (adam_atan2 package)")
        return cuda_cls(params, **kwargs)
    log.info("AdamATan2 backend: torch (pure PyTorch foreach)%s",
             "" if backend == "torch" else " - adam_atan2 CUDA package not importable or params not on CUDA")
    return AdamATan2(params, **kwargs)
