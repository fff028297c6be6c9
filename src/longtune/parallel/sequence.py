"""Applying sequence parallelism to a model and its batches: choose the SP mode, register the attention with
transformers' AttentionInterface (no model code is patched), and cut each collated batch into this rank's shard
with the context the attention needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longtune.config import ParallelConfig
from longtune.data.collate import Batch
from longtune.errors import ConfigError
from longtune.parallel.layout import pad_row_tensors, shard_for_sequence_parallel, shard_tensor
from longtune.parallel.mesh import ParallelDims


@dataclass
class ModelInputs:
    """What a stage feeds the model on this rank. Tensors are [B, T_local]."""

    input_ids: Tensor
    labels: Tensor  # shifted targets of the local positions
    position_ids: Tensor
    sp_context: object | None  # an attention SPContext when the SP attention is active
    neftune_scale: Tensor | None = None  # alpha / sqrt(L_doc * d) per token (0 on padding), if NEFTune is on
    # Sequence-level stages (preference, KTO, reward model):
    sequence_ids: Tensor | None = None  # row * docs_per_row + document, -1 on padding
    last_token: Tensor | None = None  # True at the last token of each document
    num_sequences: int = 0
    sp_group: object | None = None
    sp_size: int = 1
    reference: Tensor | None = None  # per-sequence reference log-prob sums [num_sequences], if any
    flags: Tensor | None = None  # per-row booleans (KTO: desirable)


def attention_heads(model_config) -> tuple[int, int]:
    heads = int(model_config.num_attention_heads)
    kv = int(getattr(model_config, "num_key_value_heads", None) or heads)
    return heads, kv


def attention_windows(model_config) -> tuple[int | None, ...]:
    """The sliding windows the model's attention layers pass to the attention (None: a full-attention layer), so
    that each batch is planned for them up front. Qwen2 sets `sliding_window` to None unless
    `use_sliding_window`; Mistral has `sliding_window` (None or an int); `layer_types` says which layers use it."""
    window = getattr(model_config, "sliding_window", None)
    if not window:
        return (None,)
    layer_types = list(getattr(model_config, "layer_types", None) or [])
    if not layer_types or all(kind == "sliding_attention" for kind in layer_types):
        return (int(window),)
    if "sliding_attention" not in layer_types:
        return (None,)
    return (None, int(window))


def resolve_sp_mode(cfg: ParallelConfig, heads: int, kv_heads: int, sp: int, tp: int = 1) -> tuple[str, int]:
    """(mode, ulysses_size) for the heads of one rank: with tensor parallelism `heads` and `kv_heads` are the
    local ones (num_attention_heads / tp: TP splits heads first, SP works on what is left).
    `auto`: Ulysses over gcd(kv_heads, sp) ranks, ring over the rest."""
    mode = cfg.sequence_parallel_mode
    what = "num_attention_heads" if tp == 1 else f"the local heads (num_attention_heads / tensor_parallel_size {tp})"
    if sp == 1:
        return "zigzag_ring", 1
    from longtune.parallel.attention import choose_ulysses_size

    if mode in ("ulysses",):
        if heads % sp:
            raise ConfigError(
                f"key 'sequence_parallel_mode': ulysses needs {what} ({heads}) divisible by "
                f"sequence_parallel_size ({sp}); use hybrid or zigzag_ring"
            )
        return "ulysses", sp
    if mode in ("zigzag_ring", "llama3"):
        return mode, 1
    u = choose_ulysses_size(heads, kv_heads, sp)
    if mode == "auto":
        if u == sp:
            return "ulysses", sp
        if u == 1:
            return "zigzag_ring", 1
        return "hybrid", u
    # Explicit hybrid: a true hybrid whenever the query heads allow one. Prefer a degree that also divides the
    # K/V heads (no replication); otherwise Ulysses replicates K/V heads (MQA, few KV heads), as `ulysses` does.
    degrees = [d for d in range(sp - 1, 1, -1) if sp % d == 0 and heads % d == 0]
    if not degrees:
        raise ConfigError(
            f"key 'sequence_parallel_mode': hybrid needs a Ulysses degree strictly between 1 and sp={sp} that "
            f"divides {what}={heads}; there is none (use auto, ulysses or zigzag_ring)"
        )
    without_replication = [d for d in degrees if kv_heads % d == 0]
    return "hybrid", (without_replication or degrees)[0]


class SequenceParallel:
    """Owns the SP attention setup of one run. With sp == 1 and unpacked rows it is inactive (plain HF attention)."""

    def __init__(self, dims: ParallelDims, cfg: ParallelConfig, model_config, packed: bool, log=print):
        self.dims = dims
        heads, kv = attention_heads(model_config)
        # check_tensor_parallel has made sure tp divides both.
        self.mode, self.ulysses_size = resolve_sp_mode(cfg, heads // dims.tp, kv // dims.tp, dims.sp, dims.tp)
        self.active = dims.sp > 1 or packed
        self.windows = attention_windows(model_config)
        self.kernel = cfg.attention_kernel
        self.ulysses_group = None
        self.ring_group = None
        if self.mode == "hybrid":
            self.ulysses_group, self.ring_group = dims.hybrid_groups(self.ulysses_size)
        if dims.sp > 1 and dims.is_main:
            detail = f" (ulysses {self.ulysses_size} x ring {dims.sp // self.ulysses_size})" if self.mode == "hybrid" else ""
            tensor = f" tp={dims.tp}" if dims.tp > 1 else ""
            log(f"sequence parallel: sp={dims.sp} dp={dims.dp}{tensor} mode={self.mode}{detail}, "
                "document-aware attention")
        elif self.active and dims.is_main:
            log("packed rows: document-aware attention (no token attends across documents)")

    def apply(self, model: nn.Module, log=print) -> None:
        """Switch the model's attention to the SP implementation (registered, not patched)."""
        if not self.active:
            return
        from longtune.parallel.attention import ATTENTION_NAME, register_sp_attention
        from longtune.models.loader import unwrap_base

        register_sp_attention()
        if self.dims.is_main:
            device = self.dims.device.type
            fused = {"cuda": "PyTorch flash / memory-efficient SDPA kernels with log-sum-exp",
                     "cpu": "PyTorch's CPU flash kernel with log-sum-exp"}.get(device, "reference math kernel")
            log(f"attention kernel: {'reference math kernel' if self.kernel == 'math' else fused}")
        base = unwrap_base(model)
        if float(getattr(base.config, "attention_dropout", 0.0) or 0.0) > 0:
            if self.dims.is_main:
                log(f"notice: attention_dropout {base.config.attention_dropout} -> 0 (not reproducible across the ring)")
            base.config.attention_dropout = 0.0
            for module in base.modules():
                if hasattr(module, "attention_dropout"):
                    module.attention_dropout = 0.0
        base.set_attn_implementation(ATTENTION_NAME)

    def prepare(
        self, batch: Batch, pad_token_id: int, device: torch.device, neftune_scale: Tensor | None = None
    ) -> ModelInputs:
        """This rank's inputs. `neftune_scale` ([B, T], for the whole row) is cut like the tokens."""
        docs_per_row = max(1, int(batch.doc_ids.max()) + 1)
        sequence_ids = torch.where(
            batch.doc_ids >= 0,
            torch.arange(batch.doc_ids.shape[0]).unsqueeze(1) * docs_per_row + batch.doc_ids,
            torch.full_like(batch.doc_ids, -1),
        )
        following = torch.nn.functional.pad(batch.doc_ids[:, 1:], (0, 1), value=-1)
        last_token = (batch.doc_ids >= 0) & (batch.doc_ids != following)
        common = dict(num_sequences=batch.doc_ids.shape[0] * docs_per_row)
        if not self.active:
            return ModelInputs(
                input_ids=batch.input_ids.to(device),
                labels=batch.labels.to(device),
                position_ids=batch.position_ids.to(device),
                sp_context=None,
                neftune_scale=None if neftune_scale is None else neftune_scale.to(device),
                sequence_ids=sequence_ids.to(device),
                last_token=last_token.to(device),
                **common,
            )
        from longtune.parallel.attention import SPContext

        dims = self.dims
        shard = shard_for_sequence_parallel(
            batch.input_ids, batch.labels, batch.position_ids, batch.doc_ids, dims.sp, dims.sp_rank, pad_token_id
        )
        padded_docs = pad_row_tensors(batch.input_ids, batch.labels, batch.position_ids, batch.doc_ids, dims.sp,
                                      pad_token_id)[3]
        ctx = SPContext(
            mode=self.mode,
            group=dims.sp_group,
            sp_size=dims.sp,
            sp_rank=dims.sp_rank,
            seq_index=shard.seq_index.to(device),
            doc_ids=shard.doc_ids.to(device),
            ulysses_group=self.ulysses_group,
            ulysses_size=self.ulysses_size,
            ring_group=self.ring_group,
            ring_size=dims.sp // self.ulysses_size,
            row_doc_ids=padded_docs.cpu(),
            windows=self.windows,
            kernel=self.kernel,
        )
        cut = lambda x, pad: shard_tensor(x, dims.sp, dims.sp_rank, pad).to(device)  # noqa: E731
        return ModelInputs(
            input_ids=shard.input_ids.to(device),
            labels=shard.labels.to(device),
            position_ids=shard.position_ids.to(device),
            sp_context=ctx,
            neftune_scale=None if neftune_scale is None else cut(neftune_scale, 0.0),
            sequence_ids=cut(sequence_ids, -1),
            last_token=cut(last_token, False),
            sp_group=dims.sp_group,
            sp_size=dims.sp,
            **common,
        )
