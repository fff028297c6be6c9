"""`longtune estimate`'s formula against measured live tensor bytes on CPU (fp32, sp=1, our training path).

Each case runs `longtune bench`'s worker with --tensor-memory (a TorchDispatchMode that counts every live tensor
storage, see longtune.bench.LiveTensorBytes) for 2 optimizer steps in a fresh process, and compares the peak with
`estimate_memory` for the same shape, length and loss_chunk_size. Prints a markdown table (docs/benchmarks.md).
Run:  python benchmarks/estimate_validation.py
"""

from __future__ import annotations

import sys

from longtune.bench import BenchCase, qwen2_config, run_in_subprocess
from longtune.estimate import ModelShape, TrainSetup, estimate_memory

CASES = [  # (model, stage, length, loss_chunk_size)
    ("tiny", "sft", 2048, 4096),
    ("tiny", "sft", 4096, 256),
    ("tiny", "sft", 8192, 512),
    ("tiny", "dpo", 2048, 4096),
    ("cpu-512", "sft", 2048, 512),
    ("cpu-512", "sft", 4096, 4096),
    ("cpu-512", "dpo", 4096, 1024),
]


def main() -> int:
    print("| model | stage | T | loss_chunk_size | measured MiB | estimate MiB | error | peak moment |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    for model, stage, length, chunk in CASES:
        row = run_in_subprocess(BenchCase(model, stage, "ours", length, 2, chunk, tensor_memory=True))
        if row["status"] != "ok":
            print(f"| {model} | {stage} | {length} | {chunk} | {row['status']} | | | |")
            continue
        shape = ModelShape.from_hf_config(qwen2_config(model, length))
        est = estimate_memory(shape, TrainSetup(tokens=length, loss_chunk_size=chunk, sp_attention=stage == "dpo"))
        measured, predicted = row["peak_tensor_mib"], est.total / 2**20
        error = (predicted - measured) / measured
        worst = max(worst, abs(error))
        print(f"| {model} | {stage} | {length} | {chunk} | {measured:.1f} | {predicted:.1f} | {error:+.1%} | "
              f"{est.peak_moment} |", flush=True)
    print(f"largest |error|: {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
