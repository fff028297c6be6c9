"""Per-rank memory of one training forward+backward under sequence parallelism, sp = 1, 2, 4 (CPU, gloo).

Measures on each rank, for one row of --length tokens through a Qwen2-architecture model built from config:
  saved_mib  bytes held for backward (activations; counted with saved_tensors_hooks, each storage once)
  peak_mib   peak resident memory growth during forward+backward (ru_maxrss after minus RSS before)
and prints them with the ratio to sp=1. Run:  python benchmarks/sp_memory.py --length 8192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longtune.config import ParallelConfig
    from longtune.data.collate import collate
    from longtune.parallel.fsdp import RootForward
    from longtune.parallel.mesh import init_parallel, shutdown_parallel
    from longtune.parallel.sequence import SequenceParallel
    from longtune.stages.lm import lm_loss

    sp = int(os.environ.get("WORLD_SIZE", "1"))
    dims = init_parallel(sp)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=args.length * 2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    sequence = SequenceParallel(dims, ParallelConfig(sequence_parallel_mode=args.mode), config, packed=True,
                                log=lambda _: None)
    sequence.apply(model)
    root = RootForward(model)
    root.train()
    row = type("Row", (), {})()
    g = torch.Generator().manual_seed(1)
    row.input_ids = torch.randint(0, args.vocab, (args.length,), generator=g).tolist()
    row.labels = list(row.input_ids)
    batch = collate([row], pad_token_id=0)
    inputs = sequence.prepare(batch, 0, dims.device)

    seen: set[int] = set()
    saved = [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    before = _rss_mib()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, count, _ = root(lm_loss, inputs, args.loss_chunk)
    (loss_sum / args.length).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    result = {"rank": dims.rank, "sp": sp, "saved_mib": saved[0] / 2**20, "peak_mib": peak,
              "local_tokens": int(inputs.input_ids.numel())}
    Path(args.out, f"rank{dims.rank}.json").write_text(json.dumps(result))
    shutdown_parallel(dims)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--mode", default="zigzag_ring")
    parser.add_argument("--sp", default="1,2,4")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    rows = []
    for sp in [int(x) for x in args.sp.split(",")]:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={sp}",
                   __file__, "--worker", "--out", out, "--length", str(args.length), "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--vocab", str(args.vocab), "--loss-chunk", str(args.loss_chunk),
                   "--mode", args.mode]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]
        rows.append({"sp": sp, "saved_mib": max(r["saved_mib"] for r in ranks),
                     "peak_mib": max(r["peak_mib"] for r in ranks), "local_tokens": ranks[0]["local_tokens"]})
    base = rows[0]
    print(f"T={args.length} hidden={args.hidden} layers={args.layers} vocab={args.vocab} mode={args.mode} "
          "(max over ranks)")
    print("| sp | local tokens | saved for backward MiB | ratio | peak RSS growth MiB | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sp']} | {r['local_tokens']} | {r['saved_mib']:.1f} | {r['saved_mib'] / base['saved_mib']:.2f} "
              f"| {r['peak_mib']:.1f} | {r['peak_mib'] / base['peak_mib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
