"""The autograd function of attention without communication: all local queries on all given keys, blockwise,
with a recomputing backward. The sp=1 path and Ulysses (after its all-to-all) use it."""

from __future__ import annotations

import torch

from longtune.parallel.attention.blockwise import Gradients, blockwise_backward, blockwise_forward
from longtune.parallel.attention.math_kernel import compute_dtype


class LocalBlockAttention(torch.autograd.Function):
    """q [B, Hq, T, D], k/v [B, Hkv, T', D]; `step` is the batch's precomputed plan, `params` an AttentionParams.

    Only q, k, v, the output and the lse are kept for backward (no [Tq, Tk] probabilities).
    """

    @staticmethod
    def forward(ctx, q, k, v, step, params):
        out, lse = blockwise_forward(q, k, v, step, params)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.params, ctx.step = params, step
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dtype = compute_dtype(q.dtype)
        grads = Gradients(torch.zeros_like(q, dtype=dtype), torch.zeros_like(k, dtype=dtype),
                          torch.zeros_like(v, dtype=dtype))
        blockwise_backward(dout, q, k, v, out, lse, ctx.step, ctx.params, grads)
        return grads.dq.to(q.dtype), grads.dk.to(k.dtype), grads.dv.to(v.dtype), None, None
