"""Training examples as a stream, for data larger than memory (`streaming: true`): rows are read, tokenized, mixed,
packed (sft, pt) and shuffled a window at a time, with the readers and per-row encoding of the in-memory loaders.

Nothing is cached: every pass (epoch, resume replay, every rank) reads and tokenizes the files again.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from longtune.data import (
    IGNORE_INDEX,
    DataStats,
    Example,
    checked_dataset_names,
    count_skipped,
    encode_in_batches,
    encode_rows,
)
from longtune.data.loading import iter_dataset, resolve_dataset
from longtune.data.mixing import mix_streams
from longtune.data.packing import PackingStats, pack_stream
from longtune.data.preference import (
    KTO_STAGES,
    PAIR_STAGES,
    KTOExample,
    PairExample,
    PreferenceInputs,
    encode_preference_rows,
    preference_inputs,
    rows_with_replies,
)

if TYPE_CHECKING:
    from longtune.config import Config

T = TypeVar("T")


def stream_examples(
    datasets: list[str],
    *,
    dataset_dir: str,
    tokenizer,
    template: str,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool = False,
    max_samples: int | None = None,
    mix_strategy: str = "concat",
    interleave_probs: tuple[float, ...] = (),
    seed: int = 42,
    skip_bad_rows: bool = False,
    stats: DataStats | None = None,
) -> Iterator[Example]:
    """One pass over `datasets`: the examples `load_examples` returns for the same arguments, in the same order,
    read ENCODE_BATCH rows at a time. Row counts, tokens and trained tokens accumulate in `stats` as it is read.

    Names, settings and the tokenizer are checked now; files are opened when the stream reaches them.
    """
    names = checked_dataset_names(datasets, tokenizer=tokenizer, stage=stage, cutoff_len=cutoff_len)
    for name in names:
        resolve_dataset(name, Path(dataset_dir))  # an unknown dataset fails here, not steps later
    stats = stats if stats is not None else DataStats(0, 0, 0, 0, 0, 0)
    sources = [
        functools.partial(
            _dataset_examples,
            name,
            dataset_dir=dataset_dir,
            tokenizer=tokenizer,
            template=template,
            stage=stage,
            cutoff_len=cutoff_len,
            train_on_prompt=train_on_prompt,
            max_samples=max_samples,
            skip_bad_rows=skip_bad_rows,
            stats=stats,
        )
        for name in names
    ]
    mixed = mix_streams(sources, strategy=mix_strategy, interleave_probs=interleave_probs, seed=seed, names=names)
    return _count_tokens(mixed, stats)


def stream_from_config(cfg: Config, tokenizer, stats: DataStats | None = None) -> Iterator:
    """One pass over the training datasets of `cfg`, mixed, in order, in the shape its stage trains on:
    `stream_examples` (sft, pt) or `stream_preference_examples` (dpo, rm, kto)."""
    if cfg.train.stage in PAIR_STAGES + KTO_STAGES:
        return stream_preference_examples(cfg, tokenizer, stats)
    d = cfg.data
    return stream_examples(
        list(d.dataset),
        dataset_dir=d.dataset_dir,
        tokenizer=tokenizer,
        template=d.template,
        stage=cfg.train.stage,
        cutoff_len=d.cutoff_len,
        train_on_prompt=d.train_on_prompt,
        max_samples=d.max_samples,
        mix_strategy=d.mix_strategy,
        interleave_probs=d.interleave_probs,
        seed=cfg.train.seed,
        skip_bad_rows=d.skip_bad_rows,
        stats=stats,
    )


def stream_preference_examples(
    cfg: Config, tokenizer, stats: DataStats | None = None
) -> Iterator[PairExample | KTOExample]:
    """One pass over the training datasets of a dpo/rm (PairExamples) or kto (KTOExamples) config: the examples
    `load_pair_examples` / `load_kto_examples` return, in the same order, read ENCODE_BATCH rows at a time.

    KTO KL documents pair within each dataset before mixing, as in memory: row i takes row i + 1's completion and
    a dataset's last row its first row's, so that last example comes out only when the dataset's pass ends.
    """
    inputs = preference_inputs(cfg, tokenizer, "train", "preference" if cfg.train.stage in PAIR_STAGES else "kto")
    d = cfg.data
    for name in inputs.names:
        resolve_dataset(name, Path(d.dataset_dir))  # an unknown dataset fails here, not steps later
    stats = stats if stats is not None else DataStats(0, 0, 0, 0, 0, 0)
    sources = [functools.partial(_preference_dataset_examples, name, cfg, inputs, tokenizer, stats)
               for name in inputs.names]
    mixed = mix_streams(sources, strategy=inputs.mix_strategy, interleave_probs=inputs.interleave_probs,
                        seed=cfg.train.seed, names=inputs.names)
    return _count_tokens(mixed, stats)


def arrange_epoch(
    examples: Iterable, cfg: Config, *, epoch: int, packing_stats: PackingStats
) -> Iterator:
    """One epoch of training examples from one pass of the stream: past the first `held_out_count` (held out for
    evaluation), packed in windows of `packing_buffer` documents when packing (sft, pt), then shuffled by a buffer
    of `buffer_size` seeded with seed + epoch. Packing first, then shuffling rows, is the in-memory order too."""
    d = cfg.data
    stream: Iterator = itertools.islice(examples, held_out_count(cfg), None)
    if cfg.packing:
        stream = pack_stream(stream, d.cutoff_len, d.packing_buffer, packing_stats)
    return buffer_shuffle(stream, d.buffer_size, seed=cfg.train.seed + epoch)


def training_stream(
    cfg: Config, tokenizer, *, epoch: int, stats: DataStats, packing_stats: PackingStats
) -> Iterator:
    """Epoch `epoch` of the training examples (Example or PackedExample; PairExample or KTOExample for dpo/rm/kto),
    in the order the trainer consumes them."""
    return arrange_epoch(stream_from_config(cfg, tokenizer, stats), cfg, epoch=epoch, packing_stats=packing_stats)


def held_out_count(cfg: Config) -> int:
    """Examples at the head of the stream held out for evaluation: val_size, unless eval_dataset is given (then
    val_size is ignored, as without streaming)."""
    return 0 if cfg.data.eval_dataset else int(cfg.data.val_size)


def held_out_examples(cfg: Config, tokenizer) -> list:
    """The first `held_out_count` examples of the stream (the eval set under streaming, held in memory)."""
    return list(itertools.islice(stream_from_config(cfg, tokenizer), held_out_count(cfg)))


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
    for name in cfg.data.dataset:
        for part in (p.strip() for p in str(name).split(",")):
            if not part:
                continue
            for path in resolve_dataset(part, Path(cfg.data.dataset_dir)).files:
                if path.suffix.lower() == ".json":
                    notices.append(
                        f"streaming: {path} is a JSON list, which cannot be read row by row: it is read whole into "
                        f"memory on every pass; convert it to .jsonl (one object per line) to stream it"
                    )
    return notices


def _dataset_examples(
    name: str,
    *,
    dataset_dir: str,
    tokenizer,
    template: str,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool,
    max_samples: int | None,
    skip_bad_rows: bool,
    stats: DataStats,
) -> Iterator[Example]:
    """The examples of one dataset, in row order, encoded ENCODE_BATCH rows at a time."""
    rows = iter_dataset(
        name,
        dataset_dir=Path(dataset_dir),
        max_samples=max_samples,
        on_bad_row=(lambda error: count_skipped(stats, error)) if skip_bad_rows else None,
    )
    encode = functools.partial(encode_rows, tokenizer=tokenizer, template=template, stage=stage,
                               cutoff_len=cutoff_len, train_on_prompt=train_on_prompt, skip_bad_rows=skip_bad_rows,
                               stats=stats)
    yield from encode_in_batches(rows, encode)


def _preference_dataset_examples(
    name: str, cfg: Config, inputs: PreferenceInputs, tokenizer, stats: DataStats
) -> Iterator[PairExample | KTOExample]:
    """The pair or KTO examples of one dataset, in row order, encoded ENCODE_BATCH rows at a time."""
    d = cfg.data
    rows = iter_dataset(
        name,
        dataset_dir=Path(d.dataset_dir),
        max_samples=d.max_samples,
        on_bad_row=(lambda error: count_skipped(stats, error)) if d.skip_bad_rows else None,
        task=inputs.task,
    )
    encode = functools.partial(encode_preference_rows, task=inputs.task, tokenizer=tokenizer,
                               chat_template=inputs.chat_template, cutoff_len=d.cutoff_len,
                               skip_bad_rows=d.skip_bad_rows, stats=stats)
    yield from encode_in_batches(rows_with_replies(rows), encode)


def _count_tokens(examples: Iterator[T], stats: DataStats) -> Iterator[T]:
    for example in examples:
        stats.tokens += len(example.input_ids)
        stats.trained_tokens += sum(label != IGNORE_INDEX for label in example.labels)
        yield example


__all__ = [
    "stream_examples",
    "stream_from_config",
    "stream_preference_examples",
    "arrange_epoch",
    "training_stream",
    "held_out_count",
    "held_out_examples",
    "buffer_shuffle",
    "whole_file_notices",
]
