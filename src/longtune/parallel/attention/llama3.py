"""llama3-style context parallelism: all-gather K/V over the SP group, local queries attend to the whole row,
and the backward reduce-scatters dK/dV (each rank receives the sum of every rank's gradient for its own slice).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from longtune.parallel.attention.blockwise import AttentionParams, Gradients, blockwise_backward, blockwise_forward
from longtune.parallel.attention.math_kernel import compute_dtype
from longtune.parallel.attention.planner import StepPlan


def _all_gather_tokens(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[..., T, D] local tokens -> [..., n*T, D], rank-major on the second-to-last dim."""
    n = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-2)


class Llama3Attention(torch.autograd.Function):
    """q [B, Hq, T_local, D], k/v [B, Hkv, T_local, D]: K/V are gathered in their own dtype (one collective for
    both), gathered again in backward rather than kept, and dK/dV are accumulated and reduce-scattered in float32
    or wider, like the ring's dK/dV, so the sum over ranks is not rounded to bf16."""

    @staticmethod
    def forward(ctx, q, k, v, step, params, group):
        kv = _all_gather_tokens(torch.stack([k, v]), group)
        out, lse = blockwise_forward(q, kv[0], kv[1], step, params)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.step, ctx.params, ctx.group = step, params, group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        n = dist.get_world_size(group)
        dtype = compute_dtype(q.dtype)
        kv = _all_gather_tokens(torch.stack([k, v]), group)
        dq = torch.zeros_like(q, dtype=dtype)
        dkv = torch.zeros_like(kv, dtype=dtype)
        blockwise_backward(dout, q, kv[0], kv[1], out, lse, ctx.step, ctx.params, Gradients(dq, dkv[0], dkv[1]))
        slices = [part.contiguous() for part in dkv.chunk(n, dim=-2)]
        mine = torch.empty_like(slices[0])
        # The list form: reduce_scatter_tensor warns as deprecated in torch 2.13; this works on every version/backend.
        dist.reduce_scatter(mine, slices, group=group)
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None, None


def llama3_attention(
    q: Tensor, k: Tensor, v: Tensor, step: StepPlan, group: dist.ProcessGroup, params: AttentionParams
) -> Tensor:
    """[B, Hq, T_local, D]: this rank's two zigzag chunks attend to the 2n chunks of the whole row."""
    return Llama3Attention.apply(q, k, v, step, params, group)
