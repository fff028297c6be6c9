"""Best-fit-decreasing packing of examples into rows of `cutoff_len` tokens.

A packed row is an Example with its document lengths; collate turns them into per-document position ids and
document ids, and shifts labels within each document, so that no token attends to, or predicts, another document.
`pack_stream` packs a stream window by window (streaming), with the same packer.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from longtune.data.example import Example


@dataclass
class PackingStats:
    documents: int
    rows: int
    tokens: int
    capacity: int

    @property
    def efficiency(self) -> float:
        """Filled tokens / row capacity."""
        return self.tokens / max(1, self.rows * self.capacity)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices. Each item goes, longest first, into the open bin with the least room that fits it."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than the row capacity {capacity}")
        pos = bisect.bisect_left(free, (size, -1))
        if pos < len(free):
            room, b = free.pop(pos)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, b))
    return [sorted(b) for b in bins]


def pack_examples(examples: list[Example], capacity: int) -> tuple[list[Example], PackingStats]:
    """Pack single-document examples into rows of at most `capacity` tokens; documents keep
    their original relative order inside a row, and rows are ordered by their first document."""
    lengths = [len(e.input_ids) for e in examples]
    bins = sorted(best_fit_decreasing(lengths, capacity), key=lambda b: b[0])
    rows = []
    for b in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in b:
            ids.extend(examples[i].input_ids)
            labels.extend(examples[i].labels)
        rows.append(Example(ids, labels, [lengths[i] for i in b]))
    return rows, PackingStats(documents=len(examples), rows=len(rows), tokens=sum(lengths), capacity=capacity)


def pack_stream(
    examples: Iterable[Example], capacity: int, window: int, stats: PackingStats
) -> Iterator[Example]:
    """`pack_examples` over consecutive windows of `window` documents: at most one window is held at a time, and
    every document lands in exactly one row. `stats` accumulates over the windows packed so far."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    stream = iter(examples)
    while chunk := list(itertools.islice(stream, window)):
        rows, packed = pack_examples(chunk, capacity)
        del chunk
        stats.documents += packed.documents
        stats.rows += packed.rows
        stats.tokens += packed.tokens
        yield from rows
