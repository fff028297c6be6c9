"""The blockwise passes: run a step's planned blocks (planner.py) through a kernel and merge them by
log-sum-exp (forward), or add their recomputed gradients into accumulators (backward). Each block goes through
the fused kernel (kernels.py) where the device, dtype and `AttentionParams.kernel` allow, else the reference
kernel (math_kernel.py), which builds the block's own mask (block-sized: a document run or a window tile)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from longtune.parallel.attention.kernels import KERNEL_CHOICES, fused_block_backward, fused_block_forward, fused_enabled
from longtune.parallel.attention.math_kernel import (
    BlockTokens,
    attention_block,
    attention_block_backward,
    compute_dtype,
    merge_partials,
)
from longtune.parallel.attention.planner import StepPlan


@dataclass(frozen=True)
class AttentionParams:
    """The per-call settings every attention layer passes down unchanged: the score scale, the layer's sliding
    window (None: none) and the kernel choice (config `attention_kernel`: auto/fused = fused where possible,
    math = always the reference kernel)."""

    scaling: float
    sliding_window: int | None = None
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(f"attention kernel must be one of {KERNEL_CHOICES}, got {self.kernel!r}")


class Gradients(NamedTuple):
    """Accumulators of dQ, dK, dV (compute dtype, shapes of q, k, v) that a backward pass adds into."""

    dq: Tensor
    dk: Tensor
    dv: Tensor


def block_forward(q: Tensor, k: Tensor, v: Tensor, tokens: BlockTokens, params: AttentionParams) -> tuple[Tensor, Tensor]:
    """One block (its mask from `tokens`) through a fused kernel where allowed, else the reference kernel."""
    if fused_enabled(q, params.kernel):
        mask = tokens.visibility(params.sliding_window).unsqueeze(1)
        return fused_block_forward(q, k, v, mask, params.scaling, "masked")
    return attention_block(q, k, v, tokens, params.scaling, params.sliding_window)


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, tokens: BlockTokens,
    params: AttentionParams,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block against the final out/lse of its queries, by the kernel `block_forward` uses."""
    if fused_enabled(q, params.kernel):
        mask = tokens.visibility(params.sliding_window).unsqueeze(1)
        return fused_block_backward(dout, q, k, v, out, lse, mask, params.scaling, "masked")
    return attention_block_backward(dout, q, k, v, out, lse, tokens, params.scaling, params.sliding_window)


def blockwise_forward(q: Tensor, k: Tensor, v: Tensor, step: StepPlan, params: AttentionParams) -> tuple[Tensor, Tensor]:
    """Output and lse of q on (k, v) following `step`'s plan, merged by lse per query row; rows the plan skips get
    0 and -inf."""
    b, h, tq, d = q.shape
    dtype = compute_dtype(q.dtype)
    out = q.new_zeros(b, h, tq, d, dtype=dtype)
    lse = q.new_full((b, h, tq), float("-inf"), dtype=dtype)
    fused = fused_enabled(q, params.kernel)
    for block in step.plan.blocks:
        rows, qsl, ksl = block.rows, block.q, block.k
        qb, kb, vb = q[rows, :, qsl], k[rows, :, ksl], v[rows, :, ksl]
        tokens = step.tokens.select(rows, qsl, ksl)
        if fused:
            mask = tokens.visibility(params.sliding_window).unsqueeze(1) if block.kind == "masked" else None
            part_out, part_lse = fused_block_forward(qb, kb, vb, mask, params.scaling, block.kind)
        else:
            part_out, part_lse = attention_block(qb, kb, vb, tokens, params.scaling, params.sliding_window)
        out[rows, :, qsl], lse[rows, :, qsl] = merge_partials(out[rows, :, qsl], lse[rows, :, qsl], part_out,
                                                              part_lse)
    return out, lse


def blockwise_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, step: StepPlan, params: AttentionParams,
    grads: Gradients,
) -> None:
    """Add the gradients of `step`'s blocks into `grads`, each block recomputed against the final out/lse of its
    queries."""
    fused = fused_enabled(q, params.kernel)
    for block in step.plan.blocks:
        rows, qsl, ksl = block.rows, block.q, block.k
        args = (dout[rows, :, qsl], q[rows, :, qsl], k[rows, :, ksl], v[rows, :, ksl], out[rows, :, qsl],
                lse[rows, :, qsl])
        tokens = step.tokens.select(rows, qsl, ksl)
        if fused:
            mask = tokens.visibility(params.sliding_window).unsqueeze(1) if block.kind == "masked" else None
            part_dq, part_dk, part_dv = fused_block_backward(*args, mask, params.scaling, block.kind)
        else:
            part_dq, part_dk, part_dv = attention_block_backward(*args, tokens, params.scaling, params.sliding_window)
        grads.dq[rows, :, qsl] += part_dq
        grads.dk[rows, :, ksl] += part_dk
        grads.dv[rows, :, ksl] += part_dv
