"""Hybrid SP: Ulysses inside groups of `ulysses_size` consecutive SP ranks, zigzag ring across the groups.

After the Ulysses exchange each rank holds its group's tokens (2u zigzag chunks) on H/u heads; the ring then runs
over the ranks holding the same heads in every group.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from longtune.parallel.attention.blockwise import AttentionParams
from longtune.parallel.attention.planner import StepPlan
from longtune.parallel.attention.ring import ring_attention
from longtune.parallel.attention.ulysses import HeadsToSeq, scatter_heads


def hybrid_attention(
    q: Tensor, k: Tensor, v: Tensor, steps: list[StepPlan], ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup, params: AttentionParams,
) -> Tensor:
    """[B, Hq, T_local, D] output of this rank's tokens, all heads. `steps` plans the ring over the groups."""
    q, k, v = scatter_heads(q, k, v, ulysses_group, "ulysses_size")
    out = ring_attention(q, k, v, steps, ring_group, params)
    return HeadsToSeq.apply(out, ulysses_group)
