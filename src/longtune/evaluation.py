"""Evaluation during training: when it is due (eval_strategy / eval_steps, always at the last step) and the mean
loss and stage metrics over the whole eval set (rows split over dp, sequences over sp)."""

from __future__ import annotations

from typing import Any

import torch

from longtune.config import Config
from longtune.forward import RunParts, blank_like, forward_loss
from longtune.metrics import metric_means


class Evaluator:
    """The eval set of a run and its schedule; `reference`: precomputed eval reference log-probs, if any."""

    def __init__(self, parts: RunParts, examples: list, cfg: Config, reference: Any = None):
        self.parts = parts
        self.examples = examples
        self.cfg = cfg
        self.reference = reference
        self.every = cfg.train.eval_steps or cfg.train.logging_steps

    def should_evaluate(self, step: int, total_steps: int, ends_epoch: bool) -> bool:
        t = self.cfg.train
        if not self.examples or t.eval_strategy == "no":
            return False
        if step == total_steps:
            return True
        if t.eval_strategy == "epoch":
            return ends_epoch
        return step % self.every == 0

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.parts, self.examples, self.cfg, self.reference)


def evaluate(parts: RunParts, examples: list, cfg: Config, reference: Any = None) -> dict[str, float]:
    """Mean loss over the whole eval set (rows split over dp, sequences over sp) and the stage's metrics."""
    root, dims, stage = parts.root, parts.dims, parts.stage
    was_training = root.training
    root.eval()
    sums = torch.zeros(2 + 2 * len(stage.metric_names), dtype=torch.float64, device=dims.device)
    with torch.no_grad():
        for ids in dims.lockstep_batches(len(examples), cfg.train.per_device_eval_batch_size):
            rows = [examples[i] for i in ids] or [blank_like(examples[0])]
            out = forward_loss(parts, rows, ids, cfg, reference)
            sums[0] += out.loss_sum.to(torch.float64)
            sums[1] += out.count.to(torch.float64)
            if out.metrics is not None:
                sums[2:] += out.metrics.to(sums.device)
    dims.all_reduce_sum(sums)
    root.train(was_training)
    # sp ranks each hold their share of loss and count, so the sums are over the whole eval set
    result = {"eval_loss": float(sums[0] / sums[1].clamp_min(1)), "eval_count": int(round(float(sums[1])))}
    result.update({f"eval_{k}": v for k, v in metric_means(stage.metric_names, sums[2:]).items()})
    return result
