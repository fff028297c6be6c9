"""llama3-style context parallelism: all-gather K/V over the SP group, local queries attend to the whole row,
and the backward reduce-scatters dK/dV (each rank receives the sum of every rank's gradient for its own slice).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from longtune.parallel.attention.common import LocalBlockAttention
from longtune.parallel.attention.ulysses import gather_tokens


class AllGatherSequence(torch.autograd.Function):
    """[..., T, D] local tokens on the second-to-last dim -> [..., n*T, D], rank-major; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad):
        n = dist.get_world_size(ctx.group)
        slices = [part.contiguous() for part in grad.chunk(n, dim=-2)]
        mine = torch.empty_like(slices[0])
        # The list form: reduce_scatter_tensor warns as deprecated in torch 2.13; this works on every version/backend.
        dist.reduce_scatter(mine, slices, group=ctx.group)
        return mine, None


def llama3_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_index: Tensor,
    doc_ids: Tensor,
    group: dist.ProcessGroup,
    scaling: float,
    sliding_window: int | None,
) -> Tensor:
    """[B, Hq, T_local, D]. K/V are gathered on their own (Hkv) heads; one collective carries both."""
    n = dist.get_world_size(group)
    kv = AllGatherSequence.apply(torch.stack([k, v]), group)
    index, docs = gather_tokens(seq_index, group), gather_tokens(doc_ids, group)
    # Queries are this rank's two zigzag chunks; keys are 2n chunks, two per rank.
    return LocalBlockAttention.apply(
        q, kv[0], kv[1], seq_index, index, doc_ids, docs, scaling, sliding_window, 2, 2 * n
    )
