"""Best-fit-decreasing packing (capacity, completeness, efficiency vs first-fit) and collate of packed rows."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from longtune.data import Example
from longtune.data.collate import PAD_DOCUMENT, collate
from longtune.data.packing import best_fit_decreasing, pack_examples

IGNORE = -100


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Reference: each item, in the given order, into the first bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, size in enumerate(lengths):
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(i)
                room[b] -= size
                break
        else:
            bins.append([i])
            room.append(capacity - size)
    return bins


def check_bins(bins: list[list[int]], lengths: list[int], capacity: int) -> None:
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every item exactly once
    assert all(b for b in bins)
    assert max(sum(lengths[i] for i in b) for b in bins) <= capacity


@pytest.mark.parametrize("seed", range(5))
def test_bfd_respects_capacity_and_keeps_every_item_once(seed):
    rng = random.Random(seed)
    capacity = rng.choice([16, 100, 512])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 300))]
    check_bins(best_fit_decreasing(lengths, capacity), lengths, capacity)


def test_bfd_exact_fits_and_oversize_item():
    # 6+4 and 7+3 fill two bins exactly, 5 sits alone: the optimum, found by best fit on the sorted items.
    bins = best_fit_decreasing([4, 7, 5, 3, 6], 10)
    assert sorted(bins) == [[0, 4], [1, 3], [2]]
    with pytest.raises(ValueError, match="11 tokens"):
        best_fit_decreasing([3, 11], 10)


def test_bfd_efficiency_on_lognormal_lengths_beats_first_fit():
    rng = np.random.default_rng(0)
    capacity = 2048
    lengths = np.clip(rng.lognormal(mean=5.0, sigma=1.0, size=2000), 1, capacity).astype(int).tolist()
    bins = best_fit_decreasing(lengths, capacity)
    check_bins(bins, lengths, capacity)
    efficiency = sum(lengths) / (len(bins) * capacity)
    reference = first_fit(lengths, capacity)
    check_bins(reference, lengths, capacity)
    print(f"BFD: {len(bins)} bins, efficiency {efficiency:.4f}; first-fit: {len(reference)} bins; "
          f"lower bound {math.ceil(sum(lengths) / capacity)}")
    assert efficiency >= 0.95
    assert len(bins) <= len(reference)
    assert len(bins) >= math.ceil(sum(lengths) / capacity)


def test_pack_examples_concatenates_documents_in_order():
    examples = [Example([i] * n, [IGNORE] + [i] * (n - 1)) for i, n in enumerate([5, 2, 6, 3, 4], start=1)]
    rows, stats = pack_examples(examples, 8)
    # BFD: 6 -> A, 5 -> B, 4 -> new C, 3 -> B (room 3), 2 -> A (room 2); rows ordered by their first document.
    assert [r.doc_lengths for r in rows] == [[5, 3], [2, 6], [4]]
    assert rows[0].input_ids == [1] * 5 + [4] * 3
    assert rows[0].labels == [IGNORE, 1, 1, 1, 1, IGNORE, 4, 4]
    assert rows[1].input_ids == [2] * 2 + [3] * 6
    assert (stats.documents, stats.rows, stats.tokens, stats.capacity) == (5, 3, 20, 8)
    assert stats.efficiency == pytest.approx(20 / 24)


def test_collate_packed_row_restarts_positions_and_shifts_within_documents():
    # Three documents of 3, 2 and 4 tokens; unshifted labels mark which tokens are trained.
    ids = [11, 12, 13, 21, 22, 31, 32, 33, 34]
    labels = [IGNORE, 12, 13, IGNORE, 22, IGNORE, IGNORE, 33, 34]
    packed = Example(ids, labels, [3, 2, 4])
    plain = Example([41, 42, 43], [IGNORE, 42, 43])
    batch = collate([packed, plain], pad_token_id=0)
    assert batch.packed and batch.num_rows == 2
    assert batch.input_ids.tolist() == [ids, [41, 42, 43, 0, 0, 0, 0, 0, 0]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert batch.position_ids[1, :3].tolist() == [0, 1, 2]
    P = PAD_DOCUMENT
    assert batch.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, P, P, P, P, P, P]]
    # Position t predicts token t+1 of the same document; each document's last position predicts nothing.
    assert batch.labels.tolist() == [
        [12, 13, IGNORE, 22, IGNORE, IGNORE, 33, 34, IGNORE],
        [42, 43, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE],
    ]
    assert batch.num_loss_tokens == 7


def test_collate_of_pack_examples_rows_counts_each_documents_targets():
    rng = random.Random(3)
    examples = []
    for _ in range(40):
        n = rng.randint(2, 30)
        ids = [rng.randint(1, 99) for _ in range(n)]
        examples.append(Example(ids, [t if rng.random() < 0.6 else IGNORE for t in ids]))
    rows, _ = pack_examples(examples, 64)
    batch = collate(rows, pad_token_id=0)
    # Each document contributes its trained tokens except position 0 (no position predicts a document's first).
    expected = sum(sum(lab != IGNORE for lab in e.labels[1:]) for e in examples)
    assert batch.num_loss_tokens == expected
    for r, row in enumerate(rows):
        starts = np.cumsum([0] + row.doc_lengths[:-1])
        assert (batch.position_ids[r, starts] == 0).all()
