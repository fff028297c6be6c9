"""DPO-family stage (`stage: dpo`, `pref_loss`: sigmoid | ipo | hinge | simpo | orpo).

Each row holds one pair as two documents (prompt+chosen, prompt+rejected) in one forward, attention kept inside
each document. Sequence log-prob sums are reduced over the SP group first; length averages (IPO, SimPO, ORPO)
are taken after that, from the global token counts, so they are per sequence, not per rank. Every SP rank then
computes the same pair losses; each contributes 1/sp of them, which also makes the summed gradient exact.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from longtune.config import Config
from longtune.data.example import RowKind
from longtune.losses.preference import REFERENCE_FREE_LOSS_TYPES, SequenceLogps, dpo_loss, sft_term
from longtune.parallel.sequence import ModelInputs
from longtune.stages.base import DocumentStage, StageOutput, load_pairs, metric_vector, sequence_logps, split_pairs

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")


class PreferenceStage(DocumentStage):
    name: ClassVar[str] = "dpo"
    docs_per_row: ClassVar[int] = 2
    rows: ClassVar[RowKind] = "pairs"
    needs_pref_beta: ClassVar[bool] = True
    metric_names = PAIR_METRICS

    def __init__(self, cfg: Config):
        self.cfg = cfg.preference
        self.uses_reference = self.cfg.pref_loss not in REFERENCE_FREE_LOSS_TYPES

    def load_examples(self, cfg: Any, tokenizer: Any, split: str) -> tuple[list, Any]:
        return load_pairs(cfg, tokenizer, split)

    def normaliser(self, example) -> int:
        return 1  # the loss is a mean over the pairs of the optimizer step

    def reference_logps(self, model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> Tensor:
        sums, _ = sequence_logps(model, inputs, loss_chunk_size)
        return sums.detach()

    def loss(self, model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> StageOutput:
        sums, counts = sequence_logps(model, inputs, loss_chunk_size)
        valid = split_pairs(counts)[0] > 0  # blank rows (lockstep padding) hold no pair
        safe_counts = counts.clamp_min(1)
        chosen = SequenceLogps(*(split_pairs(sums)[0], split_pairs(safe_counts)[0]))
        rejected = SequenceLogps(*(split_pairs(sums)[1], split_pairs(safe_counts)[1]))
        ref_c = ref_r = None
        if self.uses_reference:
            if inputs.reference is None:
                raise RuntimeError("pref_loss needs reference log-probs but none were computed")
            ref_c = SequenceLogps(split_pairs(inputs.reference)[0], chosen.count)
            ref_r = SequenceLogps(split_pairs(inputs.reference)[1], rejected.count)
        c = self.cfg
        out = dpo_loss(chosen, rejected, ref_c, ref_r, loss_type=c.pref_loss, beta=c.pref_beta,
                       label_smoothing=c.dpo_label_smoothing, simpo_gamma=c.simpo_gamma)
        per_pair = out.loss
        if c.pref_ftx > 0:
            per_pair = per_pair + c.pref_ftx * sft_term(chosen)
        mask = valid.to(per_pair.dtype)
        sp = inputs.sp_size
        n = mask.sum()
        sums = out.metric_sums(mask)
        metrics = metric_vector([sums[name] for name in self.metric_names], sp)
        return StageOutput(loss_sum=(per_pair * mask).sum() / sp, count=n.detach() / sp, metrics=metrics)
