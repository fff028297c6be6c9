"""Combine the encoded examples of several datasets: concatenate, or interleave by sampling probabilities.

The interleave strategies reproduce Hugging Face `datasets.interleave_datasets` with explicit probabilities
(same numpy draws for the same seed): `interleave_under` = stopping_strategy "first_exhausted", `interleave_over`
= "all_exhausted" (datasets that ran out start again from their first example). `mix_streams` gives the same
order over iterators whose lengths are not known in advance (streaming).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from longtune.errors import ConfigError, DataError

MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
_DRAW_BLOCK = 1000  # HF draws dataset choices in blocks of 1000; the same blocks give the same order per seed

T = TypeVar("T")


def check_mix_settings(strategy: str, interleave_probs: Sequence[float], num_datasets: int) -> np.ndarray | None:
    """The sampling probabilities (uniform when none are given; None for concat); ConfigError when they don't fit."""
    if strategy not in MIX_STRATEGIES:
        raise ConfigError(f"mix_strategy: expected one of {', '.join(MIX_STRATEGIES)}, got '{strategy}'")
    if strategy == "concat":
        if interleave_probs:
            raise ConfigError("interleave_probs: needs mix_strategy: interleave_under or interleave_over")
        return None
    if not interleave_probs:
        return np.full(num_datasets, 1.0 / num_datasets)
    probs = np.asarray(interleave_probs, dtype=np.float64)
    if len(probs) != num_datasets:
        raise ConfigError(
            f"interleave_probs: needs one probability per dataset ({num_datasets}), got {len(probs)}"
        )
    if probs.min() < 0 or abs(probs.sum() - 1.0) > 1e-6:
        raise ConfigError(f"interleave_probs: must be >= 0 and sum to 1, got {list(interleave_probs)}")
    return probs / probs.sum()


def interleave_order(
    lengths: Sequence[int], probs: np.ndarray, *, seed: int, oversample: bool
) -> list[tuple[int, int]]:
    """(dataset, index) pairs in draw order.

    Each draw picks a dataset with `probs` and takes its next example, wrapping around after its last one.
    Without oversampling the order ends with the draw that uses up the first dataset to run out; with it, with
    the draw that uses up the last one. Datasets with probability 0 are never drawn and never awaited.
    """
    n = len(lengths)
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    drawable = probs > 0
    if not drawable.any():
        raise ConfigError("interleave_probs: at least one probability must be > 0")
    rng = np.random.default_rng(seed)
    blocks: list[np.ndarray] = []
    counts = np.zeros(n, dtype=np.int64)
    reached = np.zeros(n, dtype=bool)
    while not (reached[drawable].all() if oversample else reached[drawable].any()):
        block = rng.choice(n, size=_DRAW_BLOCK, p=probs)
        blocks.append(block)
        counts += np.bincount(block, minlength=n)
        reached = counts >= lengths_arr
    draws = np.concatenate(blocks)
    # The draw that uses up dataset s is its lengths[s]-th occurrence; stop right after the first (under) or
    # the last (over) of those positions.
    exhausted_at = [int(np.flatnonzero(draws == s)[lengths[s] - 1]) for s in range(n) if drawable[s] and reached[s]]
    used = draws[: (max(exhausted_at) if oversample else min(exhausted_at)) + 1]
    index = np.empty(len(used), dtype=np.int64)
    for s in range(n):
        where = np.flatnonzero(used == s)
        if len(where):
            index[where] = np.arange(len(where)) % lengths[s]
    return list(zip(used.tolist(), index.tolist(), strict=True))


def mix_examples(
    per_dataset: Sequence[Sequence[T]],
    *,
    strategy: str,
    interleave_probs: Sequence[float] = (),
    seed: int = 42,
    names: Sequence[str] | None = None,
) -> list[T]:
    """One list from the per-dataset example lists, by `strategy` (concat | interleave_under | interleave_over)."""
    probs = check_mix_settings(strategy, interleave_probs, len(per_dataset))
    if probs is None:
        return [example for examples in per_dataset for example in examples]
    oversample = strategy == "interleave_over"
    _check_oversample(probs, oversample, names)
    for s, examples in enumerate(per_dataset):
        if probs[s] > 0 and not examples:
            raise _nothing_to_interleave(s, names)
    order = interleave_order([len(e) for e in per_dataset], probs, seed=seed, oversample=oversample)
    return [per_dataset[s][i] for s, i in order]


def mix_streams(
    sources: Sequence[Callable[[], Iterator[T]]],
    *,
    strategy: str,
    interleave_probs: Sequence[float] = (),
    seed: int = 42,
    names: Sequence[str] | None = None,
) -> Iterator[T]:
    """`mix_examples` over streams: `sources[s]()` opens dataset s from its start (called again whenever
    interleave_over wraps around it). Same order as mix_examples over the lists the sources yield.

    Interleaving takes the draws of `interleave_order` one at a time and reads every source one item ahead, so
    the draw that takes a source's last item is known as such without knowing the source's length.
    """
    probs = check_mix_settings(strategy, interleave_probs, len(sources))
    if probs is None:
        return itertools.chain.from_iterable(open_source() for open_source in sources)
    oversample = strategy == "interleave_over"
    _check_oversample(probs, oversample, names)
    return _interleave_streams(sources, probs, seed, oversample, names)


def _interleave_streams(
    sources: Sequence[Callable[[], Iterator[T]]],
    probs: np.ndarray,
    seed: int,
    oversample: bool,
    names: Sequence[str] | None,
) -> Iterator[T]:
    n = len(sources)
    end = object()
    streams: list[Iterator[T] | None] = [None] * n
    heads: list = [end] * n  # each open source's next item
    waiting = {s for s in range(n) if probs[s] > 0}  # drawable sources not yet used up
    rng = np.random.default_rng(seed)
    while True:
        for s in rng.choice(n, size=_DRAW_BLOCK, p=probs).tolist():
            stream = streams[s]
            if stream is None:
                stream = streams[s] = iter(sources[s]())
                heads[s] = next(stream, end)
                if heads[s] is end:
                    raise _nothing_to_interleave(s, names)
            item, heads[s] = heads[s], next(stream, end)
            yield item
            if heads[s] is end:  # this draw used source s up: it starts again on its next draw
                streams[s] = None
                waiting.discard(s)
                if not oversample or not waiting:
                    return


def _check_oversample(probs: np.ndarray, oversample: bool, names: Sequence[str] | None) -> None:
    never_drawn = np.flatnonzero(probs == 0)
    if oversample and len(never_drawn):
        raise ConfigError(
            f"interleave_probs: dataset '{_name(int(never_drawn[0]), names)}' has probability 0, so interleave_over "
            f"can never use it up; give it a probability > 0 or remove it"
        )


def _nothing_to_interleave(s: int, names: Sequence[str] | None) -> DataError:
    return DataError(f"dataset '{_name(s, names)}': no examples to interleave (every row was dropped or skipped)")


def _name(s: int, names: Sequence[str] | None) -> str:
    return names[s] if names is not None else f"#{s + 1}"
