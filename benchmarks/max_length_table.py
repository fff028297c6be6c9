"""`longtune estimate --max-length` for the published long-context figures' models (docs/benchmarks.md): the
longest cutoff_len whose *estimated* GPU memory fits, with the host memory per node it needs. Estimates, not
measurements. Run:  python benchmarks/max_length_table.py
"""

from __future__ import annotations

import sys
from dataclasses import replace

from longtune.estimate import (
    GIB,
    MemoryBudget,
    TrainSetup,
    estimate_memory,
    max_cutoff_len,
    parse_size,
    shape_from_name_or_path,
)

# What torch reports as total memory, about: H100 80 GiB, H200 (141 GB on the data sheet) 139 GiB.
GPU_KINDS = {"H100 80GB": parse_size("80GiB"), "H200 141GB": parse_size("139GiB")}
# (model, GPUs, GPU kind, stage): full fine-tuning, bf16, gradient checkpointing, sp = all GPUs.
ROWS = [(model, gpus, kind, "sft") for model in ("llama-3.1-8b", "qwen2.5-7b", "qwen2.5-72b")
        for gpus, kind in ((1, "H100 80GB"), (1, "H200 141GB"), (8, "H100 80GB"), (32, "H100 80GB"))]
ROWS += [("qwen2.5-7b", 8, "H100 80GB", "dpo")]
# The settings of the two columns: the plain trainer defaults, and everything that trades host memory or
# recompute for GPU memory (as ALST's figures use: offloaded parameters/optimizer and checkpoints, tiled MLP).
PLAIN = dict(offload_params=False, offload_activations=False, tiled_mlp_tokens=None)
ALL_OFFLOAD = dict(offload_params=True, offload_activations=True, tiled_mlp_tokens=8192)


def _cell(model: str, gpus: int, gpu_mem: int, stage: str, settings: dict) -> str:
    shape = shape_from_name_or_path(model)
    pairs = stage == "dpo"
    setup = TrainSetup(tokens=0, sp=gpus, world_size=gpus, fsdp=gpus > 1, dtype="bfloat16", loss_chunk_size=1024,
                       sp_attention=pairs, live_reference=pairs, **settings)
    budget = MemoryBudget(gpu_mem, None, min(gpus, 8))  # host memory reported, not limiting
    docs = 2 if pairs else 1
    found = max_cutoff_len(shape, setup, budget, docs_per_row=docs)
    if found.cutoff_len is None:
        return "none | -"
    host = budget.node_host_bytes(estimate_memory(shape, replace(setup, tokens=found.cutoff_len * docs)))
    return f"{found.cutoff_len / 1024:.0f}K | {host / GIB:.0f} GiB"


def main() -> int:
    print("| model | stage | GPUs | GPU | plain: max cutoff_len | host/node | all offload: max cutoff_len | host/node |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, gpus, kind, stage in ROWS:
        cells = [_cell(model, gpus, GPU_KINDS[kind], stage, s) for s in (PLAIN, ALL_OFFLOAD)]
        print(f"| {model} | {stage} | {gpus} | {kind} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
