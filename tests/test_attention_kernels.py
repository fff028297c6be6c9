"""Fused block kernels (kernels.py) against the reference: per-block, and the zigzag split + log-sum-exp merge
against one unsplit kernel call. The CUDA cases run where a GPU is present (bf16 <= 2e-3 relative, fp32 <= 1e-5)
and are skipped elsewhere; the CPU cases always run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longtune.parallel.attention.blockwise import AttentionParams, block_backward, block_forward
from longtune.parallel.attention.math_kernel import (
    BlockTokens,
    attention_block,
    attention_block_backward,
    merge_partials,
    visibility_mask,
)
from longtune.parallel.attention.kernels import fused_block_backward, fused_block_forward
from longtune.parallel.layout import local_token_index

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _docs(lengths: list[int], device) -> torch.Tensor:
    return torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]).unsqueeze(0).to(device)


@pytest.mark.parametrize("case", ["causal", "packed", "window"])
def test_fused_block_equals_reference_block_cpu_float64(case):
    """One query block against one key block of another chunk, with the final out/lse of a merged softmax."""
    g = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 12, 8
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    keys = [torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64) for _ in range(2)]
    values = [torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64) for _ in range(2)]
    q_index = (torch.arange(t) + t).expand(b, -1)
    k_indices = [torch.arange(t).expand(b, -1), (torch.arange(t) + t).expand(b, -1)]
    lengths = {"causal": [2 * t], "packed": [5, 9, 2 * t - 14], "window": [7, 2 * t - 7]}[case]
    docs = _docs(lengths, "cpu").expand(b, -1)
    q_doc, k_docs = docs[:, t:], [docs[:, :t], docs[:, t:]]
    window = 4 if case == "window" else None
    parts = [attention_block(q, k, v, BlockTokens(q_index, ki, q_doc, kd), 0.3, window)
             for k, v, ki, kd in zip(keys, values, k_indices, k_docs)]
    out, lse = merge_partials(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for k, v, ki, kd in zip(keys, values, k_indices, k_docs):
        mask = visibility_mask(q_index, ki, q_doc, kd, window).unsqueeze(1)
        ref_out, ref_lse = attention_block(q, k, v, BlockTokens(q_index, ki, q_doc, kd), 0.3, window)
        got_out, got_lse = fused_block_forward(q, k, v, mask, 0.3)
        assert (got_out - ref_out).abs().max() <= 1e-12
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(got_lse))
        assert (got_lse[finite] - ref_lse[finite]).abs().max() <= 1e-12
        ref_grads = attention_block_backward(dout, q, k, v, out, lse, BlockTokens(q_index, ki, q_doc, kd), 0.3, window)
        got_grads = fused_block_backward(dout, q, k, v, out, lse, mask, 0.3)
        for ref, got in zip(ref_grads, got_grads):
            assert (ref - got).abs().max() <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("packed", [False, True])
def test_zigzag_blocks_merged_equal_unsplit_kernel(device, dtype, packed):
    """Split one sequence into the zigzag blocks of sp=4, run every (query shard, key shard) block through the
    fused kernels and merge by lse; compare output and gradients with one unsplit SDPA call."""
    sp, b, h, hkv, d = 4, 1, 8, 2, 64
    t = 512 if device == "cuda" else 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, t, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, t, d, generator=g).to(device, dtype)
    dout = torch.randn(b, h, t, d, generator=g).to(device, dtype)
    index = torch.arange(t, device=device).unsqueeze(0)
    docs = _docs([t // 3, t // 4, t - t // 3 - t // 4], device) if packed else torch.zeros(1, t, dtype=torch.long,
                                                                                            device=device)
    scale = d**-0.5

    # Unsplit reference: one SDPA call with the causal (+ document) mask, autograd for gradients.
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    mask = visibility_mask(index, index, docs, docs, None).unsqueeze(1)
    ref = F.scaled_dot_product_attention(qr, kr.repeat_interleave(h // hkv, 1), vr.repeat_interleave(h // hkv, 1),
                                         attn_mask=mask, scale=scale)
    ref.backward(dout)

    shards = [local_token_index(t, sp, r).to(device) for r in range(sp)]
    out = torch.zeros(b, h, t, d, device=device, dtype=torch.float32)
    dq = torch.zeros_like(out)
    dk = torch.zeros(b, hkv, t, d, device=device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    for qs in shards:
        qi, qd = index[:, qs], docs[:, qs]
        o = torch.zeros(b, h, len(qs), d, device=device, dtype=torch.float32)
        lse = torch.full((b, h, len(qs)), float("-inf"), device=device)
        for ks in shards:
            po, pl = block_forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], BlockTokens(qi, index[:, ks], qd, docs[:, ks]),
                                   AttentionParams(scale))
            o, lse = merge_partials(o, lse, po, pl)
        out[:, :, qs] = o
        for ks in shards:
            gq, gk, gv = block_backward(dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], o, lse,
                                        BlockTokens(qi, index[:, ks], qd, docs[:, ks]), AttentionParams(scale))
            dq[:, :, qs] += gq
            dk[:, :, ks] += gk
            dv[:, :, ks] += gv
    # float64 truth on the same (rounded) inputs, to judge bf16 gradients against the unsplit kernel's own error
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    truth = F.scaled_dot_product_attention(q64, k64.repeat_interleave(h // hkv, 1), v64.repeat_interleave(h // hkv, 1),
                                           attn_mask=mask, scale=scale)
    truth.backward(dout.double())
    triples = (("out", out, ref, truth), ("dq", dq, qr.grad, q64.grad), ("dk", dk, kr.grad, k64.grad),
               ("dv", dv, vr.grad, v64.grad))
    for name, got, want, exact in triples:
        want, exact = want.detach().float(), exact.detach().float()
        if dtype == torch.bfloat16:
            # Both sides round to bf16 (epsilon 2^-8) per element: compare whole-tensor relative errors. The
            # output must agree to 2e-3; a gradient must be no further from the float64 truth than the unsplit
            # bf16 kernel's own gradient is (plus 2e-3).
            err = float((got - want).norm() / want.norm())
            if name == "out":
                assert err <= 2e-3, (name, err)
            else:
                ours = float((got - exact).norm() / exact.norm())
                theirs = float((want - exact).norm() / exact.norm())
                assert ours <= theirs + 2e-3, (name, ours, theirs)
        else:
            err = float((got - want).abs().max() / want.abs().max())
            assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [None, 3])
def test_block_plan_kinds_agree_with_elementwise_masks(seed, window):
    """The planner classifies piece pairs from O(T) summaries; every classification must match the mask."""
    g = torch.Generator().manual_seed(seed)
    sp = 2 + seed % 3
    t = 2 * sp * 6
    docs = torch.zeros(2, t, dtype=torch.long)
    for row in range(2):
        cuts = sorted(torch.randint(1, t, (seed % 3,), generator=g).tolist())
        for c in cuts:
            docs[row, c:] += 1
        docs[row, t - int(torch.randint(0, 5, (1,), generator=g)):] = -1  # padding tail
    checked_zigzag_plans(docs, sp, window)


def checked_zigzag_plans(docs: torch.Tensor, sp: int, window: int | None) -> list:
    """The plans of every (query rank, key rank) pair of a zigzag layout of `docs`, each checked against the
    elementwise mask: 'full' and 'causal' blocks are exactly that, masked blocks see something, and the blocks
    cover every visible (query, key) exactly once and nothing else."""
    from longtune.parallel.attention.planner import plan_blocks

    t = docs.shape[1]
    plans = []
    for q_rank in range(sp):
        for k_rank in range(sp):
            qi = local_token_index(t, sp, q_rank).expand(2, -1)
            ki = local_token_index(t, sp, k_rank).expand(2, -1)
            qd, kd = docs.gather(1, qi), docs.gather(1, ki)
            plan = plan_blocks(BlockTokens(qi, ki, qd, kd), window, 2, 2)
            full_mask = visibility_mask(qi, ki, qd, kd, window)
            covered = torch.zeros(full_mask.shape, dtype=torch.long)
            for block in plan.blocks:
                rows, qs, ks = block.rows, block.q, block.k
                mask = visibility_mask(qi[rows, qs], ki[rows, ks], qd[rows, qs], kd[rows, ks], window)
                if block.kind == "full":
                    assert mask.all()
                elif block.kind == "causal":
                    assert torch.equal(mask, torch.ones_like(mask[0]).tril().expand_as(mask))
                else:
                    assert block.kind == "masked" and mask.any()
                covered[rows, qs, ks] += mask.long()
            assert torch.equal(covered, full_mask.long())
            plans.append(plan)
    return plans


def _zigzag_plan(docs: torch.Tensor, sp: int, q_rank: int, k_rank: int):
    from longtune.parallel.attention.planner import plan_blocks

    t = docs.shape[-1]
    qi = local_token_index(t, sp, q_rank).expand(docs.shape[0], -1)
    ki = local_token_index(t, sp, k_rank).expand(docs.shape[0], -1)
    return plan_blocks(BlockTokens(qi, ki, docs.gather(1, qi), docs.gather(1, ki)), None, 2, 2)


def test_packed_rows_of_long_documents_need_no_mask():
    """A few long documents per piece: one kernel call per shared document, each full or causal, so no
    [Tq, Tk] mask is built however long the pieces are."""
    t, sp = 8192, 2
    docs = torch.zeros(1, t, dtype=torch.long)
    for cut in (700, 2900, 3000, 6100):
        docs[:, cut:] += 1
    kinds = [b.kind for q in range(sp) for k in range(sp) for b in _zigzag_plan(docs, sp, q, k).blocks]
    assert kinds and set(kinds) <= {"full", "causal"}
    # One causal call per (zigzag chunk, document in it): the diagonal of each document run.
    chunks = docs.view(2 * sp, t // (2 * sp))
    assert kinds.count("causal") == sum(len(torch.unique(c)) for c in chunks) == 8


def test_many_tiny_documents_fall_back_to_one_mask_per_piece_pair():
    t, sp = 2048, 2
    docs = (torch.arange(t) // 7).unsqueeze(0)  # 293 documents of 7 tokens
    plan = _zigzag_plan(docs, sp, 0, 0)
    assert 1 <= len(plan.blocks) <= 4 and {b.kind for b in plan.blocks} == {"masked"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["full", "causal", "masked"])
def test_cuda_kernel_calls_check_on_meta_tensors(dtype, kind):
    """Without a GPU: meta tensors take the CUDA branch (flash for bf16 full/causal, memory-efficient otherwise),
    so each aten call's schema is checked and our handling of its outputs (lse padding, GQA head reduction,
    dtypes) is checked for shapes."""
    b, hq, hkv, tq, d = 2, 4, 2, 100, 64
    tk = tq if kind == "causal" else 150
    q = torch.empty(b, hq, tq, d, dtype=dtype, device="meta")
    k = torch.empty(b, hkv, tk, d, dtype=dtype, device="meta")
    v = torch.empty(b, hkv, tk, d, dtype=dtype, device="meta")
    mask = torch.empty(b, 1, tq, tk, dtype=torch.bool, device="meta") if kind == "masked" else None
    out, lse = fused_block_forward(q, k, v, mask, 0.125, kind)
    assert out.shape == (b, hq, tq, d) and lse.shape == (b, hq, tq)
    assert out.dtype == lse.dtype == torch.float32
    dq, dk, dv = fused_block_backward(torch.empty_like(q), q, k, v, out, lse, mask, 0.125, kind)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == torch.float32


def test_flash_backward_call_is_dense_with_the_forwards_rng_layout():
    """The flash backward gets undefined cum_seq_q/k (a defined tensor, even empty, selects the varlen kernel:
    "batch size must be positive" on every bf16 SP run), the block lengths, and an rng pair laid out like the
    one the flash forward returns; the call passes the meta kernel's schema and shape checks."""
    from longtune.parallel.attention.kernels import flash_backward_args

    b, h, tq, tk, d = 2, 4, 48, 80, 64
    q = torch.empty(b, h, tq, d, dtype=torch.bfloat16, device="meta")
    k = torch.empty(b, h, tk, d, dtype=torch.bfloat16, device="meta")
    forward = torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, False, False, scale=0.125)
    out, lse, rng_state, unused = forward[0], forward[1], forward[6], forward[7]
    args, kwargs = flash_backward_args(torch.empty_like(q), q, k, k, out, lse, False, 0.125)
    cum_q, cum_k, max_q, max_k, seed, offset = args[6], args[7], args[8], args[9], args[12], args[13]
    assert cum_q is None and cum_k is None and (max_q, max_k) == (tq, tk)
    assert (seed.dtype, seed.shape, offset.dtype, offset.shape) == (rng_state.dtype, rng_state.shape,
                                                                    unused.dtype, unused.shape)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(*args, **kwargs)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


@pytest.mark.parametrize("head_dim,flash", [(64, True), (256, True), (36, False), (320, False)])
def test_flash_head_dim_guard_on_meta(head_dim, flash):
    """Flash takes head dims that are multiples of 8 up to 256; others take the memory-efficient kernel with a
    zero-padded head dim, and the results come back on the real head dim."""
    from longtune.parallel.attention.kernels import uses_flash

    b, hq, hkv, t = 1, 4, 2, 40
    q = torch.empty(b, hq, t, head_dim, dtype=torch.bfloat16, device="meta")
    kv = torch.empty(b, hkv, t, head_dim, dtype=torch.bfloat16, device="meta")
    assert uses_flash(q, "causal") is flash and not uses_flash(q.float(), "causal")
    out, lse = fused_block_forward(q, kv, kv, None, 0.1, "causal")
    dq, dk, dv = fused_block_backward(torch.empty_like(q), q, kv, kv, out, lse, None, 0.1, "causal")
    assert out.shape == dq.shape == q.shape and dk.shape == dv.shape == kv.shape


def _float64_block_reference(q, k, v, dout, mask, scaling):
    """Autograd float64 attention of one block (the block's own softmax) on the low-precision inputs' values."""
    leaves = [x.detach().double().cpu().requires_grad_(True) for x in (q, k, v)]
    rep = q.shape[1] // k.shape[1]
    scores = leaves[0] @ leaves[1].repeat_interleave(rep, 1).transpose(-1, -2) * scaling
    scores = scores.masked_fill(~mask.cpu(), float("-inf"))
    out = torch.softmax(scores, -1) @ leaves[2].repeat_interleave(rep, 1)
    out.backward(dout.double().cpu())
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128, 256, 36])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["full", "causal", "masked"])
def test_cuda_fused_block_matches_float64(head_dim, dtype, kind):
    """Flash / memory-efficient forward + backward of one GQA block against float64 on the same inputs."""
    from longtune.parallel.attention.kernels import flash_rng_state, uses_flash

    b, hq, hkv, tq = 2, 8, 2, 192
    tk = tq if kind == "causal" else 256
    g = torch.Generator().manual_seed(head_dim)
    q, dout = (torch.randn(b, hq, tq, head_dim, generator=g).to("cuda", dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, tk, head_dim, generator=g).to("cuda", dtype) for _ in range(2))
    if kind == "full":
        mask = torch.ones(b, 1, tq, tk, dtype=torch.bool, device="cuda")
    elif kind == "causal":
        mask = torch.ones(tq, tk, dtype=torch.bool, device="cuda").tril().expand(b, 1, tq, tk)
    else:
        docs_q = (torch.arange(tq, device="cuda") // 50).expand(b, -1)
        docs_k = (torch.arange(tk, device="cuda") // 70).expand(b, -1)
        mask = (docs_q.unsqueeze(-1) == docs_k.unsqueeze(-2)).unsqueeze(1)
    scaling = head_dim**-0.5
    out, lse = fused_block_forward(q, k, v, mask if kind == "masked" else None, scaling, kind)
    grads = fused_block_backward(dout, q, k, v, out, lse, mask if kind == "masked" else None, scaling, kind)
    want_out, want_grads = _float64_block_reference(q, k, v, dout, mask, scaling)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, got, want in [("out", out, want_out), *zip(("dq", "dk", "dv"), grads, want_grads)]:
        err = float((got.double().cpu() - want).norm() / want.norm())
        assert err <= tol, (name, err)
    if uses_flash(q, kind):
        forward = torch.ops.aten._scaled_dot_product_flash_attention(q, k.repeat_interleave(4, 1),
                                                                     v.repeat_interleave(4, 1), 0.0, False, False)
        seed, offset = flash_rng_state(q.device)
        assert (seed.dtype, seed.shape, offset.dtype, offset.shape) == (forward[6].dtype, forward[6].shape,
                                                                        forward[7].dtype, forward[7].shape)


def _mask_elements(plan) -> list[int]:
    return [(b.q.stop - b.q.start) * (b.k.stop - b.k.start) for b in plan.blocks if b.kind == "masked"]


@pytest.mark.parametrize("sp", [1, 2, 4])
def test_sliding_window_plan_builds_no_row_sized_mask(sp):
    """A long document under a sliding window: blocks outside the window are skipped, blocks inside it need no
    mask, and only tiles on the window's edge get one, each at most tile x tile (tile = the window here), in
    all O(T * window) elements instead of O(T^2)."""
    from longtune.parallel.attention.planner import MIN_WINDOW_TILE, plan_blocks

    t, window = 8192, 300
    assert window >= MIN_WINDOW_TILE
    docs = torch.zeros(1, t, dtype=torch.long)
    docs[:, 5000:] = 1
    index = [local_token_index(t, sp, r).unsqueeze(0) for r in range(sp)]
    total = 0
    for q_rank in range(sp):
        for k_rank in range(sp):
            qi, ki = index[q_rank], index[k_rank]
            plan = plan_blocks(BlockTokens(qi, ki, docs.gather(1, qi), docs.gather(1, ki)), window, 2, 2)
            sizes = _mask_elements(plan)
            assert all(size <= window * window for size in sizes), max(sizes)
            total += sum(sizes)
            assert {b.kind for b in plan.blocks} <= {"full", "causal", "masked"}
    assert 0 < total <= 2 * t * window


@pytest.mark.parametrize("sp,window", [(1, 150), (2, 130), (3, 200)])
def test_windowed_tiles_cover_the_mask_exactly(sp, window):
    """Tiled sliding-window plans (documents long enough to be tiled) cover every visible pair exactly once."""
    t = 2 * sp * 160
    docs = torch.zeros(2, t, dtype=torch.long)
    docs[0, 411:] = 1
    docs[1, t - 13:] = -1
    for plan in checked_zigzag_plans(docs, sp, window):
        assert all(size <= max(window, 128) ** 2 for size in _mask_elements(plan))
