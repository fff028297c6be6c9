"""The block planner: which fused-kernel calls one attention step makes, decided once per batch on the host.

A local block is made of equal pieces (a rank's two zigzag chunks, or 2*u chunks after a Ulysses gather); every
visible (query piece, key piece) is one or more kernel calls and fully masked pairs are skipped. This is what
makes the zigzag layout balanced: on each ring step a rank computes about half of a full block.

Invariant of every plan (`plan_blocks`, hence `AttentionPlans`; checked by tests/test_attention_kernels.py):
the blocks cover every visible (query, key) pair exactly once and no invisible one; a 'full' block is all
visible, a 'causal' block is exactly its (square, top-left aligned) lower triangle, a 'masked' block has at least
one visible pair and builds its own block-sized mask; no mask of a whole row is ever built.

Planning reads token indices and document ids as plain Python numbers, so it runs on host tensors, once per
batch (AttentionPlans, built with the SPContext in SequenceParallel.prepare); the attention layers only read
the plans and never synchronise the device with the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from longtune.parallel.attention.math_kernel import BlockTokens


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


class PieceSummary(NamedTuple):
    """What the planner knows of one piece without a mask: its first and last global token index, whether it is
    one contiguous ascending run (the same in every batch row), and its document per batch row when the piece
    holds a single (non-padding) document in every row, else None."""

    first: int
    last: int
    contiguous: bool
    docs: list[int] | None


class DocumentPair(NamedTuple):
    """One document shared by a query piece and a key piece: local [start, stop) rows on each side."""

    rows: slice
    doc: int
    q: slice
    k: slice
    kind: str


# A piece pair holding several documents is split into one kernel call per shared document, unless that would
# mean more than this many calls on a pair whose mask is small anyway (many tiny documents): then one masked call.
MAX_DOCUMENT_CALLS = 32
SMALL_MASK_ELEMENTS = 1 << 22
# Sliding-window tiles are `window` tokens long (then the diagonal tile is causal and one edge tile per query
# tile needs a mask), but never shorter than this, so that small windows do not mean thousands of tiny calls.
MIN_WINDOW_TILE = 128


def _piece_summaries(index: Tensor, doc: Tensor, pieces: int) -> list[PieceSummary]:
    """One summary per piece, built from O(T) reductions, so planning never materialises a [Tq, Tk] mask in the
    common cases."""
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
    return [PieceSummary(lo[p], hi[p], same_rows and steps_ok[p],
                         first_doc[p] if uniform_ok[p] and first_doc[p] is not None and min(first_doc[p]) >= 0
                         else None)
            for p in range(pieces)]


def _pair_kind(q: PieceSummary, k: PieceSummary, window: int | None) -> str | None:
    """'none' / 'full' / 'causal' from piece summaries when both are contiguous single-document pieces in every
    row; None when the pair needs its elementwise mask."""
    if not (q.contiguous and k.contiguous) or q.docs is None or k.docs is None:
        return None
    same = [a == b for a, b in zip(q.docs, k.docs)]
    if not any(same):
        return "none"
    if k.first > q.last or (window is not None and q.first - k.last >= window):
        return "none"
    if not all(same):
        return None
    # Inside the window when even the farthest (query, key) pair is: q.last - k.first < window.
    if window is not None and q.last - k.first >= window:
        return None
    if k.last <= q.first:
        return "full"
    if (q.first, q.last) == (k.first, k.last):
        return "causal"
    return None


def plan_blocks(tokens: BlockTokens, sliding_window: int | None, q_pieces: int, k_pieces: int) -> BlockPlan:
    """The blocks of the queries on the keys of `tokens` (host tensors, read as Python numbers); see BlockPlan.

    The query side is cut into `q_pieces` equal pieces and the key side into `k_pieces` (both 1 when they do not
    divide). The result satisfies the module's invariant: every visible (query, key) covered exactly once, 'full'
    blocks all visible, 'causal' blocks exactly their lower triangle, no row-sized mask.
    """
    tq, tk = tokens.q_index.shape[-1], tokens.k_index.shape[-1]
    if tq % q_pieces or tk % k_pieces:
        q_pieces, k_pieces = 1, 1
    qs_size, ks_size = tq // q_pieces, tk // k_pieces
    q_sum = _piece_summaries(tokens.q_index, tokens.q_doc, q_pieces)
    k_sum = _piece_summaries(tokens.k_index, tokens.k_doc, k_pieces)
    blocks: list[Block] = []
    every_row = slice(None)
    for i in range(q_pieces):
        qsl = slice(i * qs_size, (i + 1) * qs_size)
        for j in range(k_pieces):
            ksl = slice(j * ks_size, (j + 1) * ks_size)
            kind = _pair_kind(q_sum[i], k_sum[j], sliding_window)
            split = None
            if kind is None and q_sum[i].contiguous and k_sum[j].contiguous:
                split = _document_blocks(tokens, qsl, ksl, sliding_window)
            if split is not None:
                blocks += split
                continue
            if kind is None:
                # Only this piece pair's mask, and only when the summaries cannot decide.
                mask = tokens.select(every_row, qsl, ksl).visibility(sliding_window)
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


def _document_blocks(tokens: BlockTokens, qsl: slice, ksl: slice, window: int | None) -> list[Block] | None:
    """A piece pair of contiguous ascending pieces (same token indices in every batch row) split into one block
    per document the query and key pieces share, each classified like a piece pair; None when that is not
    worth it or not possible (a document in several runs of one piece), so the caller builds one mask."""
    q_doc, k_doc = tokens.q_doc, tokens.k_doc
    batch = q_doc.shape[0]
    same_docs = bool((q_doc[:, qsl] == q_doc[:1, qsl]).all()) and bool((k_doc[:, ksl] == k_doc[:1, ksl]).all())
    row_sets = [slice(None)] if same_docs else [slice(b, b + 1) for b in range(batch)]
    q_lo, k_lo = int(tokens.q_index[0, qsl.start]), int(tokens.k_index[0, ksl.start])
    pending: list[DocumentPair] = []
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
            summary_q = PieceSummary(q_lo + qa, q_lo + qb - 1, True, [doc])
            summary_k = PieceSummary(k_lo + ka, k_lo + kb - 1, True, [doc])
            kind = _pair_kind(summary_q, summary_k, window) or "masked"
            if kind != "none":
                pending.append(DocumentPair(rows, doc, slice(qsl.start + qa, qsl.start + qb),
                                            slice(ksl.start + ka, ksl.start + kb), kind))
    size = (qsl.stop - qsl.start) * (ksl.stop - ksl.start)
    if len(pending) > MAX_DOCUMENT_CALLS * len(row_sets) and size <= SMALL_MASK_ELEMENTS:
        return None
    blocks: list[Block] = []
    for pair in pending:
        if pair.kind == "masked" and window is not None:
            # One document, contiguous on both sides: the global index of local row i is known arithmetically.
            blocks += _window_tiles(pair, q_lo - qsl.start, k_lo - ksl.start, window)
        else:
            blocks.append(Block(pair.rows, pair.q, pair.k, pair.kind))
    return blocks


def _window_tiles(pair: DocumentPair, q_shift: int, k_shift: int, window: int) -> list[Block]:
    """Tiles of one single-document block under a sliding window. Local query row i has global index
    i + q_shift, keys likewise; tiles follow one global grid so that diagonal tiles are square ('causal')."""
    tile = max(window, MIN_WINDOW_TILE)
    blocks = []
    g_q0, g_q1 = pair.q.start + q_shift, pair.q.stop + q_shift  # global [start, stop)
    g_k0, g_k1 = pair.k.start + k_shift, pair.k.stop + k_shift
    for q_start in range(g_q0 - g_q0 % tile, g_q1, tile):
        tq0, tq1 = max(q_start, g_q0), min(q_start + tile, g_q1)
        # Keys any of these queries may see: [tq0 - window + 1, tq1 - 1].
        first_key = max(g_k0, tq0 - window + 1)
        last_key = min(g_k1 - 1, tq1 - 1)
        if first_key > last_key:
            continue
        for k_start in range(first_key - first_key % tile, last_key + 1, tile):
            tk0, tk1 = max(k_start, first_key, g_k0), min(k_start + tile, last_key + 1)
            kind = _pair_kind(PieceSummary(tq0, tq1 - 1, True, [pair.doc]),
                              PieceSummary(tk0, tk1 - 1, True, [pair.doc]), window) or "masked"
            if kind != "none":
                blocks.append(Block(pair.rows, slice(tq0 - q_shift, tq1 - q_shift),
                                    slice(tk0 - k_shift, tk1 - k_shift), kind))
    return blocks


@dataclass(frozen=True)
class StepPlan:
    """What one blockwise call needs besides q, k, v: the token indices and documents of its queries and keys
    (on the device, for the masks of 'masked' blocks) and the block plan (computed on the host)."""

    tokens: BlockTokens
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
        plan = plan_blocks(BlockTokens(q_index, k_index, q_doc, k_doc), window, 2 * len(q_ranks), 2 * len(k_ranks))
        (qi, qd), (ki, kd) = self._on_device(q_ranks), self._on_device(k_ranks)
        return StepPlan(BlockTokens(qi, ki, qd, kd), plan)

    def steps(self, window: int | None) -> list[StepPlan]:
        if window in self._plans:
            return self._plans[window]
        self.builds += 1
        n, me = len(self.rank_index), self.sp_rank
        every_rank = tuple(range(n))
        if n == 1:
            steps = [self._step((0,), (0,), window)]
        elif self.mode == "zigzag_ring":
            steps = [self._step((me,), ((me - s) % n,), window) for s in range(n)]
        elif self.mode == "ulysses":
            steps = [self._step(every_rank, every_rank, window)]
        elif self.mode == "llama3":
            steps = [self._step((me,), every_rank, window)]
        else:  # hybrid: Ulysses groups of u consecutive ranks, the ring runs over the groups
            u = self.ulysses_size
            groups = n // u
            mine = me // u

            def group(g: int) -> tuple[int, ...]:
                return tuple(range(g * u, (g + 1) * u))

            steps = [self._step(group(mine), group((mine - s) % groups), window) for s in range(groups)]
        self._plans[window] = steps
        return steps
