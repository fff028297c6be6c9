"""KTO stage (Ethayarajh et al. 2024). Each row holds the example (prompt + completion, with its desirable flag)
and a KL document (the same prompt with another example's completion) as two documents of one forward.

The KL reference point z0 = max(0, mean over the micro-batch's KL documents of log pi - log ref), detached and
averaged over every data-parallel rank (each SP rank holds the same sequence values and adds 1/sp of them).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from longtune.config import Config
from longtune.data.example import RowKind
from longtune.losses.preference import SequenceLogps, kto_kl_from_sums, kto_kl_sums, kto_loss
from longtune.parallel.sequence import ModelInputs
from longtune.stages.base import DocumentStage, StageOutput, metric_vector, sequence_logps, split_pairs


class KTOStage(DocumentStage):
    name: ClassVar[str] = "kto"
    docs_per_row: ClassVar[int] = 2  # the example and its KL document
    rows: ClassVar[RowKind] = "kto"
    needs_pref_beta: ClassVar[bool] = True
    uses_reference = True
    metric_names = ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")

    def __init__(self, cfg: Config):
        self.cfg = cfg.preference

    def load_examples(self, cfg: Any, tokenizer: Any, split: str) -> tuple[list, Any]:
        from longtune.data.preference import load_kto_examples

        return load_kto_examples(cfg, tokenizer, split)

    def row_flags(self, rows: list) -> Tensor:
        """Each row's desirable flag (blank lockstep rows: False; the loss masks them anyway)."""
        return torch.tensor([bool(r.desirable) for r in rows])

    def normaliser(self, example) -> int:
        return 1

    def reference_logps(self, model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> Tensor:
        sums, _ = sequence_logps(model, inputs, loss_chunk_size)
        return sums.detach()

    def loss(self, model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> StageOutput:
        sums, counts = sequence_logps(model, inputs, loss_chunk_size)
        if inputs.reference is None or inputs.flags is None:
            raise RuntimeError("KTO needs reference log-probs and desirable flags")
        target, kl_doc = split_pairs(sums)
        ref_target, ref_kl = split_pairs(inputs.reference)
        target_count = split_pairs(counts)[0]
        valid = (target_count > 0).to(sums.dtype)
        sp = inputs.sp_size
        kl_stats = kto_kl_sums(kl_doc, ref_kl, valid) / sp
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(kl_stats)
        z0 = kto_kl_from_sums(kl_stats).to(sums.dtype)
        safe = target_count.clamp_min(1)
        desirable = inputs.flags.to(torch.bool)
        out = kto_loss(SequenceLogps(target, safe), SequenceLogps(ref_target, safe), desirable, z0,
                       beta=self.cfg.pref_beta, chosen_weight=self.cfg.kto_chosen_weight,
                       undesirable_weight=self.cfg.kto_undesirable_weight)
        metric_sums = out.metric_sums(valid)
        metrics = metric_vector([metric_sums[name] for name in self.metric_names], sp)
        return StageOutput(loss_sum=(out.loss * valid).sum() / sp, count=valid.sum().detach() / sp, metrics=metrics)
