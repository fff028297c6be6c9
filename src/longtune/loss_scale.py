"""Dynamic loss scaling for float16 training: the backward loss is multiplied by a scale so that small fp16
activation gradients do not underflow; a step whose gradients overflowed is skipped and the scale lowered.

Same rule and defaults as `torch.amp.GradScaler` (start 2**16, halve on overflow, double after 2000 clean steps),
written out here because the overflow decision must be one for the whole run: under FSDP2 every rank holds only
its shard of each gradient (a DTensor), and under SP/DP a rank's local gradients may be finite while another's
are not. The inf check is therefore a local flag all-reduced over every rank before anyone unscales or steps.
Its state is two numbers, saved as JSON in checkpoints (nothing to unpickle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from longtune.parallel.mesh import ParallelDims


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (its shard under FSDP2)."""
    return grad.to_local() if hasattr(grad, "to_local") else grad


@dataclass
class LossScaler:
    scale: float = 2.0**16
    clean_steps: int = 0  # steps without overflow since the scale last changed
    skipped_steps: int = 0  # steps skipped for overflow in the whole run
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def found_overflow(self, params: list[nn.Parameter], dims: ParallelDims) -> bool:
        """Whether any rank's gradient holds an inf or NaN (a collective: every rank calls it)."""
        # Count on the device (no host sync per parameter); offloaded gradients live on the host.
        bad = torch.zeros((), dtype=torch.float64, device=dims.device)
        for p in params:
            if p.grad is not None:
                bad += (~torch.isfinite(_local(p.grad))).any().to(bad.device, torch.float64)
        return float(dims.all_reduce_sum(bad)) > 0

    def unscale(self, params: list[nn.Parameter]) -> None:
        """Divide the (finite) gradients by the scale, before clipping and the optimizer step."""
        inverse = 1.0 / self.scale
        for p in params:
            if p.grad is not None:
                _local(p.grad).mul_(inverse)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("scale", "clean_steps", "skipped_steps"):
            setattr(self, key, type(getattr(self, key))(state[key]))
