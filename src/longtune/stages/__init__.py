"""Training objectives: each maps a batch to (loss_sum, count) for global-token normalisation."""

from longtune.stages.lm import StageOutput, lm_loss

STAGE_LOSSES = {"sft": lm_loss, "pt": lm_loss}

__all__ = ["STAGE_LOSSES", "StageOutput", "lm_loss"]
