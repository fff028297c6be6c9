"""Reference-model log-probs for DPO-family and KTO training.

Where they come from, cheapest first:
- `precompute_ref_log_probs: true`: one pass over the data before training (under SP too), cached on disk keyed by
  a fingerprint of the model and the tokenized data; no reference model is in memory while training.
- LoRA: the policy itself with its adapters disabled (no second copy of the weights).
- full / freeze: a frozen copy of the initial model (or `ref_model: PATH`), sharded like the policy under FSDP.
Reference-free losses (SimPO, ORPO) use none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from longtune.config import Config
from longtune.io import atomic_open
from longtune.models.loader import is_peft_model, load_model
from longtune.parallel.fsdp import RootForward, ShardingPlan, apply_fsdp
from longtune.parallel.mesh import ParallelDims


class LiveReference:
    """Reference log-prob sums computed on the fly for each micro-batch."""

    def __init__(self, root: RootForward, disable_adapters: bool):
        self.root = root
        self.disable_adapters = disable_adapters

    def __call__(self, stage, inputs, loss_chunk_size: int, example_ids: list[int] | None) -> Tensor:
        context = self.root.model.disable_adapter() if self.disable_adapters else contextlib.nullcontext()
        was_training = self.root.training
        self.root.eval()  # no dropout in the reference
        try:
            with torch.no_grad(), context:
                return self.root(stage.reference_logps, inputs, loss_chunk_size)
        finally:
            self.root.train(was_training)


class PrecomputedReference:
    """Per-example reference sums looked up by example index (one row per example, one column per document)."""

    def __init__(self, table: Tensor):
        self.table = table

    def __call__(self, stage, inputs, loss_chunk_size: int, example_ids: list[int] | None) -> Tensor:
        assert example_ids is not None
        rows = self.table[torch.tensor(example_ids, dtype=torch.long)]
        out = torch.zeros(inputs.num_sequences, dtype=rows.dtype)
        out[: rows.numel()] = rows.reshape(-1)  # blank lockstep rows (no ids) stay 0 and are masked by the stage
        return out.to(inputs.input_ids.device)


def build_live_reference(cfg: Config, root: RootForward, dims: ParallelDims, dtype: torch.dtype,
                         sharding: ShardingPlan, layers_of: Callable[[nn.Module], nn.ModuleList],
                         apply_sequence: Callable[[nn.Module], None], log=print) -> LiveReference:
    if cfg.preference.ref_model is None and is_peft_model(root.model):
        log("reference: the base model with LoRA adapters disabled")
        return LiveReference(root, disable_adapters=True)
    if cfg.preference.ref_model is not None:
        from dataclasses import replace

        log(f"reference: {cfg.preference.ref_model} (frozen)")
        ref_model = load_model(replace(cfg.model, model_name_or_path=cfg.preference.ref_model), dtype)
    else:
        # The initial weights, loaded again: the policy may already be sharded (and is about to change).
        log("reference: a frozen copy of the initial model")
        ref_model = load_model(cfg.model, dtype)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    apply_sequence(ref_model)
    ref_root = RootForward(ref_model)
    if sharding.enabled:
        if dtype in (torch.bfloat16, torch.float16):
            for p in ref_model.parameters():
                p.data = p.data.float()
        apply_fsdp(ref_root, dims, layers_of(ref_model), dtype, sharding)
        if not sharding.offload:
            ref_root.to(dims.device)
    else:
        ref_root.to(dims.device)
    return LiveReference(ref_root, disable_adapters=False)


def reference_fingerprint(cfg: Config, examples: list) -> str:
    """Model identity + the reference settings + every token of the data, so any change misses the cache."""
    h = hashlib.sha256()
    model = cfg.preference.ref_model or cfg.model.model_name_or_path or ""
    h.update(json.dumps([model, cfg.compute_dtype, cfg.train.stage, cfg.train.seed, cfg.model.finetuning_type]).encode())
    model_path = Path(model)
    for f in sorted(model_path.glob("*.safetensors")) if model_path.is_dir() else []:
        stat = f.stat()
        h.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for e in examples:
        h.update(repr((e.input_ids, e.labels, getattr(e, "doc_lengths", None))).encode())
    return h.hexdigest()[:24]


def cache_path(fingerprint: str, cache_dir: str | None) -> Path:
    root = Path(cache_dir or os.environ.get("LONGTUNE_CACHE") or Path.home() / ".cache" / "longtune" / "data")
    return root / "ref_logps" / f"{fingerprint}.pt"


def precompute_table(reference: LiveReference, stage, examples: list, run_batch: Callable, dims: ParallelDims,
                     batch_size: int, docs_per_row: int) -> Tensor:
    """Reference sums for every example: data-parallel ranks split the examples, every step in lockstep."""
    table = torch.zeros(len(examples), docs_per_row, dtype=torch.float64, device=dims.device)
    mine = list(range(dims.dp_rank, len(examples), dims.dp))
    rounds = -(-(-(-len(examples) // dims.dp)) // batch_size)
    for r in range(rounds):
        ids = mine[r * batch_size : (r + 1) * batch_size]
        sums = run_batch(reference, ids)  # [num_sequences]
        if ids:
            table[torch.tensor(ids, device=dims.device)] = sums[: len(ids) * docs_per_row].reshape(
                len(ids), docs_per_row).to(torch.float64)
    if dims.world_size > 1:
        # every example was filled by exactly one dp rank, and by all sp ranks of it (same value)
        table /= dims.sp
        dims.all_reduce_sum(table)
    return table.cpu()


def save_table(table: Tensor, path: Path) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save(table, fh)


def load_table(path: Path, rows: int, docs_per_row: int) -> Tensor | None:
    try:
        table = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign cache file is a miss
        return None
    if not isinstance(table, Tensor) or tuple(table.shape) != (rows, docs_per_row):
        return None
    return table
