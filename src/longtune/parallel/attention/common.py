"""What every sequence-parallel attention mode shares: the context passed through the model, the masked
pure-PyTorch block kernel (forward with log-sum-exp, backward from a saved log-sum-exp) and the LSE merge.

Masks are never materialised for the whole row: each block builds its own from the global token index and the
document id of its queries and keys, so any token order (zigzag, rank-major after an all-to-all) is correct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from longtune.parallel.attention.kernels import fused_block_backward, fused_block_forward, fused_enabled
from longtune.parallel.layout import local_token_index

SP_MODES = ("zigzag_ring", "ulysses", "llama3", "hybrid")


@dataclass
class SPContext:
    """Everything the attention function needs to know about the SP group and this rank's tokens.

    `seq_index` and `doc_ids` are [B, T_local]: each local token's index in the padded row and its document id
    (from `layout.shard_for_sequence_parallel`). `group` is None when sp_size == 1. The hybrid mode also needs
    `ulysses_group` (ulysses_size consecutive SP ranks) and `ring_group` (one rank of each Ulysses group), both
    from `make_hybrid_groups`.

    `row_doc_ids` is the whole padded row's document ids [B, T] on the host (needed when sp_size > 1; with
    sp_size == 1 the local tokens are the row). From it the context plans, once, the attention blocks of every
    layer (`plans`, see AttentionPlans) for each of `windows` (the model's sliding windows; None = no window).
    """

    mode: str
    group: dist.ProcessGroup | None
    sp_size: int
    sp_rank: int
    seq_index: Tensor
    doc_ids: Tensor
    ulysses_group: dist.ProcessGroup | None = None
    ulysses_size: int = 1
    ring_group: dist.ProcessGroup | None = None
    ring_size: int = 1
    row_doc_ids: Tensor | None = None
    windows: tuple[int | None, ...] = (None,)
    # Made by __post_init__ unless given. It is a field that can be given so that copies made with
    # dataclasses.replace (FSDP's forward-input casting rebuilds dataclass arguments that way) keep the plans
    # instead of planning again for every wrapped module.
    plans: AttentionPlans | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in SP_MODES:
            raise ValueError(f"unknown sequence parallel mode {self.mode!r}; expected one of {SP_MODES}")
        if self.sp_size > 1 and self.group is None:
            raise ValueError(f"sp_size={self.sp_size} needs a process group")
        if self.mode == "hybrid" and self.sp_size > 1:
            if self.ulysses_size * self.ring_size != self.sp_size:
                raise ValueError(
                    f"hybrid SP needs ulysses_size * ring_size == sp_size, got "
                    f"{self.ulysses_size} * {self.ring_size} != {self.sp_size}"
                )
            if self.ulysses_group is None or self.ring_group is None:
                raise ValueError("hybrid SP needs ulysses_group and ring_group (see make_hybrid_groups)")
        if self.plans is not None:
            return
        if self.row_doc_ids is None:
            if self.sp_size > 1:
                raise ValueError(f"sp_size={self.sp_size} needs row_doc_ids (the padded row's document ids)")
            rank_index, rank_docs = [self.seq_index], [self.doc_ids]
        else:
            padded = self.row_doc_ids.shape[-1]
            rank_index = [local_token_index(padded, self.sp_size, r).expand(self.row_doc_ids.shape[0], -1)
                          for r in range(self.sp_size)]
            rank_docs = [self.row_doc_ids.cpu().gather(1, index) for index in rank_index]
        self.plans = AttentionPlans(self.mode, self.sp_rank, self.ulysses_size, rank_index, rank_docs,
                                    self.seq_index.device, self.windows)


def hybrid_group_ranks(sp_ranks: list[int], ulysses_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rank lists of the Ulysses groups (consecutive SP ranks) and of the ring groups (same slot in each)."""
    sp = len(sp_ranks)
    if ulysses_size < 1 or sp % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} must divide sequence_parallel_size={sp}")
    ring_size = sp // ulysses_size
    ulysses = [sp_ranks[g * ulysses_size : (g + 1) * ulysses_size] for g in range(ring_size)]
    ring = [sp_ranks[slot::ulysses_size] for slot in range(ulysses_size)]
    return ulysses, ring


def make_hybrid_groups(
    sp_ranks: list[int], ulysses_size: int
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Create the hybrid sub-groups of one SP group; returns (ulysses_group, ring_group) of this rank.

    Collective over the whole world: `dist.new_group` must be called by every process, in the same order, for
    every group. With several SP groups (dp > 1) every rank calls this for each SP group in the same order; a
    rank outside `sp_ranks` gets (None, None).
    """
    ulysses_lists, ring_lists = hybrid_group_ranks(sp_ranks, ulysses_size)
    me = dist.get_rank()
    mine_ulysses = mine_ring = None
    for ranks in ulysses_lists:
        group = dist.new_group(ranks)
        if me in ranks:
            mine_ulysses = group
    for ranks in ring_lists:
        group = dist.new_group(ranks)
        if me in ranks:
            mine_ring = group
    return mine_ulysses, mine_ring


def choose_ulysses_size(num_heads: int, num_kv_heads: int, sp: int) -> int:
    """`auto` hybrid: the largest Ulysses degree that needs no K/V head replication, gcd(kv_heads, sp).

    It also divides num_heads (kv_heads divides num_heads), so the Ulysses all-to-all is always possible.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    return math.gcd(num_kv_heads, sp)


def check_ulysses_heads(num_heads: int, ulysses_size: int, setting: str = "sequence_parallel_size") -> None:
    """Ulysses splits the attention heads over its ranks. `setting` names the degree in the message."""
    if num_heads % ulysses_size:
        raise ValueError(
            f"Ulysses sequence parallelism splits attention heads across ranks: num_attention_heads={num_heads} "
            f"is not divisible by {setting}={ulysses_size}. Use a degree that divides {num_heads}, or the "
            f"zigzag_ring or llama3 mode, or hybrid with ulysses_size=gcd(num_key_value_heads, sp) (auto)."
        )


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


def _reduce_kv_heads(x: Tensor, num_kv_heads: int) -> Tensor:
    b, h, t, d = x.shape
    return x if h == num_kv_heads else x.view(b, num_kv_heads, h // num_kv_heads, t, d).sum(2)


def attention_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_index: Tensor,
    k_index: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    scaling: float,
    sliding_window: int | None,
) -> tuple[Tensor, Tensor]:
    """Masked attention of one query block on one key block.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]; indices and documents [B, Tq] / [B, Tk]. Returns the output
    [B, Hq, Tq, D] and the log-sum-exp of the scaled scores [B, Hq, Tq], both in float32 or wider. A query with
    no visible key gets output 0 and lse -inf. Differentiable by autograd (the reference path); the SP modes
    use `attention_block_backward` instead, which recomputes from the saved lse.
    """
    mask = visibility_mask(q_index, k_index, q_doc, k_doc, sliding_window).unsqueeze(1)
    return _attention_masked(q, k, v, mask, scaling)


def _attention_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
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
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    q_index: Tensor,
    k_index: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    scaling: float,
    sliding_window: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the *final* output and lse of its queries (over all key blocks).

    With P = exp(S - lse) the block's share of the final softmax: dV = P^T dO, dS = P * (dO V^T - rowsum(dO*O)),
    dQ = scale * dS K, dK = scale * dS^T Q (FlashAttention-2, Algorithm 2). dK/dV come back on Hkv heads.
    Returned in the compute dtype (float32 or wider) so that callers can accumulate without rounding.
    """
    dtype = compute_dtype(q.dtype)
    num_kv_heads = k.shape[1]
    mask = visibility_mask(q_index, k_index, q_doc, k_doc, sliding_window).unsqueeze(1)
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
    return dq, _reduce_kv_heads(dk, num_kv_heads), _reduce_kv_heads(dv, num_kv_heads)


def block_forward(
    q: Tensor, k: Tensor, v: Tensor, q_index: Tensor, k_index: Tensor, q_doc: Tensor, k_doc: Tensor,
    scaling: float, sliding_window: int | None,
) -> tuple[Tensor, Tensor]:
    """One block through a fused kernel where the device and dtype allow (kernels.py), else the reference."""
    if fused_enabled(q):
        mask = visibility_mask(q_index, k_index, q_doc, k_doc, sliding_window).unsqueeze(1)
        return fused_block_forward(q, k, v, mask, scaling, "masked")
    return attention_block(q, k, v, q_index, k_index, q_doc, k_doc, scaling, sliding_window)


def block_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_index: Tensor, k_index: Tensor,
    q_doc: Tensor, k_doc: Tensor, scaling: float, sliding_window: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    if fused_enabled(q):
        mask = visibility_mask(q_index, k_index, q_doc, k_doc, sliding_window).unsqueeze(1)
        return fused_block_backward(dout, q, k, v, out, lse, mask, scaling, "masked")
    return attention_block_backward(dout, q, k, v, out, lse, q_index, k_index, q_doc, k_doc, scaling, sliding_window)


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets: softmax weights are exp(lse_part - lse_total)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * w_a + out_b * w_b, lse


# Blockwise evaluation. A local block is made of equal pieces (a rank's two zigzag chunks, or 2*u chunks after a
# Ulysses gather); every visible (query piece, key piece) is one or more kernel calls and fully masked pairs are
# skipped. This is what makes the zigzag layout balanced: on each ring step a rank computes about half of a full
# block.
#
# Planning reads token indices and document ids as plain Python numbers, so it runs on host tensors, once per
# batch (AttentionPlans, built with the SPContext in SequenceParallel.prepare); the attention layers only read
# the plans and never synchronise the device with the host.


@dataclass(frozen=True)
class Block:
    """One fused-kernel call: batch rows, query rows and key rows (slices of the local block) and the mask
    kind — 'full', 'causal' (square, top-left aligned) or 'masked' (needs its own [Tq, Tk] mask)."""

    rows: slice
    q: slice
    k: slice
    kind: str


@dataclass
class BlockPlan:
    """The kernel calls of one (query block, key block): every visible (query piece, key piece), and, where a
    piece pair holds several documents, one call per document they share, so packed rows need no mask either.
    Under a sliding window, a document's blocks are cut into tiles: tiles outside the window are skipped, tiles
    inside it need no mask and only tiles on the window's edge get a (tile-sized) mask. Empty: nothing visible."""

    blocks: list[Block] = field(default_factory=list)


# A piece pair holding several documents is split into one kernel call per shared document, unless that would
# mean more than this many calls on a pair whose mask is small anyway (many tiny documents): then one masked call.
MAX_DOCUMENT_CALLS = 32
SMALL_MASK_ELEMENTS = 1 << 22
# Sliding-window tiles are `window` tokens long (then the diagonal tile is causal and one edge tile per query
# tile needs a mask), but never shorter than this, so that small windows do not mean thousands of tiny calls.
MIN_WINDOW_TILE = 128


def _piece_summaries(index: Tensor, doc: Tensor, pieces: int) -> list[tuple[int, int, bool, list[int] | None]]:
    """Per piece: (first index, last index, contiguous ascending run?, its document per row if uniform else None).
    Built from O(T) reductions, so planning never materialises a [Tq, Tk] mask in the common cases."""
    b, t = index.shape
    size = t // pieces
    idx = index.view(b, pieces, size)
    docs = doc.view(b, pieces, size)
    lo, hi = idx[0, :, 0].tolist(), idx[0, :, -1].tolist()
    same_rows = bool((idx == idx[:1]).all())
    steps_ok = (idx[0, :, 1:] - idx[0, :, :-1] == 1).all(dim=-1).tolist() if size > 1 else [True] * pieces
    uniform = (docs == docs[..., :1]).all(dim=-1)  # [B, pieces]
    first_doc = docs[..., 0].transpose(0, 1).tolist()  # [pieces][B]
    uniform_ok = uniform.all(dim=0).tolist()
    return [(lo[p], hi[p], same_rows and steps_ok[p], first_doc[p] if uniform_ok[p] and first_doc[p] is not None
             and min(first_doc[p]) >= 0 else None) for p in range(pieces)]


def _pair_kind(q: tuple, k: tuple, window: int | None) -> str | None:
    """'none' / 'full' / 'causal' from piece summaries when both are contiguous single-document pieces in every
    row; None when the pair needs its elementwise mask."""
    q_lo, q_hi, q_run, q_docs = q
    k_lo, k_hi, k_run, k_docs = k
    if not (q_run and k_run) or q_docs is None or k_docs is None:
        return None
    same = [a == b for a, b in zip(q_docs, k_docs)]
    if not any(same):
        return "none"
    if k_lo > q_hi or (window is not None and q_lo - k_hi >= window):
        return "none"
    if not all(same):
        return None
    # Inside the window when even the farthest (query, key) pair is: q_hi - k_lo < window.
    if window is not None and q_hi - k_lo >= window:
        return None
    if k_hi <= q_lo:
        return "full"
    if (q_lo, q_hi) == (k_lo, k_hi):
        return "causal"
    return None


def plan_blocks(
    q_index: Tensor,
    k_index: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    sliding_window: int | None,
    q_pieces: int,
    k_pieces: int,
) -> BlockPlan:
    """The blocks of q on k. Reads the (host) index and document tensors as Python numbers; see BlockPlan.

    Invariant (tests/test_attention_kernels.py): the blocks cover every visible (query, key) exactly once, a
    'full' block is all visible, a 'causal' block is exactly its lower triangle; no mask of a whole row is built.
    """
    tq, tk = q_index.shape[-1], k_index.shape[-1]
    if tq % q_pieces or tk % k_pieces:
        q_pieces, k_pieces = 1, 1
    qs_size, ks_size = tq // q_pieces, tk // k_pieces
    q_sum = _piece_summaries(q_index, q_doc, q_pieces)
    k_sum = _piece_summaries(k_index, k_doc, k_pieces)
    blocks: list[Block] = []
    every_row = slice(None)
    for i in range(q_pieces):
        qsl = slice(i * qs_size, (i + 1) * qs_size)
        for j in range(k_pieces):
            ksl = slice(j * ks_size, (j + 1) * ks_size)
            kind = _pair_kind(q_sum[i], k_sum[j], sliding_window)
            split = None
            if kind is None and q_sum[i][2] and k_sum[j][2]:
                split = _document_blocks(q_index, k_index, q_doc, k_doc, qsl, ksl, sliding_window)
            if split is not None:
                blocks += split
                continue
            if kind is None:
                # Only this piece pair's mask, and only when the summaries cannot decide.
                mask = visibility_mask(q_index[:, qsl], k_index[:, ksl], q_doc[:, qsl], k_doc[:, ksl], sliding_window)
                kind = "masked" if bool(mask.any()) else "none"
            if kind != "none":
                blocks.append(Block(every_row, qsl, ksl, kind))
    return BlockPlan(blocks)


def _runs(doc: Tensor) -> list[tuple[int, int, int]]:
    """(document, start, stop) of each run of equal document ids in a 1-D tensor."""
    values, counts = torch.unique_consecutive(doc, return_counts=True)
    stops = torch.cumsum(counts, 0).tolist()
    starts = [0] + stops[:-1]
    return list(zip(values.tolist(), starts, stops))


def _document_blocks(q_index: Tensor, k_index: Tensor, q_doc: Tensor, k_doc: Tensor, qsl: slice, ksl: slice,
                     window: int | None) -> list[Block] | None:
    """A piece pair of contiguous ascending pieces (same token indices in every batch row) split into one block
    per document the query and key pieces share, each classified like a piece pair; None when that is not
    worth it or not possible (a document in several runs of one piece), so the caller builds one mask."""
    batch = q_doc.shape[0]
    same_docs = bool((q_doc[:, qsl] == q_doc[:1, qsl]).all()) and bool((k_doc[:, ksl] == k_doc[:1, ksl]).all())
    row_sets = [slice(None)] if same_docs else [slice(b, b + 1) for b in range(batch)]
    q_lo, k_lo = int(q_index[0, qsl.start]), int(k_index[0, ksl.start])
    pending: list[tuple[slice, int, int, int, int, int, str]] = []
    for rows in row_sets:
        b = 0 if rows.start is None else rows.start
        q_runs, k_runs = _runs(q_doc[b, qsl]), _runs(k_doc[b, ksl])
        k_by_doc = {doc: (start, stop) for doc, start, stop in k_runs}
        if len(k_by_doc) < len(k_runs) or len({d for d, _, _ in q_runs}) < len(q_runs):
            return None
        for doc, qa, qb in q_runs:
            if doc not in k_by_doc:
                continue
            ka, kb = k_by_doc[doc]
            summary_q = (q_lo + qa, q_lo + qb - 1, True, [doc])
            summary_k = (k_lo + ka, k_lo + kb - 1, True, [doc])
            kind = _pair_kind(summary_q, summary_k, window) or "masked"
            if kind != "none":
                pending.append((rows, doc, qsl.start + qa, qsl.start + qb, ksl.start + ka, ksl.start + kb, kind))
    size = (qsl.stop - qsl.start) * (ksl.stop - ksl.start)
    if len(pending) > MAX_DOCUMENT_CALLS * len(row_sets) and size <= SMALL_MASK_ELEMENTS:
        return None
    blocks: list[Block] = []
    for rows, doc, qa, qb, ka, kb, kind in pending:
        if kind == "masked" and window is not None:
            # One document, contiguous on both sides: the global index of local row i is known arithmetically.
            blocks += _window_tiles(rows, doc, qa, qb, q_lo - qsl.start, ka, kb, k_lo - ksl.start, window)
        else:
            blocks.append(Block(rows, slice(qa, qb), slice(ka, kb), kind))
    return blocks


def _window_tiles(rows: slice, doc: int, qa: int, qb: int, q_shift: int, ka: int, kb: int, k_shift: int,
                  window: int) -> list[Block]:
    """Tiles of one single-document block under a sliding window. Local query rows [qa, qb) have global indices
    row + q_shift, keys likewise; tiles follow one global grid so that diagonal tiles are square ('causal')."""
    tile = max(window, MIN_WINDOW_TILE)
    blocks = []
    g_q0, g_q1 = qa + q_shift, qb + q_shift  # global [start, stop)
    g_k0, g_k1 = ka + k_shift, kb + k_shift
    for q_start in range(g_q0 - g_q0 % tile, g_q1, tile):
        tq0, tq1 = max(q_start, g_q0), min(q_start + tile, g_q1)
        # Keys any of these queries may see: [tq0 - window + 1, tq1 - 1].
        first_key = max(g_k0, tq0 - window + 1)
        last_key = min(g_k1 - 1, tq1 - 1)
        if first_key > last_key:
            continue
        for k_start in range(first_key - first_key % tile, last_key + 1, tile):
            tk0, tk1 = max(k_start, first_key, g_k0), min(k_start + tile, last_key + 1)
            kind = _pair_kind((tq0, tq1 - 1, True, [doc]), (tk0, tk1 - 1, True, [doc]), window) or "masked"
            if kind != "none":
                blocks.append(Block(rows, slice(tq0 - q_shift, tq1 - q_shift), slice(tk0 - k_shift, tk1 - k_shift),
                                    kind))
    return blocks


@dataclass(frozen=True)
class StepPlan:
    """What one blockwise call needs besides q, k, v: the token indices and documents of its queries and keys
    (on the device, for the masks of 'masked' blocks) and the block plan (computed on the host)."""

    q_index: Tensor
    k_index: Tensor
    q_doc: Tensor
    k_doc: Tensor
    plan: BlockPlan


class AttentionPlans:
    """The block plans of one batch, for every attention layer of the model: planned once on the host.

    `rank_index` / `rank_docs` hold every SP rank's local token indices and documents ([B, T_local] each, in the
    order of `layout.shard_for_sequence_parallel`). `steps(window)` returns the StepPlans of this rank: one per
    ring step for zigzag_ring and hybrid (the key block held at step s is that of ring rank r - s), one for the
    other modes. Plans for a window not given to the constructor are made on first use, still on the host.
    `builds` counts plannings (a test checks that the attention itself never plans).
    """

    def __init__(self, mode: str, sp_rank: int, ulysses_size: int, rank_index: list[Tensor], rank_docs: list[Tensor],
                 device: torch.device, windows: tuple[int | None, ...] = (None,)) -> None:
        self.mode, self.sp_rank, self.ulysses_size = mode, sp_rank, ulysses_size
        self.rank_index = [x.cpu() for x in rank_index]
        self.rank_docs = [x.cpu() for x in rank_docs]
        self.device = device
        self.builds = 0
        self._device_tokens: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
        self._plans: dict[int | None, list[StepPlan]] = {}
        for window in windows:
            self.steps(window)

    def _tokens(self, ranks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Host (index, docs) of these ranks' tokens, concatenated rank-major (the order of a gather)."""
        return (torch.cat([self.rank_index[r] for r in ranks], dim=-1),
                torch.cat([self.rank_docs[r] for r in ranks], dim=-1))

    def _on_device(self, ranks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        if ranks not in self._device_tokens:
            index, docs = self._tokens(ranks)
            self._device_tokens[ranks] = (index.to(self.device), docs.to(self.device))
        return self._device_tokens[ranks]

    def _step(self, q_ranks: tuple[int, ...], k_ranks: tuple[int, ...], window: int | None) -> StepPlan:
        (q_index, q_doc), (k_index, k_doc) = self._tokens(q_ranks), self._tokens(k_ranks)
        plan = plan_blocks(q_index, k_index, q_doc, k_doc, window, 2 * len(q_ranks), 2 * len(k_ranks))
        (qi, qd), (ki, kd) = self._on_device(q_ranks), self._on_device(k_ranks)
        return StepPlan(qi, ki, qd, kd, plan)

    def steps(self, window: int | None) -> list[StepPlan]:
        if window in self._plans:
            return self._plans[window]
        self.builds += 1
        n, me = len(self.rank_index), self.sp_rank
        everyone = tuple(range(n))
        if n == 1:
            steps = [self._step((0,), (0,), window)]
        elif self.mode == "zigzag_ring":
            steps = [self._step((me,), ((me - s) % n,), window) for s in range(n)]
        elif self.mode == "ulysses":
            steps = [self._step(everyone, everyone, window)]
        elif self.mode == "llama3":
            steps = [self._step((me,), everyone, window)]
        else:  # hybrid: Ulysses groups of u consecutive ranks, the ring runs over the groups
            u = self.ulysses_size
            groups = n // u
            group = lambda g: tuple(range(g * u, (g + 1) * u))  # noqa: E731
            mine = me // u
            steps = [self._step(group(mine), group((mine - s) % groups), window) for s in range(groups)]
        self._plans[window] = steps
        return steps


def blockwise_forward(
    q: Tensor, k: Tensor, v: Tensor, step: StepPlan, scaling: float, sliding_window: int | None
) -> tuple[Tensor, Tensor]:
    """Output and lse of q on (k, v) following `step`'s plan, merged by lse per query row; rows the plan skips get
    0 and -inf. Each block goes through the fused kernel where the device and dtype allow, else the reference
    kernel, which builds the block's own mask (block-sized: a document run or a window tile, never the row)."""
    b, h, tq, d = q.shape
    dtype = compute_dtype(q.dtype)
    out = q.new_zeros(b, h, tq, d, dtype=dtype)
    lse = q.new_full((b, h, tq), float("-inf"), dtype=dtype)
    fused = fused_enabled(q)
    for block in step.plan.blocks:
        rows, qsl, ksl = block.rows, block.q, block.k
        qb, kb, vb = q[rows, :, qsl], k[rows, :, ksl], v[rows, :, ksl]
        qi, ki, qd, kd = step.q_index[rows, qsl], step.k_index[rows, ksl], step.q_doc[rows, qsl], step.k_doc[rows, ksl]
        if fused:
            mask = visibility_mask(qi, ki, qd, kd, sliding_window).unsqueeze(1) if block.kind == "masked" else None
            part_out, part_lse = fused_block_forward(qb, kb, vb, mask, scaling, block.kind)
        else:
            part_out, part_lse = attention_block(qb, kb, vb, qi, ki, qd, kd, scaling, sliding_window)
        out[rows, :, qsl], lse[rows, :, qsl] = merge_partials(out[rows, :, qsl], lse[rows, :, qsl], part_out,
                                                              part_lse)
    return out, lse


def blockwise_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, step: StepPlan,
    scaling: float, sliding_window: int | None, dq: Tensor, dk: Tensor, dv: Tensor,
) -> None:
    """Add the gradients of `step`'s blocks into dq, dk, dv (compute dtype, same shapes as q, k, v), each block
    recomputed against the final out/lse of its queries."""
    fused = fused_enabled(q)
    for block in step.plan.blocks:
        rows, qsl, ksl = block.rows, block.q, block.k
        args = (dout[rows, :, qsl], q[rows, :, qsl], k[rows, :, ksl], v[rows, :, ksl], out[rows, :, qsl],
                lse[rows, :, qsl])
        qi, ki, qd, kd = step.q_index[rows, qsl], step.k_index[rows, ksl], step.q_doc[rows, qsl], step.k_doc[rows, ksl]
        if fused:
            mask = visibility_mask(qi, ki, qd, kd, sliding_window).unsqueeze(1) if block.kind == "masked" else None
            part_dq, part_dk, part_dv = fused_block_backward(*args, mask, scaling, block.kind)
        else:
            part_dq, part_dk, part_dv = attention_block_backward(*args, qi, ki, qd, kd, scaling, sliding_window)
        dq[rows, :, qsl] += part_dq
        dk[rows, :, ksl] += part_dk
        dv[rows, :, ksl] += part_dv


class LocalBlockAttention(torch.autograd.Function):
    """Blockwise attention of all local queries on all given keys, with a recomputing backward.

    Only q, k, v, the output and the lse are kept for backward (no [Tq, Tk] probabilities). Used by the sp=1 and
    Ulysses paths; `step` is the batch's precomputed plan.
    """

    @staticmethod
    def forward(ctx, q, k, v, step, scaling, sliding_window):
        out, lse = blockwise_forward(q, k, v, step, scaling, sliding_window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scaling, ctx.sliding_window, ctx.step = scaling, sliding_window, step
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dtype = compute_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=dtype)
        dk = torch.zeros_like(k, dtype=dtype)
        dv = torch.zeros_like(v, dtype=dtype)
        blockwise_backward(dout, q, k, v, out, lse, ctx.step, ctx.scaling, ctx.sliding_window, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, seq_index: Tensor, doc_ids: Tensor, scaling: float,
    sliding_window: int | None,
) -> Tensor:
    """Single-process attention on a whole row, differentiated by plain autograd: the parity reference."""
    out, _ = attention_block(q, k, v, seq_index, seq_index, doc_ids, doc_ids, scaling, sliding_window)
    return out.to(q.dtype)
