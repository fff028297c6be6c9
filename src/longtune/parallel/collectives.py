"""Autograd-aware collectives for sequence-level quantities under SP.

`all_reduce_sum` sums a per-rank partial (e.g. a sequence's log-prob over this rank's tokens) over a group; its
backward sums the incoming gradients over the group as well. When every rank then computes the *same* loss from
the reduced value, each rank's partial receives sp times the true gradient, so the stages scale their loss by
1/sp once (see stages/preference.py); the parity tests prove the result equals sp=1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: Tensor, group, size: int) -> Tensor:
    """Sum over `group` (identity when size == 1), differentiable."""
    if size <= 1 or group is None:
        return x
    return _AllReduceSum.apply(x, group)
