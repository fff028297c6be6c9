"""The values the data pipeline hands on: one `Example` type for every row kind, the settings that shape encoding,
and the counts of what happened to the rows read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from longtune.data.templates import TemplateOptions

# What a row becomes: "lm" one document (sft, pt), "pairs" prompt + chosen then prompt + rejected (dpo, rm),
# "kto" prompt + completion then the KL document, with the completion's desirable flag.
RowKind = Literal["lm", "pairs", "kto"]


def stage_rows() -> dict[str, tuple[RowKind, bool]]:
    """The rows each registered stage trains on and whether they are pretraining texts, as the stages declare
    them (`Stage.rows`, `Stage.pretraining`): the data package keeps no stage knowledge of its own."""
    from longtune.stages import STAGES  # the stages load their data through this package: import when asked

    return {name: (cls.rows, cls.pretraining) for name, cls in STAGES.items()}

# formats.TASKS: what loading.py parses the rows of each kind as
TASK_OF_ROWS: dict[RowKind, str] = {"lm": "plain", "pairs": "preference", "kto": "kto"}


def stages_of(rows: RowKind) -> list[str]:
    """The stages that train on rows of this kind, in registry order."""
    return [stage for stage, (kind, _) in stage_rows().items() if kind == rows]


def stages_of_task(task: str) -> str:
    """The stages whose rows are parsed as formats task `task`, for messages: "sft or pt"."""
    (rows,) = [kind for kind, t in TASK_OF_ROWS.items() if t == task]
    return " or ".join(stages_of(rows))


@dataclass
class Example:
    """A training row: one document, or several concatenated (a preference pair, a KTO sample, a packed row)."""

    input_ids: list[int]
    labels: list[int]  # same length; -100 where not trained, else == input_ids[t]; NOT shifted
    doc_lengths: list[int] | None = None  # lengths of the concatenated documents; None: one document
    desirable: bool | None = None  # KTO: whether the first document's completion is desirable; else None

    def documents(self) -> list[int]:
        """The document lengths, a single-document row included."""
        return list(self.doc_lengths or [len(self.input_ids)])


@dataclass(frozen=True)
class EncodeSettings:
    """Everything that decides how the rows of a dataset become Examples (the same for every dataset of a load)."""

    rows: RowKind
    dataset_dir: str
    template: str  # the `template` key (a name, or "auto" for the tokenizer's own)
    chat_template: str | None  # auto: the tokenizer's jinja (None when it has none: pt on plain text needs none);
    # a named template: None (encoded from its slots, see templates.py)
    cutoff_len: int
    pretraining: bool = False  # lm rows: every token trained, texts end with eos, long rows split into pieces
    train_on_prompt: bool = False  # lm conversation rows: prompt tokens trained too
    max_samples: int | None = None  # rows kept per dataset
    skip_bad_rows: bool = False  # a malformed row is counted and left out instead of raising
    template_options: TemplateOptions = TemplateOptions()  # mask_history, default_system, enable_thinking, ...


@dataclass(frozen=True)
class MixSettings:
    """How the examples of several datasets are combined (mixing.py)."""

    strategy: str = "concat"
    interleave_probs: tuple[float, ...] = ()
    seed: int = 42


MAX_SKIPPED_EXAMPLES = 5  # error messages kept in DataStats.skipped_examples


@dataclass
class DataStats:
    """Counts of one load or one streamed pass; only the pipeline (pipeline.py) adds to them."""

    rows: int  # rows read (after num_samples / max_samples), skipped ones included
    kept: int  # rows that produced at least one example (a pt text may produce several pieces)
    truncated: int  # rows cut to cutoff_len (sft) or split into pieces (pt)
    dropped: int  # rows left with no trained token after truncation
    tokens: int  # tokens in all returned examples (after mixing)
    trained_tokens: int  # labels != -100 in all returned examples
    skipped: int = 0  # malformed rows left out (skip_bad_rows)
    skipped_examples: list[str] = field(default_factory=list)  # the first MAX_SKIPPED_EXAMPLES of their errors
    cache_hit: bool = field(default=False, compare=False)  # how the examples were obtained, not what they are

    @classmethod
    def empty(cls) -> DataStats:
        return cls(0, 0, 0, 0, 0, 0)
