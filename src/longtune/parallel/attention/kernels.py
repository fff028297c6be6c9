"""Fused per-block attention kernels with log-sum-exp, for the SP modes' blockwise forward and backward.

The pure-PyTorch block (`math_kernel.attention_block`) materialises [Tq, Tk] scores in fp32 or wider; it is the
reference and the fallback. The fused kernels are PyTorch's own SDPA kernels called through their aten ops,
because only those return the log-sum-exp (needed to merge ring partials) and accept an external output and
log-sum-exp in backward (needed to recompute one block against the *final* softmax of its queries):

  CUDA, bf16/fp16, block mask full or causal   flash:      aten._scaled_dot_product_flash_attention(_backward)
  CUDA, any other block                        efficient:  aten._scaled_dot_product_efficient_attention(_backward)
                                               (additive -inf bias for document / window masks)
  CPU                                          flash-cpu:  aten._scaled_dot_product_flash_attention_for_cpu(_backward)

flash-attn is used by none of these; it is optional and not required. Rows with no visible key get output 0 and
lse -inf, as in the reference kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtune.parallel.attention.math_kernel import reduce_kv_heads, repeat_kv_heads

# Config `attention_kernel`, carried per call in SPContext / AttentionParams.
KERNEL_CHOICES = ("auto", "fused", "math")


def fused_enabled(q: Tensor, kernel: str) -> bool:
    """Whether blocks of q go to a fused kernel: `auto`/`fused` where the device and dtype allow; `math` never."""
    if kernel == "math":
        return False
    if q.is_cuda or q.is_meta:  # meta tensors stand in for CUDA ones in tests (see _gpu_path)
        return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    return q.device.type == "cpu" and q.dtype in (torch.float64, torch.float32, torch.bfloat16)


def _mask_kind(mask: Tensor) -> str:
    """'full', 'causal' (top-left aligned lower triangle, square) or 'masked'. mask: [B, 1, Tq, Tk] bool."""
    if bool(mask.all()):
        return "full"
    tq, tk = mask.shape[-2:]
    if tq == tk:
        tril = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril()
        if bool((mask == tril).all()):
            return "causal"
    return "masked"


def _bias(mask: Tensor, dtype: torch.dtype, align: int = 1) -> Tensor:
    """Additive bias (0 visible, -inf hidden). Rows with no visible key are opened fully (their result is
    discarded) so no kernel ever normalises an all -inf row. The key dim is padded to `align` for CUDA."""
    has_key = mask.any(-1, keepdim=True)
    visible = mask | ~has_key
    tk = visible.shape[-1]
    width = -(-tk // align) * align
    bias = torch.full((*visible.shape[:-1], width), float("-inf"), dtype=dtype, device=mask.device)
    bias[..., :tk].masked_fill_(visible, 0.0)
    return bias[..., :tk]


def _gpu_path(q: Tensor) -> bool:
    """CUDA tensors take the CUDA kernels. So do meta tensors: they run the same aten calls through their meta
    implementations, which lets the tests check the CUDA calls' schemas and shapes on a machine without a GPU."""
    return q.is_cuda or q.is_meta


def _kind_and_keys(mask: Tensor | None, kind: str | None, q: Tensor) -> tuple[str, Tensor]:
    """The mask kind and which query rows see any key [B, 1, Tq]. A given kind is trusted (the planner's, exact
    and free); only without one is the mask classified, which reads it on the host."""
    if kind in ("full", "causal"):
        return kind, torch.ones(q.shape[0], 1, q.shape[2], dtype=torch.bool, device=q.device)
    assert mask is not None, "a 'masked' block needs its mask"
    if kind is None:
        kind = "masked" if mask.is_meta else _mask_kind(mask)  # meta: no values to classify by
    return kind, mask.any(-1)


# Flash (CUDA) takes head dims that are multiples of 8 up to 256; other head dims take the memory-efficient
# kernel, their head dim zero-padded to a multiple of 8 (zero columns add nothing to q.k, and give zero output
# columns that are cut off again), which keeps its loads aligned.
FLASH_MAX_HEAD_DIM = 256
HEAD_DIM_ALIGN = 8


def uses_flash(q: Tensor, kind: str) -> bool:
    """Whether a block goes to the CUDA flash kernel: half precision, no mask, a head dim flash supports."""
    d = q.shape[-1]
    return (_gpu_path(q) and kind in ("full", "causal") and q.dtype in (torch.float16, torch.bfloat16)
            and d % HEAD_DIM_ALIGN == 0 and d <= FLASH_MAX_HEAD_DIM)


def _pad_head_dim(*xs: Tensor) -> list[Tensor]:
    d = xs[0].shape[-1]
    extra = -d % HEAD_DIM_ALIGN
    return [x if extra == 0 else torch.nn.functional.pad(x, (0, extra)) for x in xs]


def flash_rng_state(device: torch.device) -> tuple[Tensor, Tensor]:
    """The (philox seed, offset) pair the flash backward takes: the forward's `rng_state` and `unused` outputs.

    Dropout is always 0 under SP (the caller turns it off), so the kernels never draw or read random numbers and
    the forward's pair carries no information; this pair has its layout (uint64 [2] and [], on q's device; the
    tests compare it with what the forward returns). Keeping a per-block forward state across the ring would
    cost memory for nothing."""
    return (torch.empty(2, dtype=torch.uint64, device=device), torch.empty((), dtype=torch.uint64, device=device))


def flash_backward_args(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                        scaling: float) -> tuple[tuple, dict]:
    """Arguments of aten._scaled_dot_product_flash_attention_backward for one dense block.

    cum_seq_q/k must be undefined (None): a defined tensor, even an empty one, selects the varlen kernel, which
    then fails with "batch size must be positive". max_q/max_k are the block's lengths."""
    seed, offset = flash_rng_state(q.device)
    args = (dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset)
    return args, {"scale": scaling}


def fused_block_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float,
                        kind: str | None = None) -> tuple[Tensor, Tensor]:
    """out [B, Hq, Tq, D] (float32 or wider) and lse [B, Hq, Tq] of q on (k, v).

    `kind` 'full' or 'causal' (square, top-left aligned) needs no mask; otherwise mask [B, 1, Tq, Tk] is used."""
    wide = torch.promote_types(q.dtype, torch.float32)
    k, v = (x.to(q.dtype).contiguous() for x in (repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])))
    q = q.contiguous()
    kind, has_key = _kind_and_keys(mask, kind, q)
    tq, d = q.shape[2], q.shape[3]
    if uses_flash(q, kind):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, kind == "causal", False, scale=scaling
        )[:2]
    elif _gpu_path(q):
        bias = None if kind in ("full", "causal") else _bias(mask, q.dtype, align=16).expand(-1, q.shape[1], -1, -1)
        qp, kp, vp = _pad_head_dim(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qp, kp, vp, bias, True, 0.0, kind == "causal", scale=scaling
        )[:2]
        out = out[..., :d]
        lse = lse[..., :tq]  # the kernel pads its lse to a multiple of 32 rows
    else:
        bias = None if kind in ("full", "causal") else _bias(mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, kind == "causal", attn_mask=bias, scale=scaling
        )
    out = out.to(wide) * has_key.unsqueeze(-1)
    lse = lse.to(wide).masked_fill(~has_key, float("-inf"))
    return out, lse


def fused_block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None, scaling: float,
    kind: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Block gradients against the final out/lse of its queries (see math_kernel.attention_block_backward)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    num_kv = k.shape[1]
    # The backward kernels assume q, out and grad_out share one memory layout: make all of them contiguous.
    k, v = (x.to(q.dtype).contiguous() for x in (repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])))
    q = q.contiguous()
    kind, has_key = _kind_and_keys(mask, kind, q)
    # Queries that see no key of this block were opened fully in the bias (see _bias); give them lse +inf so
    # their probabilities are exp(-inf) = 0 and they add no gradient (likewise queries that see nothing at all).
    lse_in = lse.to(torch.promote_types(q.dtype, torch.float32)).masked_fill(~has_key | torch.isinf(lse), float("inf"))
    dout_c = dout.to(q.dtype).contiguous()
    out_c = out.to(q.dtype).contiguous()
    d = q.shape[3]
    if uses_flash(q, kind):
        args, kwargs = flash_backward_args(dout_c, q, k, v, out_c, lse_in.contiguous(), kind == "causal", scaling)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(*args, **kwargs)
    elif _gpu_path(q):
        bias = None if kind in ("full", "causal") else _bias(mask, q.dtype, align=16).expand(-1, q.shape[1], -1, -1)
        tq = q.shape[2]
        padded = -(-tq // 32) * 32
        lse_pad = torch.nn.functional.pad(lse_in, (0, padded - tq), value=float("inf")).contiguous()
        zero = torch.zeros((), dtype=torch.int64, device=q.device)  # the efficient forward's (seed, offset) layout
        dout_p, qp, kp, vp, out_p = _pad_head_dim(dout_c, q, k, v, out_c)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout_p, qp, kp, vp, bias, out_p, lse_pad, zero, zero, 0.0, [True, True, True, False],
            kind == "causal", scale=scaling,
        )
        dq, dk, dv = dq[..., :d], dk[..., :d], dv[..., :d]
    else:
        bias = None if kind in ("full", "causal") else _bias(mask, q.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_c, q, k, v, out_c, lse_in, 0.0, kind == "causal",
            attn_mask=bias, scale=scaling,
        )
    return dq.to(wide), reduce_kv_heads(dk.to(wide), num_kv), reduce_kv_heads(dv.to(wide), num_kv)
