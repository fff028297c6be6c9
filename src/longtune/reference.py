"""Reference-model log-probs for DPO-family and KTO training.

Where they come from, cheapest first:
- `precompute_ref_log_probs: true`: one pass over the data before training (under SP too), cached on disk keyed by
  a fingerprint of the model and the tokenized data; no reference model is in memory while training.
- LoRA: the policy itself with its adapters disabled (no second copy of the weights); with a quantized base
  (QLoRA) that is the quantized base, the function the policy starts from, so DPO's first loss is ln 2.
- full / freeze: a frozen copy of the initial model (or `ref_model: PATH`), sharded like the policy under FSDP.
Reference-free losses (SimPO, ORPO) use none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from longtune.config import Config
from longtune.data.collate import collate
from longtune.forward import RunParts, blank_like
from longtune.io import atomic_open
from longtune.models.loader import is_peft_model
from longtune.parallel.fsdp import RootForward
from longtune.parallel.mesh import ParallelDims
from longtune.parallel.parallelize import ModelRecipe, ParallelModel, build_model
from longtune.parallel.sequence import SequenceParallel


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


def build_live_reference(cfg: Config, policy: ParallelModel, recipe: ModelRecipe, dims: ParallelDims,
                         sequence: SequenceParallel, log: Callable[[str], None] = print) -> LiveReference:
    """The reference for a run whose stage uses one and does not precompute it (or that precomputes from it)."""
    if cfg.preference.ref_model is None and is_peft_model(policy.model):
        log("reference: the base model with LoRA adapters disabled")
        return LiveReference(policy.root, disable_adapters=True)
    if cfg.preference.ref_model is not None:
        log(f"reference: {cfg.preference.ref_model} (frozen)")
        model_cfg = replace(cfg.model, model_name_or_path=cfg.preference.ref_model)
    else:
        # The initial weights, loaded again: the policy may already be sharded (and is about to change).
        log("reference: a frozen copy of the initial model")
        model_cfg = cfg.model
    # No finetuning, tiling or checkpointing (never trained); the same RoPE scaling as the policy.
    frozen = ModelRecipe(recipe.dtype, recipe.sharding, rope=recipe.rope)
    reference = build_model(model_cfg, "causal", frozen, dims, sequence, lambda _: None, frozen=True)
    return LiveReference(reference.root, disable_adapters=False)


def precompute_references(parts: RunParts, cfg: Config, train_examples: list, eval_examples: list,
                          log: Callable[[str], None] = print) -> tuple[PrecomputedReference, PrecomputedReference | None]:
    """One pass of the live reference (`parts.reference`) over all examples, cached on disk. The caller then
    replaces the live reference with these tables, which drops the last reference to a frozen copy."""
    dims, live, docs_per_row = parts.dims, parts.reference, parts.stage.docs_per_row
    tables: list[Tensor | None] = []
    for examples in (train_examples, eval_examples):
        if not examples:
            tables.append(None)
            continue
        path = cache_path(reference_fingerprint(cfg, examples), cfg.data.data_cache_dir)
        table = load_table(path, len(examples), docs_per_row)
        hit = table is not None
        if dims.world_size > 1:
            import torch.distributed as dist

            flags = torch.tensor([1.0 if hit else 0.0], device=dims.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # use the cache only if every rank can read it
            hit = bool(flags.item())
        if not hit:
            started = time.perf_counter()

            def run(reference, ids, examples=examples):
                rows = [examples[i] for i in ids] or [blank_like(examples[0])]
                batch = collate(rows, parts.pad_id)
                inputs = parts.sequence.prepare(batch, parts.pad_id, dims.device)
                return reference(parts.stage, inputs, cfg.train.loss_chunk_size, ids)

            table = precompute_table(live, examples, run, dims, cfg.train.per_device_train_batch_size,
                                     docs_per_row)
            if dims.is_main:
                save_table(table, path)
            log(f"reference log-probs: computed for {len(examples)} examples in "
                f"{time.perf_counter() - started:.1f}s, cached at {path}")
        else:
            log(f"reference log-probs: {len(examples)} examples from cache {path}")
        tables.append(table)
    train_table, eval_table = tables
    assert train_table is not None
    return PrecomputedReference(train_table), (PrecomputedReference(eval_table) if eval_table is not None else None)


def reference_fingerprint(cfg: Config, examples: list) -> str:
    """Model identity + the reference settings + every token of the data, so any change misses the cache."""
    h = hashlib.sha256()
    model = cfg.preference.ref_model or cfg.model.model_name_or_path or ""
    m = cfg.model
    # A quantized base gives other log-probs than its full-precision weights: the quantization is part of the identity.
    quantization = [m.quantization_bit, m.quantization_type, m.double_quantization] if m.quantization_bit else None
    h.update(json.dumps([model, cfg.compute_dtype, cfg.train.stage, cfg.train.seed, m.finetuning_type,
                         *([quantization] if quantization else [])]).encode())
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


def precompute_table(reference: LiveReference, examples: list, run_batch: Callable, dims: ParallelDims,
                     batch_size: int, docs_per_row: int) -> Tensor:
    """Reference sums for every example: data-parallel ranks split the examples, every step in lockstep."""
    table = torch.zeros(len(examples), docs_per_row, dtype=torch.float64, device=dims.device)
    for ids in dims.lockstep_batches(len(examples), batch_size):
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
