"""Per-puzzle embeddings updated sparsely, as in the original HRM.

The table is a *buffer* (not a parameter): the dense optimizer and the dense all-reduce never see
it, which matters for ARC where it is ~1M x 512 fp32. In training, the rows of the current batch
are copied into a batch-local leaf tensor `local_weights` that receives the gradient; the
sign-SGD optimizer below then all-gathers (ids, grads) from every rank, sums duplicate ids and
updates only the touched rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from models.common import trunc_normal_init_


class CastedSparseEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, batch_size: int, init_std: float,
                 cast_to: torch.dtype, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.cast_to = cast_to
        # Persistent: this is the learned table, saved in checkpoints as `...puzzle_emb.weights`.
        self.register_buffer(
            "weights", trunc_normal_init_(torch.empty((num_embeddings, embedding_dim)), std=init_std,
                                          generator=generator), persistent=True)
        # Batch-local leaf that collects the gradient of the rows used this step. Its size fixes the
        # training batch size (per rank), exactly as in the original.
        self.register_buffer("local_weights", torch.zeros(batch_size, embedding_dim, requires_grad=True),
                             persistent=False)
        self.register_buffer("local_ids", torch.zeros(batch_size, dtype=torch.int32), persistent=False)

    def _apply(self, fn, recurse=True):
        # Moving a requires-grad buffer to another device yields a non-leaf copy whose .grad would
        # never be populated; make it a leaf again.
        result = super()._apply(fn, recurse)
        if not self.local_weights.is_leaf or not self.local_weights.requires_grad:
            self.local_weights = self.local_weights.detach().requires_grad_(True)
        return result

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.weights[ids].to(self.cast_to)
        if ids.shape[0] != self.local_ids.shape[0]:
            raise ValueError(f"CastedSparseEmbedding: training batch has {ids.shape[0]} rows but the embedding was "
                             f"built for batch_size={self.local_ids.shape[0]} (arch batch_size must be the per-rank batch)")
        with torch.no_grad():
            self.local_weights.copy_(self.weights[ids])
            self.local_ids.copy_(ids)
        return self.local_weights.to(self.cast_to)


def _all_gather(t: torch.Tensor, world_size: int) -> torch.Tensor:
    out = torch.empty((world_size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    if dist.get_backend() == "gloo":
        # gloo has no all_gather_into_tensor for every dtype/version; the list form is equivalent.
        dist.all_gather(list(out.chunk(world_size)), t.contiguous())
    else:
        dist.all_gather_into_tensor(out, t.contiguous())
    return out


def sparse_signsgd_update_(weights: torch.Tensor, local_grad: torch.Tensor, local_ids: torch.Tensor,
                           lr: float, weight_decay: float, world_size: int) -> None:
    """rows <- rows * (1 - lr * wd) - lr * sign(sum of grads for that id), touched rows only."""
    all_grad, all_ids = local_grad, local_ids
    if world_size > 1:
        all_grad = _all_gather(local_grad, world_size)
        all_ids = _all_gather(local_ids, world_size)
    ids, inverse = all_ids.unique(return_inverse=True)
    dim = all_grad.shape[1]
    grad = torch.zeros((ids.shape[0], dim), dtype=all_grad.dtype, device=all_grad.device)
    grad.scatter_add_(0, inverse.unsqueeze(-1).expand(-1, dim), all_grad)
    ids = ids.long()
    rows = weights[ids]
    rows.mul_(1.0 - lr * weight_decay).add_(torch.sign(grad), alpha=-lr)
    weights[ids] = rows


class CastedSparseEmbeddingSignSGD_Distributed(Optimizer):
    """Sign-SGD with decoupled weight decay for CastedSparseEmbedding, no state.

    `params` = `puzzle_emb.buffers()`: each group holds exactly the three buffers, told apart by
    role (requires_grad -> local rows, 1-D -> ids, 2-D -> table). world_size=1 needs no process
    group; with world_size > 1 the default process group (NCCL or gloo) is used."""

    def __init__(self, params, world_size: int, lr: float = 1e-3, weight_decay: float = 1e-2):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, world_size=world_size))
        for group in self.param_groups:
            if len(group["params"]) != 3:
                raise ValueError("CastedSparseEmbeddingSignSGD_Distributed expects the 3 buffers of one "
                                 f"CastedSparseEmbedding per group, got {len(group['params'])} tensors")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            local_grad = local_ids = weights = None
            for p in group["params"]:
                if p.requires_grad:
                    local_grad = p.grad
                elif p.ndim == 1:
                    local_ids = p
                elif p.ndim == 2:
                    weights = p
            if local_grad is None:  # no backward through the embedding this step
                continue
            assert local_ids is not None and weights is not None
            sparse_signsgd_update_(weights, local_grad, local_ids, group["lr"], group["weight_decay"],
                                   group["world_size"])
        return loss
