"""The one path from dataset names to Examples: read -> parse -> render -> tokenize -> label -> truncate -> count,
then mix. Readers are the only variation: `load_dataset` parses a whole dataset first (in memory, cached),
`iter_dataset` one row at a time (streaming); every other step is shared, so both give the same examples.

The pipeline alone adds to a DataStats: readers and encoders report a malformed row to the `on_bad_row` it hands
them, and return what they made.
"""

from __future__ import annotations

import functools
import itertools
import json
from datetime import datetime
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

from longtune.data.cache import (
    cache_file,
    file_fingerprint,
    fingerprint,
    gc_paused,
    load_cached,
    save_cached,
    tokenizer_fingerprint,
)
from longtune.data.conversation import Conversation, TextDocument, Turn
from longtune.data.encode import (
    IGNORE_INDEX,
    EncodedConversation,
    assistant_char_spans,
    conversation_labels,
    render_messages,
    split_into_pieces,
    tokenize_batch,
    truncate_conversation,
    truncate_documents,
    with_eos,
)
from longtune.data.example import (
    MAX_SKIPPED_EXAMPLES,
    TASK_OF_ROWS,
    DataStats,
    EncodeSettings,
    Example,
    MixSettings,
    RowKind,
)
from longtune.data.formats import KTOSample, PreferencePair
from longtune.data.loading import ParsedRow, iter_dataset, load_dataset, resolve_dataset
from longtune.data.mixing import mix_examples, mix_streams
from longtune.data.templates import (
    ChatTemplate,
    PieceTokenizer,
    TemplateOptions,
    TurnPair,
    encode_one_turn,
    encode_turn_pairs,
    named_template,
    resolve_chat_template,
    supervised_ids_and_labels,
    text_eos_id,
    thinking_messages,
    turn_pieces,
)
from longtune.errors import ConfigError, DataError
from longtune.io import atomic_write_text

ENCODE_BATCH = 1024  # rows tokenized per call of the fast tokenizer

Reader = Callable[..., Iterable[ParsedRow]]  # load_dataset or iter_dataset
OnBadRow = Callable[[DataError], None] | None  # None: a malformed row raises
T = TypeVar("T")


# ---------------------------------------------------------------- checks and settings


def split_names(datasets: Iterable[str]) -> list[str]:
    """Dataset names, comma-separated entries split."""
    return [part.strip() for name in datasets for part in str(name).split(",") if part.strip()]


def check_encoding_inputs(cutoff_len: int, tokenizer) -> None:
    """The checks every load needs before a row is read."""
    if not isinstance(cutoff_len, int) or cutoff_len < 2:
        raise ConfigError(f"cutoff_len: expected an integer >= 2, got {cutoff_len!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("model_name_or_path: the tokenizer must be a fast (Rust) tokenizer to locate label spans")


def optional_chat_template(template: str, tokenizer) -> str | None:
    """`template` resolved, or None when there is none: pt on plain text needs no template (a conversation row
    then raises the ConfigError when it is reached)."""
    try:
        return resolve_chat_template(template, tokenizer)
    except ConfigError:
        return None


# ---------------------------------------------------------------- all datasets of a load, mixed


def load_all(
    names: list[str],
    settings: EncodeSettings,
    mix: MixSettings,
    tokenizer,
    *,
    cache_dir: str | None,
    overwrite_cache: bool,
    tokenized: TokenizedFile | None = None,
) -> tuple[list[Example], DataStats]:
    """The examples of `names` in memory (each dataset parsed whole first), mixed, and their counts; cached under
    `cache_dir` keyed by every input that shapes them, so a second identical load tokenizes nothing.

    `tokenized` (LLaMA-Factory's tokenized_path): when its file exists the examples come from it and `names` are
    not read at all; otherwise they are tokenized and also saved there."""
    if tokenized is not None and tokenized.path.is_file():
        return tokenized.load(settings, tokenizer)
    path = cache_file(cache_dir, _cache_key(names, settings, mix, tokenizer))
    cached = None if overwrite_cache else _from_cache(path, settings.rows)
    if cached is not None:
        if tokenized is not None:
            tokenized.save(cached[0], cached[1], settings, tokenizer)
        return cached
    stats = DataStats.empty()
    with gc_paused():
        per_dataset = [list(dataset_examples(name, settings, tokenizer, read=load_dataset, stats=stats))
                       for name in names]
    mixed = mix_examples(per_dataset, strategy=mix.strategy, interleave_probs=mix.interleave_probs, seed=mix.seed,
                         names=names)
    examples = list(_counted(mixed, stats))
    _to_cache(path, examples, stats, settings.rows)
    if tokenized is not None:
        tokenized.save(examples, stats, settings, tokenizer)
    return examples, stats


@dataclass(frozen=True)
class TokenizedFile:
    """One split of a `tokenized_path` folder: `SPLIT.npz` (the cache's layout) and `SPLIT.json` saying which rows
    (stage) and tokenizer made it, so a folder written for another stage or tokenizer is refused, not misread."""

    folder: Path
    split: str

    @classmethod
    def of(cls, tokenized_path: str | None, split: str) -> TokenizedFile | None:
        return cls(Path(tokenized_path), split) if tokenized_path is not None else None

    @property
    def path(self) -> Path:
        return self.folder / f"{self.split}.npz"

    @staticmethod
    def _made_by(settings: EncodeSettings, tokenizer) -> dict:
        return {"rows": settings.rows, "pretraining": settings.pretraining, "cutoff_len": settings.cutoff_len,
                "tokenizer": tokenizer_fingerprint(tokenizer)}

    def save(self, examples: list[Example], stats: DataStats, settings: EncodeSettings, tokenizer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _to_cache(self.path, examples, stats, settings.rows)
        atomic_write_text(self.folder / f"{self.split}.json", json.dumps(self._made_by(settings, tokenizer)))

    def load(self, settings: EncodeSettings, tokenizer) -> tuple[list[Example], DataStats]:
        where = f"key 'tokenized_path': {self.path}"
        try:
            made_by = json.loads((self.folder / f"{self.split}.json").read_text())
        except (OSError, ValueError):
            raise DataError(f"{where} has no readable {self.split}.json beside it; it was not written by longtune "
                            "(delete the folder to tokenize again)") from None
        wanted = self._made_by(settings, tokenizer)
        differing = [k for k in wanted if made_by.get(k) != wanted[k]]
        if differing:
            raise DataError(f"{where} was tokenized with another {', '.join(differing)} than this run's; delete the "
                            "folder or point tokenized_path elsewhere")
        loaded = _from_cache(self.path, settings.rows)
        if loaded is None:
            raise DataError(f"{where} is unreadable (cut by a crash?); delete the folder to tokenize again")
        return loaded


def stream_all(
    names: list[str], settings: EncodeSettings, mix: MixSettings, tokenizer, stats: DataStats
) -> Iterator[Example]:
    """One pass over `names`, read one row at a time: the examples `load_all` returns, in the same order. Counts
    accumulate in `stats` as the stream is read; names are resolved now, files opened when the stream reaches them."""
    for name in names:
        resolve_dataset(name, Path(settings.dataset_dir))  # an unknown dataset fails here, not steps later
    sources = [functools.partial(dataset_examples, name, settings, tokenizer, read=iter_dataset, stats=stats)
               for name in names]
    mixed = mix_streams(sources, strategy=mix.strategy, interleave_probs=mix.interleave_probs, seed=mix.seed,
                        names=names)
    return _counted(mixed, stats)


def _counted(examples: Iterable[Example], stats: DataStats) -> Iterator[Example]:
    for example in examples:
        stats.tokens += len(example.input_ids)
        stats.trained_tokens += sum(label != IGNORE_INDEX for label in example.labels)
        yield example


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


def _cache_key(names: list[str], settings: EncodeSettings, mix: MixSettings, tokenizer) -> str:
    inputs = {
        "datasets": [dataset_fingerprint(name, settings.dataset_dir) for name in names],
        "template": _template_key(settings),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "cutoff_len": settings.cutoff_len,
        "max_samples": settings.max_samples,
        "mix": [mix.strategy, list(mix.interleave_probs), mix.seed if mix.strategy != "concat" else None],
        "skip_bad_rows": settings.skip_bad_rows,
    }
    if settings.rows == "lm":
        inputs |= {"stage": "pt" if settings.pretraining else "sft", "train_on_prompt": settings.train_on_prompt}
    else:  # "task" is no key of an lm load: never the same file as an sft/pt cache
        inputs["task"] = TASK_OF_ROWS[settings.rows]
    return fingerprint(inputs)


def _template_key(settings: EncodeSettings) -> list:
    """The template and the options that shape its tokens (with the date a llama3 tool prompt states); an `auto`
    load with default options keys as it did before these options existed."""
    key: list = [settings.template, settings.chat_template]
    if settings.template == "auto" and settings.template_options == TemplateOptions():
        return key
    options = asdict(settings.template_options)
    if (options["today"] is None and settings.template != "auto"
            and named_template(settings.template, settings.template_options).tool_format == "llama3"):
        options["today"] = datetime.now().strftime("%d %b %Y")
    return key + [options]


def _to_cache(path: Path, examples: list[Example], stats: DataStats, rows: RowKind) -> None:
    """lm rows are stored whole; two-document rows as their documents, with the KTO flags beside the counts."""
    saved = asdict(stats)
    del saved["cache_hit"]
    if rows == "lm":
        save_cached(path, examples, saved)
        return
    documents = []
    for example in examples:
        first = example.documents()[0]
        documents += [Example(example.input_ids[:first], example.labels[:first]),
                      Example(example.input_ids[first:], example.labels[first:])]
    desirable = [e.desirable for e in examples] if rows == "kto" else None
    save_cached(path, documents, {"data_stats": saved, "desirable": desirable})


def _from_cache(path: Path, rows: RowKind) -> tuple[list[Example], DataStats] | None:
    cached = load_cached(path)
    if cached is None:
        return None
    pairs, saved = cached
    try:
        stats = DataStats(**(saved if rows == "lm" else saved["data_stats"]))
    except (KeyError, TypeError):  # written with another layout: a miss
        return None
    stats.cache_hit = True
    if rows == "lm":
        with gc_paused():
            return [Example(ids, labels) for ids, labels in pairs], stats
    desirable = saved.get("desirable")
    if len(pairs) % 2 or (rows == "kto" and (desirable is None or len(desirable) * 2 != len(pairs))):
        return None
    examples: list[Example] = []
    with gc_paused():
        for i in range(0, len(pairs), 2):
            (ids_a, labels_a), (ids_b, labels_b) = pairs[i], pairs[i + 1]
            flag = bool(desirable[i // 2]) if rows == "kto" else None
            examples.append(Example(ids_a + ids_b, labels_a + labels_b, [len(ids_a), len(ids_b)], flag))
    return examples, stats


# ---------------------------------------------------------------- one dataset, rows to examples


def dataset_examples(
    name: str, settings: EncodeSettings, tokenizer, *, read: Reader, stats: DataStats
) -> Iterator[Example]:
    """The examples of one dataset, in row order, encoded ENCODE_BATCH rows at a time; counts go into `stats`."""
    on_bad_row = functools.partial(_count_skipped, stats) if settings.skip_bad_rows else None
    rows = read(name, dataset_dir=Path(settings.dataset_dir), max_samples=settings.max_samples,
                on_bad_row=on_bad_row, task=TASK_OF_ROWS[settings.rows])
    if settings.rows == "lm":
        encode_rows, items = _encode_lm_rows, rows
    else:
        encode_rows, items = _encode_pair_rows, rows_with_replies(rows)

    def encode(batch: list) -> list[Example]:
        results = encode_rows(batch, settings=settings, tokenizer=tokenizer, on_bad_row=on_bad_row)
        _count_rows(stats, results)  # the whole batch, before any of its examples is handed on
        return [example for examples, _ in results for example in examples]

    yield from encode_in_batches(items, encode)


def encode_in_batches(items: Iterable, encode: Callable[[list], list[T]]) -> Iterator[T]:
    """`encode` over ENCODE_BATCH rows at a time (one fast-tokenizer call each), the results in row order.
    Works on a list or a stream: a batch's rows are let go before its results are handed on, and each result is
    popped from the batch's list, so nothing is held past the consumer's use of it."""
    source = iter(items)
    while batch := list(itertools.islice(source, ENCODE_BATCH)):
        encoded = encode(batch)
        del batch
        encoded.reverse()
        while encoded:
            yield encoded.pop()


def _count_skipped(stats: DataStats, error: DataError) -> None:
    """Record a malformed row left out under skip_bad_rows."""
    stats.rows += 1
    stats.skipped += 1
    if len(stats.skipped_examples) < MAX_SKIPPED_EXAMPLES:
        stats.skipped_examples.append(str(error))


def _count_rows(stats: DataStats, results: list[tuple[list[Example], bool]]) -> None:
    """Record encoded rows: each gave examples (kept) or none (dropped), and was cut or not."""
    for examples, truncated in results:
        stats.rows += 1
        stats.truncated += truncated
        stats.dropped += not examples
        stats.kept += bool(examples)


def _reject(on_bad_row: OnBadRow, error: DataError) -> None:
    if on_bad_row is None:
        raise error
    on_bad_row(error)


def rows_with_replies(rows: Iterable[ParsedRow]) -> Iterator[tuple[ParsedRow, tuple[Turn, Turn]]]:
    """Each parsed row with the two replies to its prompt: chosen and rejected, or (KTO) its completion and the
    next row's, the last row taking the first row's (wrapping around).

    Works on a stream: KTO rows are read one ahead and only the first row's completion is remembered, so the
    last row comes out once the rows have run out.
    """
    first_completion: Turn | None = None
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


# ---------------------------------------------------------------- lm rows (sft, pt)


def _encode_lm_rows(
    rows: list[ParsedRow], *, settings: EncodeSettings, tokenizer, on_bad_row: OnBadRow
) -> list[tuple[list[Example], bool]]:
    """(examples, truncated) of each rendered row, in order: each row is rendered alone (a bad row fails alone,
    naming its file and row), then all are tokenized in one call per kind."""
    named = _NamedEncoder.of(settings, tokenizer)
    if named is not None:
        named.prefetch([row.item for row in rows if isinstance(row.item, Conversation)], settings)
    rendered: list[_RenderedRow | EncodedConversation] = []
    for row in rows:
        try:
            if named is not None and isinstance(row.item, Conversation):
                rendered.append(named.lm_row(row, settings))
            else:
                rendered.append(_render_lm_row(row, tokenizer, settings))
        except DataError as error:
            _reject(on_bad_row, error)
    texts = [item for item in rendered if isinstance(item, _RenderedRow)]
    tokenized = iter(_tokenize_rendered(texts, tokenizer))
    results = []
    for item in rendered:
        if isinstance(item, EncodedConversation):
            results.append(_finish_encoded_lm_row(item, settings))
        else:
            ids, offsets = next(tokenized)
            results.append(_finish_lm_row(item, ids, offsets, tokenizer, settings))
    return results


class _NamedEncoder:
    """Encodes rows with a named template (LLaMA-Factory's slot-by-slot tokenization, templates.py)."""

    def __init__(self, template: ChatTemplate, tokenizer):
        self.template = template
        self.pieces = PieceTokenizer(tokenizer, template)

    @classmethod
    def of(cls, settings: EncodeSettings, tokenizer) -> _NamedEncoder | None:
        if settings.template == "auto":
            return None
        return cls(named_template(settings.template, settings.template_options), tokenizer)

    def prefetch(self, conversations: list[Conversation], settings: EncodeSettings, *, one_turn: bool = False) -> None:
        """Tokenize the text pieces of all these conversations in one call of the fast tokenizer (the per-row
        encoding then finds them); a row that cannot be rendered is skipped here and fails alone later."""
        options = settings.template_options
        turns = []
        for conversation in conversations:
            messages = thinking_messages(self.template, _named_messages_of(conversation.turns), one_turn=one_turn,
                                         mask_history=options.mask_history and not one_turn)
            try:
                turns += turn_pieces(self.template, messages, conversation.system, conversation.tool_list(),
                                     options.today)
            except (DataError, ValueError, KeyError, TypeError):
                continue
        self.pieces.prepare(turns)

    def lm_row(self, row: ParsedRow, settings: EncodeSettings) -> EncodedConversation:
        """ids and labels of a conversation, as LF's supervised processor makes them (pt: every token trained)."""
        where = f"{row.source} row {row.row_number}"
        conversation = row.item
        messages = _named_messages_of(conversation.turns)
        if messages[-1][0] not in ("assistant", "function"):
            raise DataError(f"{where}: a conversation must end with an assistant turn "
                            f"(its last turn is {conversation.turns[-1].role})")
        options = settings.template_options
        pairs = self._pairs(messages, conversation, where, options)
        if settings.pretraining:
            ids = [t for pair in pairs for t in pair.prompt + pair.reply]
            return EncodedConversation(ids, list(ids), 0)
        ids, labels, response_start = supervised_ids_and_labels(
            pairs, self.pieces.eos, efficient_eos=self.template.efficient_eos,
            train_on_prompt=settings.train_on_prompt, mask_history=options.mask_history, ignore_index=IGNORE_INDEX,
        )
        return EncodedConversation(ids, labels, response_start)

    def reply_documents(self, prompt: Conversation, replies: tuple[Turn, Turn], shared_prompt: bool,
                        today: str | None, where: str) -> list[EncodedConversation]:
        """prompt + each reply, as LF's encode_oneturn; pairs (dpo/rm) take the first one's prompt for both."""
        messages = _named_messages_of(prompt.turns)
        try:
            encoded = [encode_one_turn(self.template, self.pieces, messages + _named_messages_of([reply]), prompt.system,
                                       prompt.tool_list(), today=today) for reply in replies]
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where}: {self._tool_error(e)}") from None
        if shared_prompt:
            encoded = [TurnPair(encoded[0].prompt, pair.reply) for pair in encoded]
        return [EncodedConversation(p + r, [IGNORE_INDEX] * len(p) + r, len(p)) for p, r in encoded]

    def _pairs(self, messages: list[tuple[str, str]], conversation: Conversation, where: str,
               options: TemplateOptions) -> list[TurnPair]:
        try:
            return encode_turn_pairs(self.template, self.pieces, messages, conversation.system,
                                     conversation.tool_list(), mask_history=options.mask_history,
                                     today=options.today)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        except (ValueError, KeyError, TypeError) as e:  # tools or calls this tool format cannot write
            raise DataError(f"{where}: {self._tool_error(e)}") from None

    def _tool_error(self, error: Exception) -> str:
        return (f"the tools or function calls do not fit tool format '{self.template.tool_format}' "
                f"({type(error).__name__}: {error})")


# Turn roles as a named template calls them (LF's Role: a tool's answer is an observation)
_NAMED_ROLES = {"user": "user", "assistant": "assistant", "function": "function", "tool": "observation"}


def _named_messages_of(turns: Iterable[Turn]) -> list[tuple[str, str]]:
    return [(_NAMED_ROLES[turn.role], turn.content) for turn in turns]


def _finish_encoded_lm_row(row: EncodedConversation, settings: EncodeSettings) -> tuple[list[Example], bool]:
    """The examples of a row a named template encoded: pt pieces, or the sft row cut as `auto` rows are."""
    if settings.pretraining:
        pieces = split_into_pieces(row.input_ids, settings.cutoff_len)
        return [Example(piece, list(piece)) for piece in pieces], len(pieces) > 1
    ids, labels = truncate_conversation(row.input_ids, row.labels, row.response_start, settings.cutoff_len)
    truncated = len(ids) < len(row.input_ids)
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return [], truncated
    return [Example(ids, labels)], truncated


@dataclass(frozen=True)
class _RenderedRow:
    text: str
    spans: list[tuple[int, int]] | None  # assistant character spans (sft); None: every token trained (pt)
    plain_text: bool  # a pretraining text: the tokenizer's own special tokens, then eos


def _render_lm_row(row: ParsedRow, tokenizer, settings: EncodeSettings) -> _RenderedRow:
    """The text a row trains on; DataError (naming file and row) when the row cannot be rendered as asked."""
    where = f"{row.source} row {row.row_number}"
    if isinstance(row.item, TextDocument):
        if not settings.pretraining:
            raise DataError(
                f"{where}: plain-text rows are for pretraining; set stage: pt, or use alpaca/sharegpt/"
                f"messages rows for sft"
            )
        return _RenderedRow(row.item.text, None, plain_text=True)
    # a conversation needs a template: raises the ConfigError here when the tokenizer has none
    chat_template = settings.chat_template or resolve_chat_template(settings.template, tokenizer)
    conversation = _with_default_system(row.item, settings)
    if settings.pretraining:
        text = render_messages(tokenizer, chat_template, conversation.messages(), False, where,
                               conversation.tool_list())
        return _RenderedRow(text, None, plain_text=False)
    text, spans = assistant_char_spans(conversation, tokenizer, chat_template, where)
    if settings.template_options.mask_history:
        spans = spans[-1:]
    return _RenderedRow(text, spans, plain_text=False)


def _with_default_system(conversation: Conversation, settings: EncodeSettings) -> Conversation:
    """`auto` rows without a system prompt take `default_system` (a named template applies it itself)."""
    default = settings.template_options.default_system
    return conversation if conversation.system is not None or not default else replace(conversation, system=default)


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


def _finish_lm_row(
    row: _RenderedRow, ids: list[int], offsets: list[tuple[int, int]] | None, tokenizer, settings: EncodeSettings
) -> tuple[list[Example], bool]:
    """The examples of one row (none when it is dropped) and whether it was truncated (or split, for pt)."""
    if row.spans is None:
        eos = text_eos_id(settings.template, tokenizer)
        pieces = split_into_pieces(with_eos(ids, eos) if row.plain_text else ids, settings.cutoff_len)
        return [Example(piece, list(piece)) for piece in pieces], len(pieces) > 1
    assert offsets is not None
    encoded = conversation_labels(ids, offsets, row.spans, train_on_prompt=settings.train_on_prompt)
    ids, labels = truncate_conversation(encoded.input_ids, encoded.labels, encoded.response_start,
                                        settings.cutoff_len)
    truncated = len(ids) < len(encoded.input_ids)
    # position 0 is never a target after the shift: a row must train a later token
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return [], truncated
    return [Example(ids, labels)], truncated


# ---------------------------------------------------------------- two-document rows (pairs, kto)


def _encode_pair_rows(
    rows: list[tuple[ParsedRow, tuple[Turn, Turn]]], *, settings: EncodeSettings, tokenizer, on_bad_row: OnBadRow
) -> list[tuple[list[Example], bool]]:
    """(examples, truncated) of rows with their two replies, in order: prompt + first reply, then prompt + second,
    in one Example; each row is rendered alone, then all are tokenized in one call."""
    named = _NamedEncoder.of(settings, tokenizer)
    if named is not None:
        return _encode_named_pair_rows(rows, named, settings, on_bad_row)
    chat_template = settings.chat_template
    assert chat_template is not None  # resolved before any row is read
    rendered: list[tuple[ParsedRow, list[tuple[str, tuple[int, int]]]]] = []
    for row, replies in rows:
        where = f"{row.source} row {row.row_number}"
        try:
            rendered.append(
                (row, [_render_reply(_with_default_system(row.item.prompt, settings), reply, tokenizer, chat_template,
                                     where) for reply in replies])
            )
        except DataError as error:
            _reject(on_bad_row, error)
    texts = [text for _, documents in rendered for text, _ in documents]
    encoded = iter(tokenize_batch(tokenizer, texts, add_special_tokens=False, with_offsets=True))
    results: list[tuple[list[Example], bool]] = []
    for row, documents in rendered:
        labelled = []
        for _, span in documents:
            ids, offsets = next(encoded)
            assert offsets is not None
            labelled.append(conversation_labels(ids, offsets, [span], train_on_prompt=False))
        results.append(_two_document_example(row, labelled, settings))
    return results


def _two_document_example(
    row: ParsedRow, labelled: list[EncodedConversation], settings: EncodeSettings
) -> tuple[list[Example], bool]:
    kept, truncated = truncate_documents(labelled, settings.cutoff_len)
    # position 0 of a document is never a target after the shift: a reply must train a later token
    if any(all(label == IGNORE_INDEX for label in labels[1:]) for _, labels in kept):
        return [], truncated
    (a, a_labels), (b, b_labels) = kept
    desirable = row.item.desirable if settings.rows == "kto" else None
    return [Example(a + b, a_labels + b_labels, [len(a), len(b)], desirable)], truncated


def _encode_named_pair_rows(
    rows: list[tuple[ParsedRow, tuple[Turn, Turn]]], named: _NamedEncoder, settings: EncodeSettings,
    on_bad_row: OnBadRow,
) -> list[tuple[list[Example], bool]]:
    named.prefetch([replace(row.item.prompt, turns=row.item.prompt.turns + (reply,))
                    for row, replies in rows for reply in replies], settings, one_turn=True)
    results: list[tuple[list[Example], bool]] = []
    for row, replies in rows:
        where = f"{row.source} row {row.row_number}"
        try:
            documents = named.reply_documents(row.item.prompt, replies, settings.rows == "pairs",
                                              settings.template_options.today, where)
        except DataError as error:
            _reject(on_bad_row, error)
            continue
        results.append(_two_document_example(row, documents, settings))
    named.pieces.clear()
    return results


def _render_reply(
    prompt: Conversation, reply: Turn, tokenizer, chat_template: str, where: str
) -> tuple[str, tuple[int, int]]:
    """The rendered prompt + reply and the character span of the reply's assistant turn (as SFT locates it)."""
    conversation = replace(prompt, turns=prompt.turns + (reply,))
    text, spans = assistant_char_spans(conversation, tokenizer, chat_template, where)
    return text, spans[-1]
