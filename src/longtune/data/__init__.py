"""Datasets to training examples: resolve names, parse rows, render with a chat template, tokenize with labels.

`load_examples` is the entry point; labels are NOT shifted (labels[t] == input_ids[t] where trained, else -100).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from longtune.data.cache import (
    cache_file,
    file_fingerprint,
    fingerprint,
    gc_paused,
    load_cached,
    save_cached,
    tokenizer_fingerprint,
)
from longtune.data.conversation import Conversation, TextDocument
from longtune.data.encode import (
    IGNORE_INDEX,
    assistant_char_spans,
    conversation_labels,
    render_messages,
    split_into_pieces,
    tokenize_batch,
    truncate_conversation,
    with_eos,
)
from longtune.data.loading import ParsedRow, load_dataset, resolve_dataset
from longtune.data.mixing import check_mix_settings, mix_examples
from longtune.data.templates import resolve_chat_template
from longtune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from longtune.config import Config

STAGES = ("sft", "pt")
MAX_SKIPPED_EXAMPLES = 5  # error messages kept in DataStats.skipped_examples
ENCODE_BATCH = 1024  # rows tokenized per call of the fast tokenizer


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; -100 where not trained, else == input_ids[t]; NOT shifted


@dataclass
class DataStats:
    rows: int  # rows read (after num_samples / max_samples), skipped ones included
    kept: int  # rows that produced at least one example (a pt text may produce several pieces)
    truncated: int  # rows cut to cutoff_len (sft) or split into pieces (pt)
    dropped: int  # rows left with no trained token after truncation
    tokens: int  # tokens in all returned examples (after mixing)
    trained_tokens: int  # labels != -100 in all returned examples
    skipped: int = 0  # malformed rows left out (skip_bad_rows)
    skipped_examples: list[str] = field(default_factory=list)  # the first MAX_SKIPPED_EXAMPLES of their errors
    cache_hit: bool = field(default=False, compare=False)  # how the examples were obtained, not what they are


def load_examples(
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
    cache_dir: str | None = None,
    overwrite_cache: bool = False,
    skip_bad_rows: bool = False,
) -> tuple[list[Example], DataStats]:
    """Examples from `datasets` (max_samples caps each), mixed by `mix_strategy`, and counts of what happened to rows.

    sft: conversations only, assistant turns trained (all tokens with train_on_prompt), over-long rows cut
    keeping the last response. pt: texts (+eos) and rendered conversations, all trained, cut into pieces.
    A row is dropped when no label at position >= 1 is trained: position 0 never is a target after the shift.
    A malformed row raises DataError naming file and row, or with skip_bad_rows is left out and counted.
    The result is cached under `cache_dir` (default: see cache.default_cache_dir) keyed by every input that
    shapes it; a second identical call loads it without tokenizing unless `overwrite_cache`.
    """
    names = checked_dataset_names(datasets, tokenizer=tokenizer, stage=stage, cutoff_len=cutoff_len)
    check_mix_settings(mix_strategy, interleave_probs, len(names))  # before any tokenizing

    try:
        resolved_template: str | None = resolve_chat_template(template, tokenizer)
    except ConfigError:  # pt on plain text needs no template; a conversation will raise this again
        resolved_template = None
    key = fingerprint(
        {
            "datasets": [dataset_fingerprint(name, dataset_dir) for name in names],
            "template": [template, resolved_template],
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "stage": stage,
            "cutoff_len": cutoff_len,
            "train_on_prompt": train_on_prompt,
            "max_samples": max_samples,
            "mix": [mix_strategy, list(interleave_probs), seed if mix_strategy != "concat" else None],
            "skip_bad_rows": skip_bad_rows,
        }
    )
    path = cache_file(cache_dir, key)
    cached = None if overwrite_cache else _from_cache(path)
    if cached is not None:
        return cached

    stats = DataStats(0, 0, 0, 0, 0, 0)
    with gc_paused():
        per_dataset = [
            _encode_dataset(
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
    examples = mix_examples(per_dataset, strategy=mix_strategy, interleave_probs=interleave_probs, seed=seed,
                            names=names)
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.trained_tokens = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    saved = asdict(stats)
    del saved["cache_hit"]
    save_cached(path, examples, saved)
    return examples, stats


def examples_from_config(
    cfg: Config, tokenizer, split: Literal["train", "eval"] = "train"
) -> tuple[list[Example], DataStats]:
    """`load_examples` with every data key of `cfg`: the one call the trainer and `longtune data` share.

    `train` loads `dataset` mixed by mix_strategy; `eval` loads `eval_dataset` concatenated (each example once).
    """
    d = cfg.data
    mixed = split == "train"
    return load_examples(
        list(d.dataset if mixed else d.eval_dataset),
        dataset_dir=d.dataset_dir,
        tokenizer=tokenizer,
        template=d.template,
        stage=cfg.train.stage,
        cutoff_len=d.cutoff_len,
        train_on_prompt=d.train_on_prompt,
        max_samples=d.max_samples,
        mix_strategy=d.mix_strategy if mixed else "concat",
        interleave_probs=d.interleave_probs if mixed else (),
        seed=cfg.train.seed,
        cache_dir=d.data_cache_dir,
        overwrite_cache=d.overwrite_cache,
        skip_bad_rows=d.skip_bad_rows,
    )


def _from_cache(path: Path) -> tuple[list[Example], DataStats] | None:
    cached = load_cached(path)
    if cached is None:
        return None
    pairs, saved = cached
    try:
        stats = DataStats(**saved)
    except TypeError:  # written with another DataStats layout: a miss
        return None
    stats.cache_hit = True
    with gc_paused():
        return [Example(ids, labels) for ids, labels in pairs], stats


def dataset_fingerprint(name: str, dataset_dir: str) -> dict:
    """What identifies a dataset's rows: its files (by content or stat) and how its entry says to read them."""
    spec = resolve_dataset(name, Path(dataset_dir))
    return {
        "name": name,
        "files": [file_fingerprint(f) for f in spec.files],
        "formatting": spec.formatting,
        "columns": dict(spec.columns),
        "tags": dict(spec.tags),
        "num_samples": spec.num_samples,
        "ranking": spec.ranking,
    }


def checked_dataset_names(datasets: list[str], *, tokenizer, stage: str, cutoff_len: int) -> list[str]:
    """The dataset names (comma-separated entries split), after the checks every sft/pt load needs."""
    if stage not in STAGES:
        raise ConfigError(f"stage: load_examples handles {', '.join(STAGES)}, got '{stage}'")
    if not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise ConfigError(f"cutoff_len: expected an integer >= 2, got {cutoff_len!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("model_name_or_path: the tokenizer must be a fast (Rust) tokenizer to locate label spans")
    names = [part.strip() for name in datasets for part in str(name).split(",") if part.strip()]
    if not names:
        raise ConfigError("dataset: no dataset given")
    return names


def count_skipped(stats: DataStats, error: DataError) -> None:
    """Record a malformed row left out under skip_bad_rows."""
    stats.rows += 1
    stats.skipped += 1
    if len(stats.skipped_examples) < MAX_SKIPPED_EXAMPLES:
        stats.skipped_examples.append(str(error))


def _encode_dataset(
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
) -> list[Example]:
    """The examples of one dataset, in row order; row counts go into `stats`.

    Every row is parsed first (load_dataset), then rows are encoded ENCODE_BATCH at a time.
    """
    rows = load_dataset(
        name,
        dataset_dir=Path(dataset_dir),
        max_samples=max_samples,
        on_bad_row=(lambda error: count_skipped(stats, error)) if skip_bad_rows else None,
    )
    encode = functools.partial(encode_rows, tokenizer=tokenizer, template=template, stage=stage,
                               cutoff_len=cutoff_len, train_on_prompt=train_on_prompt, skip_bad_rows=skip_bad_rows,
                               stats=stats)
    return list(encode_in_batches(rows, encode))


Row = TypeVar("Row")
Encoded = TypeVar("Encoded")


def encode_in_batches(rows: Iterable[Row], encode: Callable[[list[Row]], list[Encoded]]) -> Iterator[Encoded]:
    """`encode` over ENCODE_BATCH rows at a time (one fast-tokenizer call each), the results in row order. Works on
    a list or a stream: a batch's rows are let go before its results are handed on, and each result is popped
    from the batch's list, so nothing is held past the consumer's use of it."""
    source = iter(rows)
    while batch := list(itertools.islice(source, ENCODE_BATCH)):
        encoded = encode(batch)
        del batch
        encoded.reverse()
        while encoded:
            yield encoded.pop()


def encode_rows(
    rows: list[ParsedRow],
    *,
    tokenizer,
    template: str,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool,
    skip_bad_rows: bool,
    stats: DataStats,
) -> list[Example]:
    """The examples of parsed rows, in order: each row is rendered alone (a bad row fails alone, naming its file
    and row), then all are tokenized in one call. Row counts go into `stats`; tokens are counted by the caller."""
    chat_template: str | None = None  # resolved on the first conversation: pt on plain text needs no template
    rendered: list[_RenderedRow] = []
    for row in rows:
        if isinstance(row.item, Conversation) and chat_template is None:
            chat_template = resolve_chat_template(template, tokenizer)
        try:
            rendered.append(_render_row(row, tokenizer, chat_template, stage))
        except DataError as error:
            if not skip_bad_rows:
                raise
            count_skipped(stats, error)
    examples: list[Example] = []
    for item, (ids, offsets) in zip(rendered, _tokenize_rendered(rendered, tokenizer), strict=True):
        new, truncated = _finish_row(item, ids, offsets, tokenizer, cutoff_len, train_on_prompt)
        stats.rows += 1
        stats.truncated += truncated
        if not new:
            stats.dropped += 1
            continue
        stats.kept += 1
        examples.extend(new)
    return examples


@dataclass(frozen=True)
class _RenderedRow:
    text: str
    spans: list[tuple[int, int]] | None  # assistant character spans (sft); None: every token trained (pt)
    plain_text: bool  # a pretraining text: the tokenizer's own special tokens, then eos


def _render_row(row: ParsedRow, tokenizer, chat_template: str | None, stage: str) -> _RenderedRow:
    """The text a row trains on; DataError (naming file and row) when the row cannot be rendered for `stage`."""
    where = f"{row.source} row {row.row_number}"
    if isinstance(row.item, TextDocument):
        if stage != "pt":
            raise DataError(
                f"{where}: plain-text rows are for pretraining; set stage: pt, or use alpaca/sharegpt/"
                f"messages rows for sft"
            )
        return _RenderedRow(row.item.text, None, plain_text=True)
    assert chat_template is not None
    if stage == "pt":
        text = render_messages(tokenizer, chat_template, row.item.messages(), False, where)
        return _RenderedRow(text, None, plain_text=False)
    text, spans = assistant_char_spans(row.item, tokenizer, chat_template, where)
    return _RenderedRow(text, spans, plain_text=False)


def _tokenize_rendered(
    rendered: list[_RenderedRow], tokenizer
) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
    """Ids (and character offsets where labels need them) of each rendered row, in order."""
    out: list[tuple[list[int], list[tuple[int, int]] | None]] = [([], None)] * len(rendered)
    # one call per kind: plain texts get the tokenizer's special tokens, and only sft rows need offsets
    for kind in ((False, False), (False, True), (True, False)):
        plain_text, with_offsets = kind
        picked = [i for i, r in enumerate(rendered) if (r.plain_text, r.spans is not None) == kind]
        texts = [rendered[i].text for i in picked]
        encoded = tokenize_batch(tokenizer, texts, add_special_tokens=plain_text, with_offsets=with_offsets)
        for i, result in zip(picked, encoded, strict=True):
            out[i] = result
    return out


def _finish_row(
    row: _RenderedRow,
    ids: list[int],
    offsets: list[tuple[int, int]] | None,
    tokenizer,
    cutoff_len: int,
    train_on_prompt: bool,
) -> tuple[list[Example], bool]:
    """The examples of one row (none when it is dropped) and whether it was truncated (or split, for pt)."""
    if row.spans is None:
        pieces = split_into_pieces(with_eos(ids, tokenizer) if row.plain_text else ids, cutoff_len)
        return [Example(piece, list(piece)) for piece in pieces], len(pieces) > 1
    assert offsets is not None
    encoded = conversation_labels(ids, offsets, row.spans, train_on_prompt=train_on_prompt)
    ids, labels = truncate_conversation(encoded.input_ids, encoded.labels, encoded.response_start, cutoff_len)
    truncated = len(ids) < len(encoded.input_ids)
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return [], truncated
    return [Example(ids, labels)], truncated


__all__ = [
    "Example",
    "DataStats",
    "load_examples",
    "examples_from_config",
    "encode_rows",
    "encode_in_batches",
    "dataset_fingerprint",
    "checked_dataset_names",
    "count_skipped",
    "IGNORE_INDEX",
]
