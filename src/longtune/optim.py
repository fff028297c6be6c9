"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules (warmup + decay)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from longtune.config import TrainConfig


def lr_lambda(t: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step s (Hugging Face conventions, so curves match LLaMA-Factory)."""
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
    kind = t.lr_scheduler_type

    def fn(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (s - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "cosine_with_min_lr":
            return t.min_lr_rate + (1.0 - t.min_lr_rate) * cosine
        return cosine

    if kind == "constant" and warmup > 0:
        return lambda s: 1.0  # plain `constant` ignores warmup, as in transformers
    return fn


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # Biases and norm weights are vectors; decaying them hurts (and HF Trainer exempts them too).
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )
