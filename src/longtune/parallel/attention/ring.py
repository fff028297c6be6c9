"""Zigzag ring attention: K/V blocks travel around the SP group while each rank keeps its queries.

Forward merges one partial attention per ring step by log-sum-exp; backward runs the ring again, recomputing
each block from the final lse, and sends dK/dV along with their block so that they reach the owner after a full
turn. Every message goes to rank+1 and comes from rank-1 of the group (batch_isend_irecv on global ranks). Only
K/V (and dK/dV) travel: which tokens a block holds at each step is in the batch's precomputed plan.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from longtune.parallel.attention.blockwise import AttentionParams, Gradients, blockwise_backward, blockwise_forward
from longtune.parallel.attention.math_kernel import compute_dtype, merge_partials
from longtune.parallel.attention.planner import StepPlan


class _RingPass:
    """One exchange of a list of tensors with the ring neighbours, started now and finished by `wait`."""

    def __init__(self, tensors: list[Tensor], group: dist.ProcessGroup) -> None:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        send_to = dist.get_global_rank(group, (rank + 1) % size)
        recv_from = dist.get_global_rank(group, (rank - 1) % size)
        self.received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), send_to, group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, recv_from, group) for r in self.received]
        self._requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[Tensor]:
        for request in self._requests:
            request.wait()
        return self.received


class ZigzagRingAttention(torch.autograd.Function):
    """q, k, v [B, H, T, D] (k/v may have fewer heads); `steps[s]` plans the key block held at ring step s."""

    @staticmethod
    def forward(ctx, q, k, v, steps, params, group):
        size = dist.get_world_size(group)
        dtype = compute_dtype(q.dtype)
        kv = torch.stack([k, v]).contiguous()
        b, h, t, d = q.shape
        out = q.new_zeros(b, h, t, d, dtype=dtype)
        lse = q.new_full((b, h, t), float("-inf"), dtype=dtype)
        for step in range(size):
            exchange = _RingPass([kv], group) if step + 1 < size else None
            if steps[step].plan.blocks:
                part_out, part_lse = blockwise_forward(q, kv[0], kv[1], steps[step], params)
                out, lse = merge_partials(out, lse, part_out, part_lse)
            if exchange is not None:
                (kv,) = exchange.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params, ctx.group, ctx.steps = params, group, steps
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, steps = ctx.group, ctx.steps
        size = dist.get_world_size(group)
        dtype = compute_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=dtype)
        kv = torch.stack([k, v]).contiguous()
        # dkv holds, at step s, the gradient gathered so far for the K/V block this rank holds at step s; its
        # last send (after step size-1) brings every block's gradient back to its owner. It travels in float32
        # or wider, so the sum over ranks is not rounded to bf16 on the way.
        dkv = torch.zeros_like(kv, dtype=dtype)
        for step in range(size):
            exchange = _RingPass([kv], group) if step + 1 < size else None
            if steps[step].plan.blocks:
                blockwise_backward(dout, q, kv[0], kv[1], out, lse, steps[step], ctx.params,
                                   Gradients(dq, dkv[0], dkv[1]))
            if exchange is not None:
                (kv,) = exchange.wait()
            if size > 1:
                (dkv,) = _RingPass([dkv], group).wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, steps: list[StepPlan], group: dist.ProcessGroup, params: AttentionParams
) -> Tensor:
    """Attention of this rank's queries on the whole row held by `group`; [B, Hq, T_local, D]."""
    return ZigzagRingAttention.apply(q, k, v, steps, params, group)
