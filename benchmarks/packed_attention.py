"""Packed-row attention at sp=1: longtune's document-split kernel calls against one SDPA call with a [T, T]
document mask (what a plain `attention_mask`-based packing path does).

Both compute the same thing (checked here to 1e-5); the table gives forward+backward time and the peak of live
tensor bytes (longtune.bench.LiveTensorBytes, counted from before q/k/v exist). CPU, fp32 by default.
Run:  python benchmarks/packed_attention.py [--length 16384] [--docs 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from longtune.bench import LiveTensorBytes
from longtune.parallel.attention import SPContext, sp_attention
from longtune.parallel.attention.math_kernel import visibility_mask
from longtune.parallel.attention.kernels import fused_block_backward, fused_block_forward


def masked_once(q, k, v, index, docs, scaling):
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            mask = visibility_mask(index, index, docs, docs, None).unsqueeze(1)
            out, lse = fused_block_forward(q, k, v, mask, scaling, "masked")
            ctx.save_for_backward(q, k, v, out, lse)
            return out.to(q.dtype)

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            mask = visibility_mask(index, index, docs, docs, None).unsqueeze(1)
            return fused_block_backward(dout, q, k, v, out, lse, mask, scaling, "masked")

    return Once.apply(q, k, v)


def measure(fn, q, k, v):
    tracker = LiveTensorBytes()
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    started = time.perf_counter()
    with tracker.mode():
        for x in (q, k, v):
            tracker.track(x)
        out = fn(q, k, v)
        out.backward(torch.ones_like(out))
    return time.perf_counter() - started, tracker.peak, out.detach(), q.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    t = args.length
    cuts = sorted(torch.randperm(t - 1, generator=g)[: args.docs - 1].add(1).tolist())
    docs = torch.zeros(1, t, dtype=torch.long)
    for c in cuts:
        docs[:, c:] += 1
    index = torch.arange(t).unsqueeze(0)
    q = torch.randn(1, args.heads, t, args.head_dim, generator=g)
    k = torch.randn(1, args.kv_heads, t, args.head_dim, generator=g)
    v = torch.randn(1, args.kv_heads, t, args.head_dim, generator=g)
    scaling = args.head_dim**-0.5
    # The batch is planned when its context is made (as in SequenceParallel.prepare), outside the timing.
    context = SPContext(mode="zigzag_ring", group=None, sp_size=1, sp_rank=0, seq_index=index, doc_ids=docs)
    ours = measure(lambda q, k, v: sp_attention(q, k, v, context, scaling, None), q, k, v)
    base = measure(lambda q, k, v: masked_once(q, k, v, index, docs, scaling), q, k, v)
    assert torch.allclose(ours[2], base[2], atol=1e-5) and torch.allclose(ours[3], base[3], atol=1e-5)
    print(f"T={t}, {args.docs} documents, {args.heads}/{args.kv_heads} heads x {args.head_dim}, fp32, CPU")
    print("| path | fwd+bwd s | peak tensor MiB |")
    print("| --- | --- | --- |")
    for name, (secs, peak, _, _) in (("longtune (document-split calls)", ours), ("one masked call", base)):
        print(f"| {name} | {secs:.2f} | {peak / 2**20:.0f} |")
    print(f"ratio ours/masked: time {ours[0] / base[0]:.3f}, peak memory {ours[1] / base[1]:.3f}")


if __name__ == "__main__":
    main()
