"""Datasets to training examples: resolve names, parse rows, render with a chat template, tokenize with labels.

`load_examples` is the entry point; labels are NOT shifted (labels[t] == input_ids[t] where trained, else -100).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from longtune.data.conversation import Conversation, TextDocument
from longtune.data.encode import (
    IGNORE_INDEX,
    encode_conversation,
    encode_rendered,
    encode_text,
    split_into_pieces,
    truncate_conversation,
)
from longtune.data.loading import load_dataset
from longtune.data.templates import resolve_chat_template
from longtune.errors import ConfigError, DataError

STAGES = ("sft", "pt")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; -100 where not trained, else == input_ids[t]; NOT shifted


@dataclass
class DataStats:
    rows: int  # rows read (after num_samples / max_samples)
    kept: int  # rows that produced at least one example (a pt text may produce several pieces)
    truncated: int  # rows cut to cutoff_len (sft) or split into pieces (pt)
    dropped: int  # rows left with no trained token after truncation
    tokens: int  # tokens in all examples
    trained_tokens: int  # labels != -100 in all examples


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
) -> tuple[list[Example], DataStats]:
    """Examples from `datasets` in order (max_samples caps each dataset), and counts of what happened to rows.

    sft: conversations only, assistant turns trained (all tokens with train_on_prompt), over-long rows cut
    keeping the last response. pt: texts (+eos) and rendered conversations, all trained, cut into pieces.
    A row is dropped when no label at position >= 1 is trained: position 0 never is a target after the shift.
    """
    if stage not in STAGES:
        raise ConfigError(f"stage: load_examples handles {', '.join(STAGES)}, got '{stage}'")
    if not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise ConfigError(f"cutoff_len: expected an integer >= 2, got {cutoff_len!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("model_name_or_path: the tokenizer must be a fast (Rust) tokenizer to locate label spans")
    names = [part.strip() for name in datasets for part in str(name).split(",") if part.strip()]
    if not names:
        raise ConfigError("dataset: no dataset given")
    chat_template: str | None = None  # resolved on the first conversation: pt on plain text needs no template
    examples: list[Example] = []
    stats = DataStats(0, 0, 0, 0, 0, 0)
    for name in names:
        for row in load_dataset(name, dataset_dir=Path(dataset_dir), max_samples=max_samples):
            stats.rows += 1
            where = f"{row.source} row {row.row_number}"
            if isinstance(row.item, Conversation) and chat_template is None:
                chat_template = resolve_chat_template(template, tokenizer)
            if stage == "pt":
                if isinstance(row.item, TextDocument):
                    ids = encode_text(row.item, tokenizer)
                else:
                    ids = encode_rendered(row.item, tokenizer, chat_template, where)
                pieces = split_into_pieces(ids, cutoff_len)
                stats.truncated += len(pieces) > 1
                new = [Example(piece, list(piece)) for piece in pieces]
            else:
                if isinstance(row.item, TextDocument):
                    raise DataError(
                        f"{where}: plain-text rows are for pretraining; set stage: pt, or use alpaca/sharegpt/"
                        f"messages rows for sft"
                    )
                encoded = encode_conversation(
                    row.item, tokenizer, chat_template, train_on_prompt=train_on_prompt, where=where
                )
                ids, labels = truncate_conversation(
                    encoded.input_ids, encoded.labels, encoded.response_start, cutoff_len
                )
                stats.truncated += len(ids) < len(encoded.input_ids)
                if all(label == IGNORE_INDEX for label in labels[1:]):
                    stats.dropped += 1
                    continue
                new = [Example(ids, labels)]
            stats.kept += 1
            for example in new:
                stats.tokens += len(example.input_ids)
                stats.trained_tokens += sum(label != IGNORE_INDEX for label in example.labels)
            examples.extend(new)
    return examples, stats


__all__ = ["Example", "DataStats", "load_examples", "IGNORE_INDEX"]
