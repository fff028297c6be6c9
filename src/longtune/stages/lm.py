"""Causal-LM objective shared by `sft` and `pt`: the stages differ only in which tokens the data pipeline
labels (assistant spans vs everything). The normaliser is the number of loss tokens."""

from __future__ import annotations

from torch import nn

from longtune.data.collate import loss_token_count
from longtune.losses.causal_lm import chunked_lm_loss
from longtune.models.loader import unwrap_base
from longtune.parallel.sequence import ModelInputs
from longtune.stages.base import StageOutput, final_hidden_states


class LMStage:
    metric_names: tuple[str, ...] = ()
    uses_reference = False

    def __init__(self, name: str):
        self.name = name

    def normaliser(self, example) -> int:
        return loss_token_count(example)

    def loss(self, model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> StageOutput:
        hidden = final_hidden_states(model, inputs)
        head = unwrap_base(model).get_output_embeddings()
        loss_sum, count = chunked_lm_loss(hidden, inputs.labels, head, loss_chunk_size)
        return StageOutput(loss_sum=loss_sum, count=count)


def lm_loss(model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> StageOutput:
    """The SFT/PT loss of one batch (kept as a function for tests and benchmarks)."""
    return LMStage("sft").loss(model, inputs, loss_chunk_size)
