"""Causal-LM objective shared by `sft` and `pt`: the stages differ only in which tokens the data pipeline
labels (assistant spans vs everything) and in packing by default (pt). The normaliser is the number of loss
tokens."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from longtune.data.collate import loss_token_count
from longtune.losses.causal_lm import chunked_lm_loss
from longtune.models.loader import unwrap_base
from longtune.parallel.sequence import ModelInputs
from longtune.stages.base import DocumentStage, StageOutput, final_hidden_states

__all__ = ["LMStage", "PretrainStage", "final_hidden_states"]


class LMStage(DocumentStage):
    name: ClassVar[str] = "sft"

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def load_examples(self, cfg: Any, tokenizer: Any, split: str) -> tuple[list, Any]:
        from longtune.data import examples_from_config

        return examples_from_config(cfg, tokenizer, split)

    def normaliser(self, example) -> int:
        return loss_token_count(example)

    def loss(self, model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> StageOutput:
        hidden = final_hidden_states(model, inputs)
        head = unwrap_base(model).get_output_embeddings()
        loss_sum, count = chunked_lm_loss(hidden, inputs.labels, head, loss_chunk_size)
        return StageOutput(loss_sum=loss_sum, count=count)


class PretrainStage(LMStage):
    name: ClassVar[str] = "pt"
    packs_by_default: ClassVar[bool] = True  # as LLaMA-Factory
    pretraining: ClassVar[bool] = True
