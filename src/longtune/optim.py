"""The optimizer (`optim`: AdamW, SGD, Adafactor, bitsandbytes' 8-bit / paged AdamW) with decoupled weight decay on
matrices only, and the learning-rate schedules (warmup + decay) with Hugging Face's formulas."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from longtune.config import TrainConfig
from longtune.errors import ConfigError


def lr_lambda(t: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step s: transformers.get_scheduler's formulas (its names and
    `lr_scheduler_kwargs`), so curves match LLaMA-Factory."""
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)
    kind = t.lr_scheduler_type
    kwargs = dict(t.lr_scheduler_kwargs or {})
    num_cycles = kwargs.get("num_cycles", 1.0 if kind == "cosine_with_restarts" else 0.5)
    min_lr_rate = kwargs.get("min_lr_rate", t.min_lr_rate)
    if "min_lr" in kwargs:
        min_lr_rate = kwargs["min_lr"] / t.learning_rate
    lr_end, power = kwargs.get("lr_end", 1e-7), kwargs.get("power", 1.0)
    if kind == "polynomial" and lr_end > t.learning_rate:
        raise ConfigError(f"key 'lr_scheduler_kwargs': lr_end ({lr_end}) must not exceed learning_rate "
                          f"({t.learning_rate})")

    def fn(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (s - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "polynomial":
            if s > total_steps:
                return lr_end / t.learning_rate
            decayed = (t.learning_rate - lr_end) * (1.0 - progress) ** power + lr_end
            return decayed / t.learning_rate
        if kind == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
        cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))
        if kind == "cosine_with_min_lr":
            return min_lr_rate + (1.0 - min_lr_rate) * cosine
        return cosine

    if kind == "constant" and warmup > 0:
        return lambda s: 1.0  # plain `constant` ignores warmup, as in transformers
    return fn


BITSANDBYTES_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                           "paged_adamw_32bit": "PagedAdamW32bit"}


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # Biases and norm weights are vectors; decaying them hurts (and HF Trainer exempts them too).
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    if t.optim == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate)
    if t.optim == "adafactor":
        # Hugging Face's `adafactor` runs with a fixed lr (relative_step=False); torch's Adafactor is that variant.
        return torch.optim.Adafactor(groups, lr=t.learning_rate)
    if t.optim in BITSANDBYTES_OPTIMIZERS:
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError(f"key 'optim': {t.optim} needs bitsandbytes (pip install bitsandbytes); or use "
                              f"adamw_torch") from None
        optimizer_class = getattr(bitsandbytes.optim, BITSANDBYTES_OPTIMIZERS[t.optim])
        return optimizer_class(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    # adamw_torch and adamw_torch_fused: the fused kernel wherever the parameters are on a GPU.
    return torch.optim.AdamW(
        groups,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )
