"""What every training objective provides to the trainer (the `Stage` protocol): how its examples load, their
shape (documents per row, model head), a per-rank loss *sum*, the example normaliser that the trainer sums over
the whole optimizer step, and optional metric (sum, count) pairs. Shared helpers for sequence-level stages."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from longtune.data.example import RowKind
from longtune.models.loader import unwrap_base
from longtune.parallel.collectives import all_reduce_sum
from longtune.parallel.sequence import ModelInputs

ModelTask = Literal["causal", "reward"]


class StageOutput(NamedTuple):
    """A NamedTuple so that FSDP's root hooks see the tensors (pytree-flattenable)."""

    loss_sum: Tensor  # this rank's share of the step's loss sum (differentiable)
    count: Tensor  # this rank's share of the normaliser (for eval)
    metrics: Tensor | None = None  # [2 * len(metric_names)]: (sum, count) per metric, rank shares


class Stage(Protocol):
    """One training objective. Class attributes are static facts (config checks them before a stage exists)."""

    name: ClassVar[str]
    docs_per_row: ClassVar[int]  # 1: one document per row; 2: pairs / example + KL document in one row
    model_task: ClassVar[ModelTask]  # which head `load_model` puts on the decoder
    packs_by_default: ClassVar[bool]  # `packing` when the config leaves it unset
    needs_pref_beta: ClassVar[bool]  # the loss divides by / multiplies with pref_beta (must be > 0)
    rows: ClassVar[RowKind]  # what the data pipeline makes of a dataset row for this stage
    pretraining: ClassVar[bool]  # plain texts, every token trained (pt)
    uses_reference: bool  # per instance: a DPO-family loss may be reference-free
    metric_names: tuple[str, ...]

    def load_examples(self, cfg: Any, tokenizer: Any, split: str) -> tuple[list, Any]:
        """(examples, DataStats) of one split, in this stage's shape, through the data package."""
        ...

    def normaliser(self, example: Any) -> int:
        """What one example adds to the step's divisor (loss tokens, or 1 per pair/example)."""
        ...

    def row_flags(self, rows: list) -> Tensor | None:
        """Per-row booleans the loss needs besides the tokens (KTO: desirable), or None."""
        ...

    def loss(self, model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> StageOutput:
        ...


class DocumentStage:
    """Defaults shared by the stages: no flags, no reference."""

    docs_per_row: ClassVar[int] = 1
    model_task: ClassVar[ModelTask] = "causal"
    packs_by_default: ClassVar[bool] = False
    needs_pref_beta: ClassVar[bool] = False
    rows: ClassVar[RowKind] = "lm"
    pretraining: ClassVar[bool] = False
    uses_reference = False
    metric_names: tuple[str, ...] = ()

    def row_flags(self, rows: list) -> Tensor | None:
        return None


def load_pairs(cfg: Any, tokenizer: Any, split: str) -> tuple[list, Any]:
    """Rows of (prompt + chosen, prompt + rejected): the examples of dpo and rm."""
    from longtune.data.preference import load_pair_examples

    return load_pair_examples(cfg, tokenizer, split)


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """[2N] in (first, second) document order per row -> first [N], second [N] (chosen/rejected; KTO:
    example/KL document)."""
    return values[0::2], values[1::2]


def final_hidden_states(model: nn.Module, inputs: ModelInputs) -> Tensor:
    """Run the decoder stack only (heads are applied by the stage, chunk by chunk)."""
    decoder = unwrap_base(model).get_decoder()
    extra = {"sp_context": inputs.sp_context} if inputs.sp_context is not None else {}
    out = decoder(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False, **extra)
    return out.last_hidden_state


def sequence_logps(model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> tuple[Tensor, Tensor]:
    """Per-sequence target log-prob sums and token counts over the *whole* sequence (summed over SP ranks)."""
    from longtune.losses.causal_lm import chunked_sequence_logps

    hidden = final_hidden_states(model, inputs)
    head = unwrap_base(model).get_output_embeddings()
    assert inputs.sequence_ids is not None
    sums, counts = chunked_sequence_logps(
        hidden, inputs.labels, inputs.sequence_ids, inputs.num_sequences, head, loss_chunk_size
    )
    sums = all_reduce_sum(sums, inputs.sp_group, inputs.sp_size)
    with torch.no_grad():
        counts = all_reduce_sum(counts, inputs.sp_group, inputs.sp_size)
    return sums, counts


def metric_vector(values: list[tuple[Tensor, Tensor]], sp_size: int) -> Tensor:
    """(sum, count) pairs as one tensor. Every SP rank holds the same sequence-level values, so each rank
    contributes 1/sp of them: the all-reduce over the world then counts every sequence once."""
    flat = torch.stack([torch.stack([s.detach().double(), c.detach().double()]) for s, c in values]).reshape(-1)
    return flat / sp_size
