"""Training examples as a stream, for data larger than memory (`streaming: true`): rows are read, tokenized, mixed,
packed (sft, pt) and shuffled a window at a time, with the readers and per-row encoding of the in-memory loaders.

Nothing is cached: every pass (epoch, resume replay, every rank) reads and tokenizes the files again.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from longtune.data.lm import config_lm_inputs, lm_inputs
from longtune.data.example import DataStats, Example, RowKind, stage_rows
from longtune.data.loading import resolve_dataset
from longtune.data.packing import PackingStats, pack_stream
from longtune.data.pipeline import split_names, stream_all
from longtune.data.preference import pair_inputs

if TYPE_CHECKING:
    from longtune.config import Config

T = TypeVar("T")


def stream_examples(datasets: list[str], *, stats: DataStats | None = None, **options: Any) -> Iterator[Example]:
    """One pass over `datasets`: the examples `load_examples` returns for the same `options` (the keywords of
    `lm_inputs`), in the same order, read ENCODE_BATCH rows at a time. Row counts, tokens and trained tokens
    accumulate in `stats` as it is read.

    Names, settings and the tokenizer are checked now; files are opened when the stream reaches them.
    """
    names, settings, mix = lm_inputs(datasets, **options)
    return stream_all(names, settings, mix, options["tokenizer"], stats if stats is not None else DataStats.empty())


def stream_from_config(
    cfg: Config, tokenizer, stats: DataStats | None = None, *, rows: RowKind | None = None
) -> Iterator[Example]:
    """One pass over the training datasets of `cfg`, mixed, in order: the examples `examples_from_config`,
    `load_pair_examples` or `load_kto_examples` return, as `rows` says (default: the rows of cfg's stage).

    KTO KL documents pair within each dataset before mixing, as in memory: row i takes row i + 1's completion and
    a dataset's last row its first row's, so that last example comes out only when the dataset's pass ends.
    """
    kind = rows or stage_rows()[cfg.train.stage][0]
    if kind == "lm":
        names, settings, mix = config_lm_inputs(cfg, tokenizer, "train")
    else:
        names, settings, mix = pair_inputs(cfg, tokenizer, "train", kind)
    return stream_all(names, settings, mix, tokenizer, stats if stats is not None else DataStats.empty())


def arrange_epoch(
    examples: Iterable[Example], cfg: Config, *, epoch: int, packing_stats: PackingStats
) -> Iterator[Example]:
    """One epoch of training examples from one pass of the stream: past the first `held_out_count` (held out for
    evaluation), packed in windows of `packing_buffer` documents when packing (sft, pt), then shuffled by a buffer
    of `buffer_size` seeded with seed + epoch. Packing first, then shuffling rows, is the in-memory order too."""
    d = cfg.data
    stream: Iterator[Example] = itertools.islice(examples, held_out_count(cfg), None)
    if cfg.packing:
        stream = pack_stream(stream, d.cutoff_len, d.packing_buffer, packing_stats)
    return buffer_shuffle(stream, d.buffer_size, seed=cfg.train.seed + epoch)


def training_stream(
    cfg: Config, tokenizer, *, epoch: int, stats: DataStats, packing_stats: PackingStats, rows: RowKind | None = None
) -> Iterator[Example]:
    """Epoch `epoch` of the training examples (packed rows when packing), in the order the trainer consumes them;
    `rows` as for `stream_from_config`."""
    return arrange_epoch(stream_from_config(cfg, tokenizer, stats, rows=rows), cfg, epoch=epoch,
                         packing_stats=packing_stats)


def held_out_count(cfg: Config) -> int:
    """Examples at the head of the stream held out for evaluation: val_size, unless eval_dataset is given (then
    val_size is ignored, as without streaming)."""
    return 0 if cfg.data.eval_dataset else int(cfg.data.val_size)


def held_out_examples(cfg: Config, tokenizer, *, rows: RowKind | None = None) -> list[Example]:
    """The first `held_out_count` examples of the stream (the eval set under streaming, held in memory)."""
    return list(itertools.islice(stream_from_config(cfg, tokenizer, rows=rows), held_out_count(cfg)))


def buffer_shuffle(items: Iterable[T], buffer_size: int, *, seed: int) -> Iterator[T]:
    """A seeded shuffle holding at most `buffer_size` items: once the buffer is full, each new item takes the
    place of a uniformly drawn one, which is yielded; at the end the rest comes out shuffled. buffer_size 1 keeps
    the order. Deterministic for a seed (Python's Mersenne Twister), whatever the platform."""
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    rng = random.Random(seed)
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        out, buffer[j] = buffer[j], item
        yield out
    rng.shuffle(buffer)
    while buffer:
        yield buffer.pop()


def whole_file_notices(cfg: Config) -> list[str]:
    """One line per training file that streaming must read whole: a .json list has no row boundaries to stop at."""
    notices = []
    for name in split_names(cfg.data.dataset):
        for path in resolve_dataset(name, Path(cfg.data.dataset_dir)).files:
            if path.suffix.lower() == ".json":
                notices.append(
                    f"streaming: {path} is a JSON list, which cannot be read row by row: it is read whole into "
                    f"memory on every pass; convert it to .jsonl (one object per line) to stream it"
                )
    return notices


__all__ = [
    "stream_examples",
    "stream_from_config",
    "arrange_epoch",
    "training_stream",
    "held_out_count",
    "held_out_examples",
    "buffer_shuffle",
    "whole_file_notices",
]
