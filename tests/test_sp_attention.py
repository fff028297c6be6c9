"""Sequence-parallel attention: every mode, sharded by the zigzag layout on gloo ranks, must reproduce the
single-process reference (output and dQ/dK/dV) to 1e-10 in float64, with packing, padding, GQA and windows.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longtune.parallel.attention import (
    ATTENTION_NAME,
    AttentionParams,
    BlockTokens,
    SPContext,
    attention_block,
    attention_block_backward,
    check_ulysses_heads,
    choose_ulysses_size,
    hybrid_group_ranks,
    make_hybrid_groups,
    merge_partials,
    reference_attention,
    register_sp_attention,
    sp_attention_forward,
)
from longtune.parallel.layout import (
    PAD_DOCUMENT,
    local_token_index,
    pad_row_tensors,
    shard_for_sequence_parallel,
    unshard,
)
from tests.distributed_utils import run_distributed

TOLERANCE = 1e-10
BATCH, HEADS, HEAD_DIM = 2, 4, 8
WORLD = 4

# name -> (document lengths per row (each row sums to the original length), kv heads, sliding window)
CASES = {
    "causal": ([[13], [13]], 2, None),
    "packed": ([[10, 12, 7], [4, 25]], 2, None),
    "window": ([[10, 12, 7], [29]], 2, 5),
    "mqa_packed": ([[6, 5, 2], [9, 4]], 1, None),
}
# (mode, sp, ulysses_size); sp=2 runs on two SP groups {0,1} and {2,3} of the 4-rank world (dp=2).
SETUPS = [
    ("zigzag_ring", 2, 1),
    ("zigzag_ring", 4, 1),
    ("ulysses", 2, 2),
    ("ulysses", 4, 4),
    ("llama3", 2, 1),
    ("llama3", 4, 1),
    ("hybrid", 4, 2),
    ("hybrid", 2, 1),
]



def gather_unsharded(x: torch.Tensor, dim: int, sp: int, group) -> torch.Tensor:
    """Every SP rank's zigzag shard of `x` gathered and put back in sequence order along `dim`."""
    parts = [torch.empty_like(x) for _ in range(sp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return unshard(parts, sp, dim=dim)

def _doc_ids(doc_lengths: list[list[int]]) -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]) for lengths in doc_lengths]
    return torch.stack(rows)


def _case_tensors(name: str, sp: int, seed: int):
    """Full padded row data for one case: q, k, v [B, H, T, D], upstream grad [B, T, Hq, D], docs [B, T]."""
    doc_lengths, kv_heads, window = CASES[name]
    docs = _doc_ids(doc_lengths)
    length = docs.shape[1]
    ids = torch.zeros_like(docs)
    positions = torch.arange(length).expand(BATCH, -1)
    _, _, _, padded_docs = pad_row_tensors(ids, ids, positions, docs, sp, pad_token_id=0)
    padded = padded_docs.shape[1]
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q = rand(BATCH, HEADS, padded, HEAD_DIM)
    k = rand(BATCH, kv_heads, padded, HEAD_DIM)
    v = rand(BATCH, kv_heads, padded, HEAD_DIM)
    dout = rand(BATCH, padded, HEADS, HEAD_DIM)
    return (docs, ids, positions), (q, k, v, dout, padded_docs), window


def _max_diffs(mode, sp, sp_rank, group, ulysses_group, ring_group, name, seed) -> dict[str, float] | None:
    (docs, ids, positions), (q, k, v, dout, padded_docs), window = _case_tensors(name, sp, seed)
    shard = shard_for_sequence_parallel(ids, ids, positions, docs, sp, sp_rank, pad_token_id=0)
    padded = padded_docs.shape[1]
    index = local_token_index(padded, sp, sp_rank)
    ctx = SPContext(
        mode=mode, group=group, sp_size=sp, sp_rank=sp_rank, seq_index=shard.seq_index, doc_ids=shard.doc_ids,
        ulysses_group=ulysses_group, ring_group=ring_group,
        ulysses_size=dist.get_world_size(ulysses_group) if ulysses_group is not None else 1,
        ring_size=dist.get_world_size(ring_group) if ring_group is not None else 1,
        row_doc_ids=padded_docs, windows=(window,),
    )
    local = [x[:, :, index].clone().requires_grad_() for x in (q, k, v)]
    scaling = HEAD_DIM**-0.5
    builds = ctx.plans.builds
    out, _ = sp_attention_forward(None, *local, None, scaling=scaling, sliding_window=window, sp_context=ctx)
    out.backward(dout[:, index])
    planned_during_attention = ctx.plans.builds - builds

    def gathered(x: torch.Tensor, dim: int) -> torch.Tensor:
        return gather_unsharded(x, dim, sp, group)

    got = {"out": gathered(out.detach(), 1)}
    got.update({f"d{n}": gathered(t.grad, 2) for n, t in zip("qkv", local)})
    if sp_rank != 0:
        return None
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    seq_index = torch.arange(padded).expand(BATCH, -1)
    ref = reference_attention(*full, seq_index, padded_docs, scaling, window).transpose(1, 2)
    ref.backward(dout)
    want = {"out": ref.detach(), "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}
    diffs = {key: (got[key] - want[key]).abs().max().item() for key in want}
    return {"diffs": diffs, "planned_during_attention": planned_during_attention}


def _sp_worker(rank: int, world: int) -> dict:
    assert world == WORLD
    groups = {4: dist.new_group([0, 1, 2, 3])}
    pair_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups[2] = pair_groups[rank // 2]
    hybrid = {}
    for mode, sp, u in SETUPS:
        if mode != "hybrid":
            continue
        sp_groups = [[0, 1, 2, 3]] if sp == 4 else [[0, 1], [2, 3]]
        made = [make_hybrid_groups(ranks, u) for ranks in sp_groups]  # collective: every rank, same order
        hybrid[(sp, u)] = next(pair for pair, ranks in zip(made, sp_groups) if rank in ranks)
    results: dict = {}
    for mode, sp, u in SETUPS:
        ulysses_group, ring_group = hybrid.get((sp, u), (None, None))
        sp_rank, dp_rank = rank % sp, rank // sp
        for case_number, name in enumerate(CASES):
            seed = 1000 * case_number + 10 * sp + dp_rank
            diffs = _max_diffs(mode, sp, sp_rank, groups[sp], ulysses_group, ring_group, name, seed)
            if diffs is not None:
                results[f"{mode}-sp{sp}-u{u}-{name}-dp{dp_rank}"] = diffs
    for mode in ("zigzag_ring", "llama3"):
        errors = _bf16_errors(mode, rank, groups[4])
        if errors is not None:
            results[f"bf16-{mode}"] = errors
    results["sliding_window_model"] = _sliding_window_diffs(rank)
    # Ulysses cannot split 2 heads over 4 ranks: every rank must refuse before any communication.
    ctx = SPContext(mode="ulysses", group=groups[4], sp_size=4, sp_rank=rank,
                    seq_index=torch.arange(4).expand(1, -1), doc_ids=torch.zeros(1, 4, dtype=torch.long),
                    row_doc_ids=torch.zeros(1, 16, dtype=torch.long))
    x = torch.zeros(1, 2, 4, HEAD_DIM, dtype=torch.float64)
    try:
        sp_attention_forward(None, x, x, x, None, sp_context=ctx)
        results["ulysses_error"] = None
    except ValueError as err:
        results["ulysses_error"] = str(err)
    return results


def _bf16_errors(mode: str, sp_rank: int, group) -> dict[str, float] | None:
    """bf16 SP attention at sp=4 on a 256-token packed row: relative errors of out/dq/dk/dv against float64 on
    the same (bf16) inputs, on rank 0."""
    sp, t, heads, kv_heads, dim = 4, 256, 4, 2, 16
    docs = _doc_ids([[100, 156]])
    gen = torch.Generator().manual_seed(77)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(torch.bfloat16)  # noqa: E731
    q, dout = rand(1, heads, t, dim), rand(1, t, heads, dim)
    k, v = rand(1, kv_heads, t, dim), rand(1, kv_heads, t, dim)
    index = local_token_index(t, sp, sp_rank)
    ctx = SPContext(mode=mode, group=group, sp_size=sp, sp_rank=sp_rank, seq_index=index.expand(1, -1),
                    doc_ids=docs[:, index], row_doc_ids=docs)
    local = [x[:, :, index].clone().requires_grad_() for x in (q, k, v)]
    out, _ = sp_attention_forward(None, *local, None, sp_context=ctx)
    out.backward(dout[:, index])

    def gathered(x: torch.Tensor, dim: int) -> torch.Tensor:
        return gather_unsharded(x, dim, sp, group)

    got = {"out": gathered(out.detach(), 1)}
    got.update({f"d{n}": gathered(x.grad, 2) for n, x in zip("qkv", local)})
    if sp_rank != 0:
        return None
    full = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*full, torch.arange(t).expand(1, -1), docs, dim**-0.5, None).transpose(1, 2)
    ref.backward(dout.double())
    want = {"out": ref.detach(), "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}
    return {key: float((got[key].double() - want[key]).norm() / want[key].norm()) for key in want}


@pytest.fixture(scope="module")
def sp_results() -> dict:
    """One 4-rank spawn runs every (mode, sp, case); results are max abs diffs against the reference."""
    merged: dict = {}
    for rank_results in run_distributed(_sp_worker, WORLD):
        for key, value in rank_results.items():
            merged.setdefault(key, []).append(value)
    return merged


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode,sp,ulysses_size", SETUPS, ids=[f"{m}-sp{s}-u{u}" for m, s, u in SETUPS])
def test_sp_attention_matches_reference(sp_results, mode, sp, ulysses_size, case):
    for dp_rank in range(WORLD // sp):
        (result,) = sp_results[f"{mode}-sp{sp}-u{ulysses_size}-{case}-dp{dp_rank}"]
        assert max(result["diffs"].values()) <= TOLERANCE, result["diffs"]
        # The batch was planned when its context was made; the attention forward and backward only read it.
        assert result["planned_during_attention"] == 0


def test_llama3_bf16_gradients_as_accurate_as_the_ring(sp_results):
    """llama3 reduce-scatters dK/dV in fp32 like the ring passes them, so its bf16 errors are the ring's: one
    rounding of the fp32 sum (a bf16 reduce-scatter adds a rounding per rank's partial and per addition)."""
    (ring,), (llama3,) = sp_results["bf16-zigzag_ring"], sp_results["bf16-llama3"]
    for key in ("out", "dq", "dk", "dv"):
        assert ring[key] < 1e-2, (key, ring)
        assert llama3[key] <= 1.1 * ring[key], (key, llama3[key], ring[key])


def test_ulysses_refuses_indivisible_heads_on_every_rank(sp_results):
    messages = sp_results["ulysses_error"]
    assert len(messages) == WORLD
    for message in messages:
        assert message is not None and "num_attention_heads=2" in message and "sequence_parallel_size=4" in message


def test_check_ulysses_heads_message():
    check_ulysses_heads(8, 4)
    with pytest.raises(ValueError, match="num_attention_heads=6.*sequence_parallel_size=4"):
        check_ulysses_heads(6, 4)


def test_choose_ulysses_size_and_hybrid_ranks():
    assert choose_ulysses_size(32, 8, 4) == 4
    assert choose_ulysses_size(32, 2, 8) == 2
    assert choose_ulysses_size(14, 7, 4) == 1
    ulysses, ring = hybrid_group_ranks([4, 5, 6, 7, 8, 9], 2)
    assert ulysses == [[4, 5], [6, 7], [8, 9]]
    assert ring == [[4, 6, 8], [5, 7, 9]]
    with pytest.raises(ValueError, match="ulysses_size=4"):
        hybrid_group_ranks([0, 1, 2, 3, 4, 5], 4)


def _random_block_inputs(seed: int, tq: int = 12, tk: int = 12):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, tq, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, tk, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, tk, 8, generator=gen, dtype=torch.float64)
    index = torch.arange(tk).expand(2, -1)
    docs = torch.tensor([[0] * 5 + [1] * 5 + [PAD_DOCUMENT] * 2, [0] * 12])
    return q, k, v, index, docs


def test_lse_merge_equals_one_shot_attention():
    q, k, v, index, docs = _random_block_inputs(0)
    full_out, full_lse = attention_block(q, k, v, BlockTokens(index, index, docs, docs), 0.3, None)
    # Disjoint, interleaved key subsets; the first subset leaves some queries with no visible key (lse -inf).
    subsets = [torch.tensor([3, 4, 9]), torch.tensor([0, 5, 6, 11]), torch.tensor([1, 2, 7, 8, 10])]
    out = torch.zeros_like(full_out)
    lse = torch.full_like(full_lse, float("-inf"))
    for keys in subsets:
        part = attention_block(q, k[:, :, keys], v[:, :, keys], BlockTokens(index, index[:, keys], docs, docs[:, keys]),
                               0.3, None)
        assert not torch.isnan(part[0]).any() and torch.isneginf(part[1]).any()
        out, lse = merge_partials(out, lse, *part)
    assert (out - full_out).abs().max() <= TOLERANCE
    assert (lse - full_lse).abs().max() <= TOLERANCE


def test_block_backward_from_lse_matches_autograd():
    q, k, v, index, docs = _random_block_inputs(1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention_block(*leaves, BlockTokens(index, index, docs, docs), 0.3, 4)
    dout = torch.randn_like(out)
    out.backward(dout)
    dq, dk, dv = attention_block_backward(dout, q, k, v, out.detach(), lse.detach(), BlockTokens(index, index, docs, docs),
                                          0.3, 4)
    for mine, leaf in zip((dq, dk, dv), leaves):
        assert (mine - leaf.grad).abs().max() <= TOLERANCE


def test_query_without_visible_key_gives_zero_and_no_nan():
    q, k, v, index, docs = _random_block_inputs(2)
    later = index + 100  # every key is in the future of every query
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention_block(*leaves, BlockTokens(index, later, docs, docs), 0.3, None)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves)


def test_reference_matches_sdpa_with_explicit_mask():
    q, k, v, index, docs = _random_block_inputs(3)
    window = 4
    i, j = torch.arange(12).unsqueeze(1), torch.arange(12).unsqueeze(0)
    mask = (j <= i) & (i - j < window) & (docs.unsqueeze(2) == docs.unsqueeze(1))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=0.3, enable_gqa=True)
    got = reference_attention(q, k, v, index, docs, 0.3, window)
    assert (got - want).abs().max() <= TOLERANCE


def test_local_path_matches_reference_with_grads():
    q, k, v, index, docs = _random_block_inputs(4)
    ctx = SPContext(mode="zigzag_ring", group=None, sp_size=1, sp_rank=0, seq_index=index, doc_ids=docs)
    mine = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    out, none = sp_attention_forward(None, *mine, None, scaling=0.3, sliding_window=3, sp_context=ctx)
    want = reference_attention(*ref, index, docs, 0.3, 3).transpose(1, 2)
    dout = torch.randn_like(want)
    out.backward(dout)
    want.backward(dout)
    assert none is None and out.is_contiguous() and out.shape == (2, 12, 4, 8)
    assert (out - want).abs().max() <= TOLERANCE
    for a, b in zip(mine, ref):
        assert (a.grad - b.grad).abs().max() <= TOLERANCE


def test_bfloat16_inputs_compute_in_float32():
    q, k, v, index, docs = _random_block_inputs(5)
    ctx = SPContext(mode="ulysses", group=None, sp_size=1, sp_rank=0, seq_index=index, doc_ids=docs)
    low = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out, _ = sp_attention_forward(None, *low, None, scaling=0.3, sp_context=ctx)
    out.float().sum().backward()
    want = reference_attention(*(x.to(torch.bfloat16).double() for x in (q, k, v)), index, docs, 0.3, None)
    assert out.dtype == torch.bfloat16 and all(x.grad.dtype == torch.bfloat16 for x in low)
    assert (out.double() - want.transpose(1, 2)).abs().max() < 1e-2


def test_registered_attention_runs_inside_a_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    register_sp_attention()
    register_sp_attention()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).double().eval()
    docs = torch.tensor([[0] * 6 + [1] * 4])
    ids = torch.randint(0, 64, (1, 10))
    positions = torch.cat([torch.arange(6), torch.arange(4)]).unsqueeze(0)
    shard = shard_for_sequence_parallel(ids, ids, positions, docs, 1, 0, pad_token_id=0)
    ctx = SPContext(mode="zigzag_ring", group=None, sp_size=1, sp_rank=0, seq_index=shard.seq_index,
                    doc_ids=shard.doc_ids)
    model.set_attn_implementation(ATTENTION_NAME)
    packed = model(input_ids=shard.input_ids, position_ids=shard.position_ids, sp_context=ctx).logits
    model.set_attn_implementation("sdpa")
    first = model(input_ids=ids[:, :6]).logits
    second = model(input_ids=ids[:, 6:]).logits
    assert (packed[:, :6] - first).abs().max() <= TOLERANCE
    assert (packed[:, 6:] - second).abs().max() <= TOLERANCE


def test_autocast_mixed_projection_dtypes_reach_attention_as_one_dtype():
    """Under autocast RoPE leaves q/k in fp32 and v in bf16: attention runs (and answers) in the autocast dtype,
    as SDPA does, and the gradients come back in each input's own dtype."""
    q, k, v, index, docs = _random_block_inputs(6)
    ctx = SPContext(mode="zigzag_ring", group=None, sp_size=1, sp_rank=0, seq_index=index, doc_ids=docs)
    leaves = [q.float().requires_grad_(), k.float().requires_grad_(), v.to(torch.bfloat16).requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sp_attention_forward(None, *leaves, None, scaling=0.3, sp_context=ctx)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert [x.grad.dtype for x in leaves] == [torch.float32, torch.float32, torch.bfloat16]
    rounded = [x.detach().to(torch.bfloat16).double() for x in leaves]
    want = reference_attention(*rounded, index, docs, 0.3, None).transpose(1, 2)
    assert (out.double() - want).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_attention_reads_only_its_plan_no_device_values(dtype):
    """No device -> host synchronisation in the attention: meta tensors have no values, so any .tolist(),
    bool() or .item() on them raises. The plans are made from the host's document ids when the context is
    built (once per batch, for each window); then every mode's forward and backward runs on meta tensors
    (bf16: the CUDA kernel path, float64: the math path) without planning again."""
    from longtune.parallel.attention import AttentionPlans
    from longtune.parallel.attention.blockwise import Gradients, blockwise_backward, blockwise_forward

    sp, t, heads, kv_heads, dim, windows = 4, 512, 4, 2, 16, (None, 40)
    row_docs = torch.tensor([[0] * 200 + [1] * 290 + [PAD_DOCUMENT] * 22, [0] * 512])
    meta = torch.device("meta")
    # sp=1 through the registered entry point.
    ctx = SPContext(mode="zigzag_ring", group=None, sp_size=1, sp_rank=0,
                    seq_index=torch.empty(2, t, dtype=torch.long, device=meta),
                    doc_ids=torch.empty(2, t, dtype=torch.long, device=meta), row_doc_ids=row_docs, windows=windows)
    assert ctx.plans.builds == len(windows)
    for window in windows:
        q = torch.empty(2, heads, t, dim, dtype=dtype, device=meta, requires_grad=True)
        kv = torch.empty(2, kv_heads, t, dim, dtype=dtype, device=meta, requires_grad=True)
        out, _ = sp_attention_forward(None, q, kv, kv, None, sliding_window=window, sp_context=ctx)
        out.sum().backward()
        assert q.grad.shape == q.shape and kv.grad.shape == kv.shape
    assert ctx.plans.builds == len(windows)
    # sp=4: every mode's per-step blockwise work (the ring's communication aside) on one rank's plans.
    rank_index = [local_token_index(t, sp, r).expand(2, -1) for r in range(sp)]
    rank_docs = [row_docs.gather(1, index) for index in rank_index]
    for mode, ulysses_size in (("zigzag_ring", 1), ("ulysses", 4), ("llama3", 1), ("hybrid", 2)):
        plans = AttentionPlans(mode, 1, ulysses_size, rank_index, rank_docs, meta, windows)
        for window in windows:
            for step in plans.steps(window):
                tq, tk = step.tokens.q_index.shape[-1], step.tokens.k_index.shape[-1]
                q = torch.empty(2, heads, tq, dim, dtype=dtype, device=meta)
                k = torch.empty(2, kv_heads, tk, dim, dtype=dtype, device=meta)
                params = AttentionParams(dim**-0.5, window)
                out, lse = blockwise_forward(q, k, k, step, params)
                wide = torch.promote_types(dtype, torch.float32)
                grads = [torch.zeros(x.shape, dtype=wide, device=meta) for x in (q, k, k)]
                blockwise_backward(torch.empty_like(q), q, k, k, out, lse, step, params, Gradients(*grads))
        assert plans.builds == len(windows), mode


SLIDING_WINDOW, SLIDING_LENGTH = 130, 600
SLIDING_SETUPS = [("zigzag_ring", 1, 1), ("zigzag_ring", 2, 1), ("zigzag_ring", 4, 1), ("ulysses", 4, 4),
                  ("llama3", 4, 1), ("hybrid", 4, 2)]


def _sliding_window_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    # Layer 0 full attention, layer 1 a sliding window (max_window_layers=1), as Qwen2 lays them out.
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1,
                         initializer_range=0.2)
    return Qwen2ForCausalLM(config).double()


def _sliding_window_diffs(rank: int) -> dict:
    """Every rank: HF's own sdpa attention with its window on the whole rows (sp=1), then our SP attention for
    each setup; returns max abs diffs of the logits and of the parameter gradients (summed over the SP group)."""
    from longtune.parallel.sequence import attention_windows

    model = _sliding_window_model()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    windows = attention_windows(model.config)
    assert windows == (None, SLIDING_WINDOW)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, SLIDING_LENGTH), generator=gen)
    positions = torch.arange(SLIDING_LENGTH).expand(2, -1)
    docs = torch.zeros(2, SLIDING_LENGTH, dtype=torch.long)
    weights = torch.randn(2, SLIDING_LENGTH, 64, generator=gen, dtype=torch.float64)
    model.set_attn_implementation("sdpa")
    ref_logits = model(input_ids=ids).logits
    (ref_logits * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    register_sp_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    groups = {4: dist.new_group([0, 1, 2, 3])}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups[2] = pairs[rank // 2]
    ulysses_group, ring_group = make_hybrid_groups([0, 1, 2, 3], 2)
    results = {}
    for mode, sp, u in SLIDING_SETUPS:
        sp_rank = rank % sp
        shard = shard_for_sequence_parallel(ids, ids, positions, docs, sp, sp_rank, pad_token_id=0)
        padded_docs = pad_row_tensors(ids, ids, positions, docs, sp, pad_token_id=0)[3]
        hybrid = mode == "hybrid"
        ctx = SPContext(mode=mode, group=groups.get(sp), sp_size=sp, sp_rank=sp_rank, seq_index=shard.seq_index,
                        doc_ids=shard.doc_ids, ulysses_group=ulysses_group if hybrid else None, ulysses_size=u,
                        ring_group=ring_group if hybrid else None, ring_size=sp // u, row_doc_ids=padded_docs,
                        windows=windows)
        model.zero_grad()
        logits = model(input_ids=shard.input_ids, position_ids=shard.position_ids, sp_context=ctx).logits
        real = shard.doc_ids >= 0
        local_weights = torch.zeros_like(logits)
        local_weights[real] = weights[:, :, :].reshape(-1, 64)[
            (torch.arange(2).unsqueeze(1) * SLIDING_LENGTH + shard.seq_index)[real]]
        (logits * local_weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if sp > 1:
            for g in grads.values():
                dist.all_reduce(g, group=groups[sp])
        logit_diff = (logits[real] - ref_logits.detach().reshape(-1, 64)[
            (torch.arange(2).unsqueeze(1) * SLIDING_LENGTH + shard.seq_index)[real]]).abs().max().item()
        grad_diff = max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()) for n in grads)
        results[f"{mode}-sp{sp}"] = {"logits": logit_diff, "grads": grad_diff}
    return results


@pytest.mark.parametrize("mode,sp,ulysses_size", SLIDING_SETUPS, ids=[f"{m}-sp{s}" for m, s, _ in SLIDING_SETUPS])
def test_sliding_window_model_matches_hf(sp_results, mode, sp, ulysses_size):
    """A Qwen2 model with a sliding-window layer: SP attention (windowed tiles, no row-sized mask) gives HF's
    logits on every rank's tokens and HF's parameter gradients, float64."""
    for rank_results in sp_results["sliding_window_model"]:
        diffs = rank_results[f"{mode}-sp{sp}"]
        assert diffs["logits"] <= TOLERANCE and diffs["grads"] <= TOLERANCE, diffs


def test_context_copies_keep_their_plans():
    """FSDP's forward-input casting rebuilds dataclass arguments with dataclasses.replace: the copy must keep the
    batch's plans rather than plan again in every wrapped module."""
    import dataclasses

    _, _, _, index, docs = _random_block_inputs(7)
    ctx = SPContext(mode="zigzag_ring", group=None, sp_size=1, sp_rank=0, seq_index=index, doc_ids=docs,
                    windows=(None, 3))
    copy = dataclasses.replace(ctx, seq_index=index.clone())
    assert copy.plans is ctx.plans and ctx.plans.builds == 2


@pytest.mark.parametrize("window", [None, 3, 150])
def test_math_kernel_follows_the_same_blocks(window):
    """attention_kernel: math runs the planned blocks through the reference kernel (block-sized masks only):
    same output and gradients as the whole-row reference, float64, packed rows, windows tiled or not."""
    gen = torch.Generator().manual_seed(8)
    t = 600
    docs = torch.tensor([[0] * 350 + [1] * 240 + [PAD_DOCUMENT] * 10, [0] * 600])
    index = torch.arange(t).expand(2, -1)
    q = torch.randn(2, 4, t, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, t, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    ctx = SPContext(mode="zigzag_ring", group=None, sp_size=1, sp_rank=0, seq_index=index, doc_ids=docs,
                    windows=(window,), kernel="math")
    mine = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = sp_attention_forward(None, *mine, None, scaling=0.3, sliding_window=window, sp_context=ctx)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(dout)
    want = reference_attention(*ref, index, docs, 0.3, window).transpose(1, 2)
    want.backward(dout)
    assert (out - want).abs().max() <= TOLERANCE
    for a, b in zip(mine, ref):
        assert (a.grad - b.grad).abs().max() <= TOLERANCE


def test_attention_windows_from_model_configs():
    """The windows each batch is planned for, read from the configs as the HF attention layers read them."""
    from transformers import MistralConfig, Qwen2Config

    from longtune.parallel.sequence import attention_windows

    assert attention_windows(Qwen2Config(num_hidden_layers=2)) == (None,)
    assert attention_windows(Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=64,
                                         max_window_layers=0)) == (64,)
    assert attention_windows(Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=64,
                                         max_window_layers=1)) == (None, 64)
    assert attention_windows(MistralConfig(num_hidden_layers=2, sliding_window=32)) == (32,)
    assert attention_windows(MistralConfig(num_hidden_layers=2, sliding_window=None)) == (None,)
