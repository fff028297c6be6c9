"""Training objectives. Each stage maps a batch to a per-rank loss sum; the trainer divides by the stage's
normaliser summed over the whole optimizer step (loss tokens for sft/pt, pairs or examples otherwise)."""

from __future__ import annotations

from longtune.config import Config
from longtune.stages.base import StageOutput
from longtune.stages.lm import LMStage, lm_loss


def build_stage(cfg: Config):
    stage = cfg.train.stage
    if stage in ("sft", "pt"):
        return LMStage(stage)
    if stage == "dpo":
        from longtune.stages.preference import PreferenceStage

        return PreferenceStage(cfg.preference)
    if stage == "kto":
        from longtune.stages.kto import KTOStage

        return KTOStage(cfg.preference)
    from longtune.stages.rm import RewardStage

    return RewardStage()


__all__ = ["StageOutput", "build_stage", "lm_loss"]
