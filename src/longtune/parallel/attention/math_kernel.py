"""The pure-PyTorch attention kernel of one (query block, key block): forward with log-sum-exp, backward from a
saved log-sum-exp, and the LSE merge of partials. Any dtype (float64 in the parity tests); the fused kernels in
kernels.py are checked against it.

Masks are never materialised for the whole row: each block builds its own from the global token index and the
document id of its queries and keys, so any token order (zigzag, rank-major after an all-to-all) is correct.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class BlockTokens(NamedTuple):
    """Who the queries and keys of a block are: global token index and document id, [B, Tq] / [B, Tk] each."""

    q_index: Tensor
    k_index: Tensor
    q_doc: Tensor
    k_doc: Tensor

    def select(self, rows: slice, q: slice, k: slice) -> BlockTokens:
        """The tokens of a sub-block: batch rows `rows`, query positions `q`, key positions `k`."""
        return BlockTokens(self.q_index[rows, q], self.k_index[rows, k], self.q_doc[rows, q], self.k_doc[rows, k])

    def visibility(self, sliding_window: int | None) -> Tensor:
        """[B, Tq, Tk] True where the query may see the key (see `visibility_mask`)."""
        return visibility_mask(self.q_index, self.k_index, self.q_doc, self.k_doc, sliding_window)


def visibility_mask(
    q_index: Tensor, k_index: Tensor, q_doc: Tensor, k_doc: Tensor, sliding_window: int | None
) -> Tensor:
    """[B, Tq, Tk] True where the query may see the key: causal, same document, inside the window."""
    qi, ki = q_index.unsqueeze(-1), k_index.unsqueeze(-2)
    mask = (ki <= qi) & (q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2))
    if sliding_window is not None:
        # HF convention (masking_utils.sliding_window_overlay): the key is visible when q - k < window.
        mask &= qi - ki < sliding_window
    return mask


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, lse and gradient accumulators never go below float32 (bf16 inputs), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def repeat_kv_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, num_heads, T, D]; query head h uses K/V head h // (num_heads // Hkv), as HF."""
    rep = num_heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def reduce_kv_heads(x: Tensor, num_kv_heads: int) -> Tensor:
    """Inverse of `repeat_kv_heads` for gradients: [B, H, T, D] -> [B, num_kv_heads, T, D], summing the copies."""
    b, h, t, d = x.shape
    return x if h == num_kv_heads else x.view(b, num_kv_heads, h // num_kv_heads, t, d).sum(2)


def attention_block(
    q: Tensor, k: Tensor, v: Tensor, tokens: BlockTokens, scaling: float, sliding_window: int | None
) -> tuple[Tensor, Tensor]:
    """Masked attention of one query block on one key block.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]; `tokens` the block's indices and documents. Returns the output
    [B, Hq, Tq, D] and the log-sum-exp of the scaled scores [B, Hq, Tq], both in float32 or wider. A query with
    no visible key gets output 0 and lse -inf. Differentiable by autograd (the reference path); the SP modes
    use `attention_block_backward` instead, which recomputes from the saved lse.
    """
    mask = tokens.visibility(sliding_window).unsqueeze(1)
    dtype = compute_dtype(q.dtype)
    k = repeat_kv_heads(k, q.shape[1]).to(dtype)
    v = repeat_kv_heads(v, q.shape[1]).to(dtype)
    scores = torch.matmul(q.to(dtype), k.transpose(-1, -2)) * scaling
    has_key = mask.any(-1)  # [B, 1, Tq]
    # Rows without a visible key are filled with 0 instead of -inf so that neither the forward nor the
    # autograd backward of logsumexp ever sees (-inf) - (-inf).
    fill = torch.where(has_key.unsqueeze(-1), float("-inf"), 0.0).to(dtype)
    scores = torch.where(mask, scores, fill)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)) * has_key.unsqueeze(-1)
    out = torch.matmul(probs, v)
    lse = lse.masked_fill(~has_key, float("-inf"))
    return out, lse


def attention_block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, tokens: BlockTokens, scaling: float,
    sliding_window: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the *final* output and lse of its queries (over all key blocks).

    With P = exp(S - lse) the block's share of the final softmax: dV = P^T dO, dS = P * (dO V^T - rowsum(dO*O)),
    dQ = scale * dS K, dK = scale * dS^T Q (FlashAttention-2, Algorithm 2). dK/dV come back on Hkv heads.
    Returned in the compute dtype (float32 or wider) so that callers can accumulate without rounding.
    """
    dtype = compute_dtype(q.dtype)
    num_kv_heads = k.shape[1]
    mask = tokens.visibility(sliding_window).unsqueeze(1)
    qc, dout, out = q.to(dtype), dout.to(dtype), out.to(dtype)
    kc = repeat_kv_heads(k, q.shape[1]).to(dtype)
    vc = repeat_kv_heads(v, q.shape[1]).to(dtype)
    lse_safe = lse.to(dtype).masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scaling
    # Masked scores become -inf before exp: a masked key may score far above this row's lse.
    probs = torch.exp(scores.masked_fill(~mask, float("-inf")) - lse_safe)
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    dprobs = torch.matmul(dout, vc.transpose(-1, -2))
    delta = (dout * out).sum(-1, keepdim=True)
    dscores = probs * (dprobs - delta)
    dq = torch.matmul(dscores, kc) * scaling
    dk = torch.matmul(dscores.transpose(-1, -2), qc) * scaling
    return dq, reduce_kv_heads(dk, num_kv_heads), reduce_kv_heads(dv, num_kv_heads)


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets: softmax weights are exp(lse_part - lse_total)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * w_a + out_b * w_b, lse


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, seq_index: Tensor, doc_ids: Tensor, scaling: float,
    sliding_window: int | None,
) -> Tensor:
    """Single-process attention on a whole row, differentiated by plain autograd: the parity reference."""
    out, _ = attention_block(q, k, v, BlockTokens(seq_index, seq_index, doc_ids, doc_ids), scaling, sliding_window)
    return out.to(q.dtype)
