"""The per-call context of sequence-parallel attention (SPContext: the SP group, this rank's tokens, the batch's
block plans and the kernel choice) and the group arithmetic of the hybrid mode.

transformers hands the context to every attention layer as the `sp_context` keyword; nothing here is global.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

from longtune.parallel.attention.kernels import KERNEL_CHOICES
from longtune.parallel.attention.planner import AttentionPlans
from longtune.parallel.layout import local_token_index

SP_MODES = ("zigzag_ring", "ulysses", "llama3", "hybrid")


@dataclass
class SPContext:
    """Everything the attention function needs to know about the SP group and this rank's tokens.

    `seq_index` and `doc_ids` are [B, T_local]: each local token's index in the padded row and its document id
    (from `layout.shard_for_sequence_parallel`). `group` is None when sp_size == 1. The hybrid mode also needs
    `ulysses_group` (ulysses_size consecutive SP ranks) and `ring_group` (one rank of each Ulysses group), both
    from `make_hybrid_groups`.

    `row_doc_ids` is the whole padded row's document ids [B, T] on the host (needed when sp_size > 1; with
    sp_size == 1 the local tokens are the row). From it the context plans, once, the attention blocks of every
    layer (`plans`, see AttentionPlans) for each of `windows` (the model's sliding windows; None = no window).
    `kernel` is the config's `attention_kernel`, read by every layer of this call.
    """

    mode: str
    group: dist.ProcessGroup | None
    sp_size: int
    sp_rank: int
    seq_index: Tensor
    doc_ids: Tensor
    ulysses_group: dist.ProcessGroup | None = None
    ulysses_size: int = 1
    ring_group: dist.ProcessGroup | None = None
    ring_size: int = 1
    row_doc_ids: Tensor | None = None
    windows: tuple[int | None, ...] = (None,)
    kernel: str = "auto"  # config `attention_kernel`: auto/fused = fused kernels where possible, math = reference
    # Made by __post_init__ unless given. It is a field that can be given so that copies made with
    # dataclasses.replace (FSDP's forward-input casting rebuilds dataclass arguments that way) keep the plans
    # instead of planning again for every wrapped module.
    plans: AttentionPlans | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in SP_MODES:
            raise ValueError(f"unknown sequence parallel mode {self.mode!r}; expected one of {SP_MODES}")
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(f"attention kernel must be one of {KERNEL_CHOICES}, got {self.kernel!r}")
        if self.sp_size > 1 and self.group is None:
            raise ValueError(f"sp_size={self.sp_size} needs a process group")
        if self.mode == "hybrid" and self.sp_size > 1:
            if self.ulysses_size * self.ring_size != self.sp_size:
                raise ValueError(
                    f"hybrid SP needs ulysses_size * ring_size == sp_size, got "
                    f"{self.ulysses_size} * {self.ring_size} != {self.sp_size}"
                )
            if self.ulysses_group is None or self.ring_group is None:
                raise ValueError("hybrid SP needs ulysses_group and ring_group (see make_hybrid_groups)")
        if self.plans is not None:
            return
        if self.row_doc_ids is None:
            if self.sp_size > 1:
                raise ValueError(f"sp_size={self.sp_size} needs row_doc_ids (the padded row's document ids)")
            rank_index, rank_docs = [self.seq_index], [self.doc_ids]
        else:
            padded = self.row_doc_ids.shape[-1]
            rank_index = [local_token_index(padded, self.sp_size, r).expand(self.row_doc_ids.shape[0], -1)
                          for r in range(self.sp_size)]
            rank_docs = [self.row_doc_ids.cpu().gather(1, index) for index in rank_index]
        self.plans = AttentionPlans(self.mode, self.sp_rank, self.ulysses_size, rank_index, rank_docs,
                                    self.seq_index.device, self.windows)


def hybrid_group_ranks(sp_ranks: list[int], ulysses_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rank lists of the Ulysses groups (consecutive SP ranks) and of the ring groups (same slot in each)."""
    sp = len(sp_ranks)
    if ulysses_size < 1 or sp % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} must divide sequence_parallel_size={sp}")
    ring_size = sp // ulysses_size
    ulysses = [sp_ranks[g * ulysses_size : (g + 1) * ulysses_size] for g in range(ring_size)]
    ring = [sp_ranks[slot::ulysses_size] for slot in range(ulysses_size)]
    return ulysses, ring


def make_hybrid_groups(
    sp_ranks: list[int], ulysses_size: int
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Create the hybrid sub-groups of one SP group; returns (ulysses_group, ring_group) of this rank.

    Collective over the whole world: `dist.new_group` must be called by every process, in the same order, for
    every group. With several SP groups (dp > 1) every rank calls this for each SP group in the same order; a
    rank outside `sp_ranks` gets (None, None).
    """
    ulysses_lists, ring_lists = hybrid_group_ranks(sp_ranks, ulysses_size)
    me = dist.get_rank()
    mine_ulysses = mine_ring = None
    for ranks in ulysses_lists:
        group = dist.new_group(ranks)
        if me in ranks:
            mine_ulysses = group
    for ranks in ring_lists:
        group = dist.new_group(ranks)
        if me in ranks:
            mine_ring = group
    return mine_ulysses, mine_ring


def choose_ulysses_size(num_heads: int, num_kv_heads: int, sp: int) -> int:
    """`auto` hybrid: the largest Ulysses degree that needs no K/V head replication, gcd(kv_heads, sp).

    It also divides num_heads (kv_heads divides num_heads), so the Ulysses all-to-all is always possible.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    return math.gcd(num_kv_heads, sp)


def check_ulysses_heads(num_heads: int, ulysses_size: int, setting: str = "sequence_parallel_size") -> None:
    """Ulysses splits the attention heads over its ranks. `setting` names the degree in the message."""
    if num_heads % ulysses_size:
        raise ValueError(
            f"Ulysses sequence parallelism splits attention heads across ranks: num_attention_heads={num_heads} "
            f"is not divisible by {setting}={ulysses_size}. Use a degree that divides {num_heads}, or the "
            f"zigzag_ring or llama3 mode, or hybrid with ulysses_size=gcd(num_key_value_heads, sp) (auto)."
        )
