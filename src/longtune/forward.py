"""One micro-batch through the model, the same for training, evaluation and the reference precompute: collate,
NEFTune scales, SP shard, the stage's row flags and reference log-probs, then the stage loss inside the root."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from typing import Any, Callable

import torch

from longtune.config import Config
from longtune.constants import IGNORE_INDEX
from longtune.data.collate import collate
from longtune.data.example import Example
from longtune.models.neftune import NEFTune, neftune_scales
from longtune.parallel.fsdp import RootForward
from longtune.parallel.mesh import ParallelDims
from longtune.parallel.sequence import SequenceParallel
from longtune.stages import Stage, StageOutput


@dataclass
class RunParts:
    """What a forward needs besides the config: built once in `train`, passed explicitly."""

    root: RootForward  # the model inside the (possibly FSDP-sharded) root module
    dims: ParallelDims
    sequence: SequenceParallel
    stage: Stage
    pad_id: int
    neftune: NEFTune | None
    hidden_size: int
    autocast_dtype: torch.dtype | None  # bf16 compute over fp32 master weights without FSDP
    reference: Any = None  # callable giving per-sequence reference sums, for stages that use one
    forward_context: Callable[[], Any] = contextlib.nullcontext  # activation offload (save_on_cpu fallback)


def forward_loss(parts: RunParts, rows: list, ids: list[int] | None, cfg: Config, reference: Any = None) -> StageOutput:
    """This rank's StageOutput for one micro-batch of examples (`ids`: their indices, for precomputed refs)."""
    batch = collate(rows, parts.pad_id)
    scale = None
    if parts.neftune is not None and parts.root.training:
        scale = neftune_scales(batch, float(cfg.data.neftune_noise_alpha or 0.0), parts.hidden_size)
    inputs = parts.sequence.prepare(batch, parts.pad_id, parts.dims.device, neftune_scale=scale)
    if parts.neftune is not None:
        parts.neftune.scale = inputs.neftune_scale
    flags = parts.stage.row_flags(rows)
    if flags is not None:
        inputs.flags = flags.to(parts.dims.device)
    autocast = (torch.autocast(parts.dims.device.type, dtype=parts.autocast_dtype)
                if parts.autocast_dtype is not None else contextlib.nullcontext())
    with autocast, parts.forward_context():
        if parts.stage.uses_reference:
            inputs.reference = (reference or parts.reference)(parts.stage, inputs, cfg.train.loss_chunk_size, ids)
        return parts.root(parts.stage.loss, inputs, cfg.train.loss_chunk_size)


def blank_like(example: Example) -> Example:
    """The same tokens with no label: a micro-batch that adds nothing to the loss, run by a rank that has run
    out of real micro-batches so that every rank issues the same collectives (FSDP, SP)."""
    return Example(input_ids=list(example.input_ids), labels=[IGNORE_INDEX] * len(example.input_ids),
                   doc_lengths=example.doc_lengths, desirable=False)
