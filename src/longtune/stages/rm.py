"""Reward-model stage: a scalar head on the decoder (HF ForSequenceClassification, num_labels=1) scores each
sequence at its last token; pairwise Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

Under SP the last token of a sequence lives on one rank: every rank scores only its local last tokens, and the
per-sequence rewards are summed over the SP group (autograd-aware) before the loss."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from longtune.constants import IGNORE_INDEX
from longtune.data.example import RowKind
from longtune.losses.preference import bradley_terry_correct, bradley_terry_loss
from longtune.models.loader import unwrap_base
from longtune.parallel.collectives import all_reduce_sum
from longtune.parallel.sequence import ModelInputs
from longtune.stages.base import (DocumentStage, ModelTask, StageOutput, final_hidden_states, load_pairs,
                                  metric_vector, split_pairs)


class RewardStage(DocumentStage):
    name: ClassVar[str] = "rm"
    docs_per_row: ClassVar[int] = 2
    rows: ClassVar[RowKind] = "pairs"
    model_task: ClassVar[ModelTask] = "reward"
    metric_names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def load_examples(self, cfg: Any, tokenizer: Any, split: str) -> tuple[list, Any]:
        return load_pairs(cfg, tokenizer, split)

    def normaliser(self, example) -> int:
        return 1

    def loss(self, model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> StageOutput:
        assert inputs.last_token is not None and inputs.sequence_ids is not None
        hidden = final_hidden_states(model, inputs)
        head = unwrap_base(model).score
        flat = hidden.reshape(-1, hidden.shape[-1])
        ids = inputs.sequence_ids.reshape(-1)
        marks = inputs.last_token.reshape(-1).nonzero(as_tuple=True)[0]
        values = head(flat.index_select(0, marks)).squeeze(-1)
        dtype = torch.promote_types(values.dtype, torch.float32)
        rewards = (hidden.sum() * 0.0).to(dtype) + torch.zeros(inputs.num_sequences, dtype=dtype,
                                                                device=hidden.device)
        rewards = rewards.index_add(0, ids.index_select(0, marks), values.to(dtype))
        rewards = all_reduce_sum(rewards, inputs.sp_group, inputs.sp_size)
        with torch.no_grad():
            trained = torch.zeros(inputs.num_sequences, dtype=dtype, device=hidden.device)
            keep = (inputs.labels.reshape(-1) != IGNORE_INDEX).nonzero(as_tuple=True)[0]
            trained = trained.index_add(0, ids.index_select(0, keep), torch.ones(keep.numel(), dtype=dtype,
                                                                              device=hidden.device))
            trained = all_reduce_sum(trained, inputs.sp_group, inputs.sp_size)
        chosen, rejected = split_pairs(rewards)
        valid = (split_pairs(trained)[0] > 0).to(dtype)  # blank lockstep rows hold no pair
        loss = bradley_terry_loss(chosen, rejected)
        sp = inputs.sp_size
        n = valid.sum()
        metrics = metric_vector(
            [
                ((chosen.detach() * valid).sum(), n),
                ((rejected.detach() * valid).sum(), n),
                (((chosen - rejected).detach() * valid).sum(), n),
                ((bradley_terry_correct(chosen, rejected).to(dtype) * valid).sum(), n),
            ],
            sp,
        )
        return StageOutput(loss_sum=(loss * valid).sum() / sp, count=n.detach() / sp, metrics=metrics)
