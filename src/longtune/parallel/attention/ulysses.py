"""Ulysses attention: an all-to-all turns sequence-sharded heads into head-sharded full sequences, each rank
attends over the whole row on its share of heads, and a second all-to-all brings the output back.

Needs num_heads % sp == 0. With GQA and kv_heads % sp != 0, K/V heads are replicated up to lcm(kv_heads, sp)
before the exchange (autograd sums the replicas' gradients back).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from longtune.parallel.attention.blockwise import AttentionParams
from longtune.parallel.attention.context import check_ulysses_heads
from longtune.parallel.attention.local import LocalBlockAttention
from longtune.parallel.attention.math_kernel import repeat_kv_heads
from longtune.parallel.attention.planner import StepPlan


def _seq_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[B, H, T, D] (this rank's tokens, all heads) -> [B, H/n, n*T, D] (every rank's tokens, rank-major)."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    b, h, t, d = x.shape
    send = x.reshape(b, n, h // n, t, d).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] holds rank j's tokens for this rank's heads.
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t, d)


def _heads_to_seq(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Inverse of `_seq_to_heads`: [B, H/n, n*T, D] -> [B, H, T, D]."""
    n = dist.get_world_size(group)
    if n == 1:
        return x
    b, hn, nt, d = x.shape
    t = nt // n
    send = x.reshape(b, hn, n, t, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[j] holds this rank's tokens for rank j's heads.
    return recv.transpose(0, 1).reshape(b, n * hn, t, d)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def scatter_heads(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, degree_setting: str = "sequence_parallel_size"
) -> tuple[Tensor, Tensor, Tensor]:
    """The Ulysses exchange of q, k, v, with K/V head replication when needed. The gathered tokens' indices and
    documents are not exchanged: the batch's plan already knows them (every rank's tokens, rank-major)."""
    n = dist.get_world_size(group)
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    check_ulysses_heads(num_heads, n, degree_setting)
    if num_kv_heads % n:
        # Replicated heads keep the HF mapping (query head h -> kv head h // (Hq/Hkv)) on every rank's slice.
        replicated = math.lcm(num_kv_heads, n)
        k, v = repeat_kv_heads(k, replicated), repeat_kv_heads(v, replicated)
    return SeqToHeads.apply(q, group), SeqToHeads.apply(k, group), SeqToHeads.apply(v, group)


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, step: StepPlan, group: dist.ProcessGroup, params: AttentionParams
) -> Tensor:
    """[B, Hq, T_local, D] output of this rank's tokens, all heads."""
    q, k, v = scatter_heads(q, k, v, group)
    out = LocalBlockAttention.apply(q, k, v, step, params)
    return HeadsToSeq.apply(out, group)
