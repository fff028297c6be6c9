"""Sequence-parallel attention registered with transformers' `AttentionInterface` as "longtune_sp".

Layout of this package: context.py (SPContext, hybrid groups), planner.py (which kernel calls each step makes),
math_kernel.py (reference block kernel, LSE merge), kernels.py (fused SDPA kernels), blockwise.py (a step's
blocks through a kernel), local.py / ring.py / ulysses.py / llama3.py / hybrid.py (one autograd path per mode).

The model stays an untouched HF model: the caller registers the function, sets
`config._attn_implementation = ATTENTION_NAME` and passes `sp_context=SPContext(...)` to the model's forward;
transformers hands that keyword to every attention layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longtune.parallel.attention.blockwise import AttentionParams
from longtune.parallel.attention.context import (
    SP_MODES,
    SPContext,
    check_ulysses_heads,
    choose_ulysses_size,
    hybrid_group_ranks,
    make_hybrid_groups,
)
from longtune.parallel.attention.hybrid import hybrid_attention
from longtune.parallel.attention.llama3 import llama3_attention
from longtune.parallel.attention.local import LocalBlockAttention
from longtune.parallel.attention.math_kernel import (
    BlockTokens,
    attention_block,
    attention_block_backward,
    merge_partials,
    reference_attention,
)
from longtune.parallel.attention.planner import AttentionPlans
from longtune.parallel.attention.ring import ring_attention
from longtune.parallel.attention.ulysses import ulysses_attention

ATTENTION_NAME = "longtune_sp"

__all__ = [
    "ATTENTION_NAME",
    "AttentionParams",
    "AttentionPlans",
    "BlockTokens",
    "SP_MODES",
    "SPContext",
    "attention_block",
    "attention_block_backward",
    "check_ulysses_heads",
    "choose_ulysses_size",
    "hybrid_group_ranks",
    "make_hybrid_groups",
    "merge_partials",
    "reference_attention",
    "register_sp_attention",
    "sp_attention",
    "sp_attention_forward",
]


def sp_attention(
    q: Tensor, k: Tensor, v: Tensor, sp_context: SPContext, scaling: float, sliding_window: int | None
) -> Tensor:
    """Causal (document- and window-masked) attention of this rank's tokens; [B, Hq, T_local, D] in and out."""
    ctx = sp_context
    expected = (q.shape[0], q.shape[2])
    if tuple(ctx.seq_index.shape) != expected or tuple(ctx.doc_ids.shape) != expected:
        raise ValueError(
            f"sp_context.seq_index {tuple(ctx.seq_index.shape)} / doc_ids {tuple(ctx.doc_ids.shape)} do not match "
            f"the local tokens [B, T_local] = {expected}"
        )
    # Planned when the batch was prepared: reading the plan costs no device -> host synchronisation.
    steps = ctx.plans.steps(sliding_window)
    params = AttentionParams(scaling, sliding_window, ctx.kernel)
    if ctx.sp_size == 1:
        return LocalBlockAttention.apply(q, k, v, steps[0], params)
    if ctx.mode == "zigzag_ring":
        return ring_attention(q, k, v, steps, ctx.group, params)
    if ctx.mode == "ulysses":
        return ulysses_attention(q, k, v, steps[0], ctx.group, params)
    if ctx.mode == "llama3":
        return llama3_attention(q, k, v, steps[0], ctx.group, params)
    return hybrid_attention(q, k, v, steps, ctx.ulysses_group, ctx.ring_group, params)


def to_compute_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in one dtype: the autocast dtype when autocast is on (what SDPA does under autocast), else their
    common promoted dtype.

    Under autocast RoPE's fp32 cos/sin make q and k fp32 while v stays bf16; left alone, kernel selection by
    q.dtype would take the fp32 kernels and the ring would carry K/V stacked in fp32 (twice the traffic).
    """
    device_type = q.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sp_attention_forward(
    module: nn.Module | None,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    sp_context: SPContext,
    **kwargs,
) -> tuple[Tensor, None]:
    """The `AttentionInterface` entry point: returns ([B, T_local, Hq, D], None).

    `attention_mask` is ignored: masks come from `sp_context` (global token index and document id), which is
    what makes them right for sharded, reordered and packed tokens. Dropout is not applied (the caller turns
    attention dropout off under SP). Other keywords transformers passes (position_ids, ...) are not needed.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    query, key, value = to_compute_dtype(query, key, value)
    out = sp_attention(query, key, value, sp_context, scaling, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def register_sp_attention() -> None:
    """Register `sp_attention_forward` as ATTENTION_NAME with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, sp_attention_forward)

