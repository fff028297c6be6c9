"""Training objectives. Each stage owns everything stage-specific (how its examples load, documents per row,
model head, reference use, metrics, normaliser, loss); the trainer divides each stage's loss sum by its
normaliser summed over the whole optimizer step. Adding a stage: one module here and one line in STAGES."""

from __future__ import annotations

from longtune.config import Config
from longtune.stages.base import Stage, StageOutput
from longtune.stages.kto import KTOStage
from longtune.stages.lm import LMStage, PretrainStage
from longtune.stages.preference import PreferenceStage
from longtune.stages.rm import RewardStage

STAGES: dict[str, type] = {
    "sft": LMStage,
    "pt": PretrainStage,
    "dpo": PreferenceStage,
    "kto": KTOStage,
    "rm": RewardStage,
}


def stage_class(name: str) -> type:
    """The class registered for `stage: name` (its class attributes are the facts config checks need)."""
    return STAGES[name]


def build_stage(cfg: Config) -> Stage:
    return stage_class(cfg.train.stage)(cfg)


__all__ = ["STAGES", "Stage", "StageOutput", "build_stage", "stage_class"]
