"""Preference pairs (stages dpo, rm) and KTO samples into rows of two documents with exact label masks.

Each document is prompt + one reply, rendered and located like an SFT conversation (encode.py): only the reply's
assistant span, end-of-turn markers included, is trained; the prompt never is. Labels are NOT shifted.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from longtune.data import DataStats, Example, count_skipped, dataset_fingerprint, encode_in_batches
from longtune.data.cache import (
    cache_file,
    fingerprint,
    gc_paused,
    load_cached,
    save_cached,
    tokenizer_fingerprint,
)
from longtune.data.conversation import Conversation, Turn
from longtune.data.encode import (
    IGNORE_INDEX,
    EncodedConversation,
    assistant_char_spans,
    conversation_labels,
    tokenize_batch,
    truncate_conversation,
)
from longtune.data.formats import KTOSample, PreferencePair
from longtune.data.loading import ParsedRow, load_dataset
from longtune.data.mixing import check_mix_settings, mix_examples
from longtune.data.templates import resolve_chat_template
from longtune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from longtune.config import Config

PAIR_STAGES = ("dpo", "rm")
KTO_STAGES = ("kto",)


@dataclass
class PairExample:
    """One row of two documents: prompt + chosen, then prompt + rejected (the same prompt, cut the same way)."""

    input_ids: list[int]
    labels: list[int]  # NOT shifted; -100 on the prompt tokens of both documents
    doc_lengths: list[int]  # [len(prompt + chosen), len(prompt + rejected)]


@dataclass
class KTOExample:
    """One row of two documents: prompt + completion (the target), then the KL document.

    The KL document pairs this example's prompt with the completion of the next example of its dataset
    ((i + 1) mod N), a mismatched pair whose log-ratio estimates the KL term of KTO (Ethayarajh et al. 2024, as
    TRL and LLaMA-Factory build it).
    """

    input_ids: list[int]
    labels: list[int]  # NOT shifted; -100 on the prompt tokens of both documents
    doc_lengths: list[int]  # [len(target), len(kl)]
    desirable: bool


def load_pair_examples(
    cfg: Config, tokenizer, split: Literal["train", "eval"] = "train"
) -> tuple[list[PairExample], DataStats]:
    """Preference pairs of `dataset` (mixed by mix_strategy) or `eval_dataset` (concatenated), for dpo and rm."""
    return _load(cfg, tokenizer, split, "preference")


def load_kto_examples(
    cfg: Config, tokenizer, split: Literal["train", "eval"] = "train"
) -> tuple[list[KTOExample], DataStats]:
    """KTO samples of `dataset` (mixed by mix_strategy) or `eval_dataset` (concatenated), each with its KL document.

    KL documents pair within each dataset, before mixing: example i takes the completion of example (i + 1) mod N
    of the same dataset (N: its rows after skipping bad ones), so mixing moves whole examples.
    """
    return _load(cfg, tokenizer, split, "kto")


def truncate_documents(
    documents: list[EncodedConversation], cutoff_len: int
) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """(ids, labels) of documents that share one prompt, each cut to at most cutoff_len tokens; whether any was cut.

    The rule of truncate_conversation applied to the longest reply: the prompt keeps
    max(cutoff_len - longest reply, min(prompt, cutoff_len // 2)) tokens, its start and end (it loses its
    middle), so every reply fits whole whenever that is possible; replies are then cut from the right to the room
    left. All documents keep the same prompt tokens, so their log-probs compare replies to the same context.
    """
    prompt_len = max(d.response_start for d in documents)
    reply_len = max(len(d.input_ids) - d.response_start for d in documents)
    if prompt_len + reply_len <= cutoff_len:
        return [(d.input_ids, d.labels) for d in documents], False
    prompt_keep = max(cutoff_len - reply_len, min(prompt_len, cutoff_len // 2))
    reply_keep = cutoff_len - prompt_keep
    out = []
    for d in documents:
        p = d.response_start
        # A prompt with an empty reply, cut to prompt_keep tokens: truncate_conversation's head + tail cut.
        ids, labels = truncate_conversation(d.input_ids[:p], d.labels[:p], p, prompt_keep)
        out.append((ids + d.input_ids[p : p + reply_keep], labels + d.labels[p : p + reply_keep]))
    return out, True


@dataclass(frozen=True)
class PreferenceInputs:
    """What a preference/KTO load reads, once its settings are checked: shared by the in-memory and streamed paths."""

    task: Literal["preference", "kto"]
    names: list[str]  # dataset names, comma-separated entries split
    mix_strategy: str  # the train split's mix_strategy; concat for eval
    interleave_probs: tuple[float, ...]
    chat_template: str


def preference_inputs(cfg: Config, tokenizer, split: str, task: Literal["preference", "kto"]) -> PreferenceInputs:
    """The datasets of `split` for `task` (pairs: dpo/rm, kto), after the checks every load needs (stage, cutoff,
    fast tokenizer, mix settings, chat template), before any row is read."""
    stages = PAIR_STAGES if task == "preference" else KTO_STAGES
    if cfg.train.stage not in stages:
        raise ConfigError(f"stage: {task} data is for stage {' or '.join(stages)}, got '{cfg.train.stage}'")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    d = cfg.data
    mixed = split == "train"
    key_name = "dataset" if mixed else "eval_dataset"
    names = [part.strip() for name in (d.dataset if mixed else d.eval_dataset) for part in str(name).split(",")]
    names = [name for name in names if name]
    if not names:
        raise ConfigError(f"{key_name}: no dataset given")
    if not isinstance(d.cutoff_len, int) or d.cutoff_len < 2:
        raise ConfigError(f"cutoff_len: expected an integer >= 2, got {d.cutoff_len!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("model_name_or_path: the tokenizer must be a fast (Rust) tokenizer to locate label spans")
    mix_strategy = d.mix_strategy if mixed else "concat"
    interleave_probs = tuple(d.interleave_probs) if mixed else ()
    check_mix_settings(mix_strategy, interleave_probs, len(names))  # before any tokenizing
    return PreferenceInputs(task, names, mix_strategy, interleave_probs, resolve_chat_template(d.template, tokenizer))


def _load(
    cfg: Config, tokenizer, split: str, task: Literal["preference", "kto"]
) -> tuple[list, DataStats]:
    inputs = preference_inputs(cfg, tokenizer, split, task)
    d = cfg.data
    names, mix_strategy, interleave_probs = inputs.names, inputs.mix_strategy, inputs.interleave_probs
    chat_template = inputs.chat_template

    key = fingerprint(
        {
            "task": task,  # no key of load_examples: never the same file as an sft/pt cache
            "datasets": [dataset_fingerprint(name, d.dataset_dir) for name in names],
            "template": [d.template, chat_template],
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "cutoff_len": d.cutoff_len,
            "max_samples": d.max_samples,
            "mix": [mix_strategy, list(interleave_probs), cfg.train.seed if mix_strategy != "concat" else None],
            "skip_bad_rows": d.skip_bad_rows,
        }
    )
    path = cache_file(d.data_cache_dir, key)
    cached = None if d.overwrite_cache else _from_cache(path, task)
    if cached is not None:
        return cached

    stats = DataStats(0, 0, 0, 0, 0, 0)
    with gc_paused():
        per_dataset = [
            _encode_dataset(
                name,
                task=task,
                dataset_dir=d.dataset_dir,
                tokenizer=tokenizer,
                chat_template=chat_template,
                cutoff_len=d.cutoff_len,
                max_samples=d.max_samples,
                skip_bad_rows=d.skip_bad_rows,
                stats=stats,
            )
            for name in names
        ]
    examples = mix_examples(
        per_dataset, strategy=mix_strategy, interleave_probs=interleave_probs, seed=cfg.train.seed, names=names
    )
    stats.tokens = sum(len(e.input_ids) for e in examples)
    stats.trained_tokens = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    saved = asdict(stats)
    del saved["cache_hit"]
    documents = [doc for e in examples for doc in _documents(e)]
    desirable = [e.desirable for e in examples] if task == "kto" else None
    save_cached(path, documents, {"data_stats": saved, "desirable": desirable})
    return examples, stats


def _documents(example: PairExample | KTOExample) -> list[Example]:
    first = example.doc_lengths[0]
    return [
        Example(example.input_ids[:first], example.labels[:first]),
        Example(example.input_ids[first:], example.labels[first:]),
    ]


def _from_cache(path: Path, task: str) -> tuple[list, DataStats] | None:
    cached = load_cached(path)
    if cached is None:
        return None
    documents, saved = cached
    desirable = saved.get("desirable")
    try:
        stats = DataStats(**saved["data_stats"])
    except (KeyError, TypeError):  # written with another layout: a miss
        return None
    if len(documents) % 2 or (task == "kto" and (desirable is None or len(desirable) * 2 != len(documents))):
        return None
    stats.cache_hit = True
    examples: list = []
    with gc_paused():
        for i in range(0, len(documents), 2):
            (ids_a, labels_a), (ids_b, labels_b) = documents[i], documents[i + 1]
            lengths = [len(ids_a), len(ids_b)]
            if task == "kto":
                examples.append(KTOExample(ids_a + ids_b, labels_a + labels_b, lengths, bool(desirable[i // 2])))
            else:
                examples.append(PairExample(ids_a + ids_b, labels_a + labels_b, lengths))
    return examples, stats


def _encode_dataset(
    name: str,
    *,
    task: str,
    dataset_dir: str,
    tokenizer,
    chat_template: str,
    cutoff_len: int,
    max_samples: int | None,
    skip_bad_rows: bool,
    stats: DataStats,
) -> list:
    """The examples of one dataset, in row order; row counts go into `stats`.

    Every row is parsed first (load_dataset), then rows are encoded ENCODE_BATCH at a time.
    """
    rows = load_dataset(
        name,
        dataset_dir=Path(dataset_dir),
        max_samples=max_samples,
        on_bad_row=(lambda error: count_skipped(stats, error)) if skip_bad_rows else None,
        task=task,
    )
    encode = functools.partial(encode_preference_rows, task=task, tokenizer=tokenizer, chat_template=chat_template,
                               cutoff_len=cutoff_len, skip_bad_rows=skip_bad_rows, stats=stats)
    return list(encode_in_batches(rows_with_replies(rows), encode))


def rows_with_replies(rows: Iterable[ParsedRow]) -> Iterator[tuple[ParsedRow, tuple[str, str]]]:
    """Each parsed row with the two replies to its prompt: chosen and rejected, or (KTO) its completion and the
    next row's, the last row taking the first row's (wrapping around).

    Works on a stream: KTO rows are read one ahead and only the first row's completion is remembered, so the
    last row comes out once the rows have run out.
    """
    first_completion: str | None = None
    previous: ParsedRow | None = None
    for row in rows:
        item = row.item
        if isinstance(item, PreferencePair):
            yield row, (item.chosen, item.rejected)
            continue
        assert isinstance(item, KTOSample)
        if previous is None:
            first_completion = item.completion
        else:
            yield previous, (previous.item.completion, item.completion)
        previous = row
    if previous is not None:
        assert first_completion is not None
        yield previous, (previous.item.completion, first_completion)


def encode_preference_rows(
    rows: list[tuple[ParsedRow, tuple[str, str]]],
    *,
    task: str,
    tokenizer,
    chat_template: str,
    cutoff_len: int,
    skip_bad_rows: bool,
    stats: DataStats,
) -> list:
    """The PairExamples (task "preference") or KTOExamples ("kto") of rows with their replies, in order: each row
    is rendered alone (a bad row fails alone, naming its file and row, or is skipped and counted), then all are
    tokenized in one call. Row counts go into `stats`; tokens are counted by the caller."""
    rendered: list[tuple[ParsedRow, list[tuple[str, tuple[int, int]]]]] = []
    for row, replies in rows:
        where = f"{row.source} row {row.row_number}"
        try:
            rendered.append(
                (row, [_render_reply(row.item.prompt, reply, tokenizer, chat_template, where) for reply in replies])
            )
        except DataError as error:
            if not skip_bad_rows:
                raise
            count_skipped(stats, error)
    texts = [text for _, documents in rendered for text, _ in documents]
    encoded = iter(tokenize_batch(tokenizer, texts, add_special_tokens=False, with_offsets=True))
    examples: list = []
    for row, documents in rendered:
        labelled = []
        for _, span in documents:
            ids, offsets = next(encoded)
            assert offsets is not None
            labelled.append(conversation_labels(ids, offsets, [span], train_on_prompt=False))
        kept, truncated = truncate_documents(labelled, cutoff_len)
        stats.rows += 1
        stats.truncated += truncated
        # position 0 of a document is never a target after the shift: a reply must train a later token
        if any(all(label == IGNORE_INDEX for label in labels[1:]) for _, labels in kept):
            stats.dropped += 1
            continue
        stats.kept += 1
        (a, a_labels), (b, b_labels) = kept
        lengths = [len(a), len(b)]
        if task == "kto":
            assert isinstance(row.item, KTOSample)
            examples.append(KTOExample(a + b, a_labels + b_labels, lengths, row.item.desirable))
        else:
            examples.append(PairExample(a + b, a_labels + b_labels, lengths))
    return examples


def _render_reply(
    prompt: Conversation, reply: str, tokenizer, chat_template: str, where: str
) -> tuple[str, tuple[int, int]]:
    """The rendered prompt + reply and the character span of the reply's assistant turn (as SFT locates it)."""
    conversation = Conversation(prompt.turns + (Turn("assistant", reply),), prompt.system)
    text, spans = assistant_char_spans(conversation, tokenizer, chat_template, where)
    return text, spans[-1]


__all__ = [
    "PairExample",
    "KTOExample",
    "load_pair_examples",
    "load_kto_examples",
    "truncate_documents",
    "PreferenceInputs",
    "preference_inputs",
    "rows_with_replies",
    "encode_preference_rows",
    "PAIR_STAGES",
    "KTO_STAGES",
]
