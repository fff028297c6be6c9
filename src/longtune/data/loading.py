"""Resolve dataset names (builtin:NAME, a data file path, or a dataset_info.json entry) and read their rows.

Rows come from .jsonl (line by line), .csv (row by row), .txt (line by line), .parquet (record batch by batch) or .json (a list, read
whole) files, so every error can name the file and the line or row at fault. `load_dataset` returns a dataset's
parsed rows as a list; `iter_dataset` yields the same rows one at a time (streaming: files are never read whole,
except .json lists).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longtune.data.conversation import Conversation, TextDocument
from longtune.data.example import stages_of_task
from longtune.data.formats import (
    KTOSample,
    PreferencePair,
    RowFormat,
    detect_format,
    detect_task,
    make_row_format,
    parse_row,
)
from longtune.errors import ConfigError, DataError

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_DATASETS = {
    "sft_demo": "sft_demo.json",
    "sharegpt_demo": "sharegpt_demo.json",
    "pt_demo": "pt_demo.jsonl",
    "kv_retrieval": "kv_retrieval.jsonl",
    "dpo_demo": "dpo_demo.json",
    "kto_demo": "kto_demo.json",
}
DATASET_INFO = "dataset_info.json"
_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
_SUFFIX_NAMES = "/".join(_SUFFIXES)
PARQUET_BATCH_ROWS = 1024  # rows decoded per parquet record batch: the most a parquet reader holds at once
_INFO_KEYS = {
    "file_name", "formatting", "columns", "tags", "num_samples", "ranking", "split", "load_from", "subset", "folder"
}
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass(frozen=True)
class DatasetSpec:
    """Where one named dataset lives and how its rows are laid out."""

    name: str
    files: tuple[Path, ...]
    formatting: str | None = None  # None: detect from the first row's keys
    columns: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    num_samples: int | None = None
    ranking: bool = False  # dataset_info.json says its rows are preference pairs


@dataclass(frozen=True)
class ParsedRow:
    source: str  # the file, for messages
    row_number: int  # 1-based within that file
    item: Conversation | TextDocument | PreferencePair | KTOSample


def resolve_dataset(name: str, dataset_dir: str | Path) -> DatasetSpec:
    """Find the files of `name`: `builtin:NAME`, a data file path (absolute or under dataset_dir), or an entry."""
    dataset_dir = Path(dataset_dir)
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX) :]
        if key not in BUILTIN_DATASETS:
            known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_DATASETS)
            raise ConfigError(f"dataset: unknown builtin dataset '{name}'; known: {known}")
        return DatasetSpec(name, (BUILTIN_DIR / BUILTIN_DATASETS[key],))
    if name.lower().endswith(_SUFFIXES):
        path = Path(name)
        candidates = [path] if path.is_absolute() else [dataset_dir / path, path]
        for candidate in candidates:
            if candidate.is_file():
                return DatasetSpec(name, (candidate,))
        tried = " or ".join(str(c) for c in candidates)
        raise DataError(f"dataset '{name}': file not found (looked for {tried})")
    return _resolve_registered(name, dataset_dir)


def _resolve_registered(name: str, dataset_dir: Path) -> DatasetSpec:
    info_path = dataset_dir / DATASET_INFO
    if not info_path.is_file():
        raise ConfigError(
            f"dataset: '{name}' is not builtin:NAME, not a {_SUFFIX_NAMES} file, and {info_path} does not exist; "
            f"builtin datasets: {', '.join(BUILTIN_PREFIX + k for k in BUILTIN_DATASETS)}"
        )
    info = _read_json(info_path)
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: expected a JSON object mapping dataset names to entries")
    if name not in info:
        known = ", ".join(sorted(info)) or "none"
        raise ConfigError(f"dataset: '{name}' is not in {info_path}; known: {known}")
    entry = info[name]
    where = f"{info_path} entry '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with 'file_name'")
    for key in _HUB_KEYS:
        if key in entry:
            raise DataError(f"{where}: '{key}' is not supported (longtune reads local files only); set 'file_name'")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: 'ranking' must be true or false, got {ranking!r}")
    unknown = sorted(set(entry) - _INFO_KEYS)
    if unknown:
        raise DataError(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(_INFO_KEYS))}"
        )
    if "file_name" not in entry:
        raise DataError(f"{where}: missing field 'file_name'")
    if not isinstance(entry["file_name"], str) or not entry["file_name"]:
        raise DataError(f"{where}: 'file_name' must be a file or folder name (a string), got {entry['file_name']!r}")
    path = dataset_dir / entry["file_name"]
    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in _SUFFIXES))
        if not files:
            raise DataError(f"{where}: folder {path} holds no {_SUFFIX_NAMES} files")
    elif path.is_file():
        files = (path,)
    else:
        raise DataError(f"{where}: file not found: {path}")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    for key, value in (("columns", columns), ("tags", tags)):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise DataError(f"{where}: '{key}' must be an object mapping names to strings")
    formatting = entry.get("formatting", "alpaca")
    # LLaMA-Factory registers pretraining corpora as alpaca with only a prompt column: {"prompt": "text"}.
    if formatting == "alpaca" and set(columns) == {"prompt"}:
        formatting = "text"
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise DataError(f"{where}: 'num_samples' must be a positive integer, got {num_samples!r}")
    return DatasetSpec(name, files, formatting, columns, tags, num_samples, ranking)


def iter_file_rows(path: Path, on_bad_row: Callable[[DataError], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a .jsonl (one object per non-blank line, numbered by its line, so an error names
    the line an editor shows), .csv (header + rows, values as strings), .txt (a `text` row per non-blank line),
    .parquet or .json (a list) file, in file
    order. Only a .json list is read whole: JSON has no row boundaries to stop at.

    A .jsonl line that is not valid JSON raises, or with `on_bad_row` is reported to it and left out.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _jsonl_rows(path, on_bad_row)
        elif suffix == ".csv":
            yield from enumerate(_csv_rows(path), start=1)
        elif suffix == ".parquet":
            yield from enumerate(_parquet_rows(path), start=1)
        elif suffix == ".txt":
            yield from _text_rows(path)
        else:
            data = _read_json(path)
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of rows, got a {type(data).__name__}")
            yield from enumerate(data, start=1)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _not_utf8(path: Path, error: UnicodeDecodeError) -> DataError:
    """Where the first non-UTF-8 byte is: text decoders only know the offset within their current chunk."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        offset = error.start
    except UnicodeDecodeError as whole:
        offset = whole.start
    line = data[:offset].count(b"\n") + 1
    return DataError(f"{path} line {line}: not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}); save the "
                     "file as UTF-8")


def _jsonl_rows(path: Path, on_bad_row: Callable[[DataError], None] | None) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                error = DataError(f"{path} line {line_number}: invalid JSON ({e.msg})")
                if on_bad_row is None:
                    raise error from None
                on_bad_row(error)
                continue
            yield line_number, row


def _text_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """A .txt file as LLaMA-Factory reads it (the `text` loader): one `{"text": line}` row per line, numbered by
    its line; blank lines hold no document and are left out."""
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield line_number, {"text": line.rstrip("\r\n")}


def _csv_rows(path: Path) -> Iterator[Any]:
    # Long-context rows outgrow the csv module's default field limit (128 KiB); the limit is process-wide.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            yield from reader
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: invalid CSV ({e})") from None


def _parquet_rows(path: Path) -> Iterator[Any]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()
    except (OSError, pyarrow.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def load_dataset(
    name: str,
    *,
    dataset_dir: str | Path,
    max_samples: int | None = None,
    on_bad_row: Callable[[DataError], None] | None = None,
    task: str = "plain",
) -> list[ParsedRow]:
    """Resolve, read and parse one dataset, in file order; `num_samples` then `max_samples` cap the rows.

    `task` (formats.TASKS) says what every row must be: "plain" (sft, pt) rows, "preference" pairs (dpo, rm) or
    "kto" samples. `num_samples` larger than the dataset repeats it cyclically (LLaMA-Factory samples at random;
    we stay deterministic and order-preserving). A malformed row raises its DataError, or with `on_bad_row` is
    reported to it and left out (the format is then told from the first row that shows one).
    """
    spec = _checked_spec(name, dataset_dir, task)
    located = list(_located_rows(spec.files, on_bad_row))
    if not located:
        raise _no_rows(spec)
    if spec.num_samples is not None:
        located = [located[i % len(located)] for i in range(spec.num_samples)]
    if max_samples is not None:
        located = located[:max_samples]
    kind = spec.formatting or _detect_dataset_format(located, skipping=on_bad_row is not None)
    fmt = _row_format(spec, located[0], kind, task)
    return list(_parse_located(located, fmt, on_bad_row))


def iter_dataset(
    name: str,
    *,
    dataset_dir: str | Path,
    max_samples: int | None = None,
    on_bad_row: Callable[[DataError], None] | None = None,
    task: str = "plain",
) -> Iterator[ParsedRow]:
    """The rows `load_dataset` returns, in the same order, read and parsed one at a time (streaming).

    `num_samples` above the dataset's size reads its files again from the start. Differences that come from not
    reading ahead: rows past the caps are never read (a bad line there goes unnoticed), and a malformed row is
    reported when its turn comes rather than before any row is rendered. The name is resolved now; files are
    opened on the first `next`.
    """
    spec = _checked_spec(name, dataset_dir, task)
    caps = [n for n in (spec.num_samples, max_samples) if n is not None]
    return _stream_parsed(spec, min(caps) if caps else None, on_bad_row, task)


def _stream_parsed(
    spec: DatasetSpec, limit: int | None, on_bad_row: Callable[[DataError], None] | None, task: str
) -> Iterator[ParsedRow]:
    located = _capped_rows(spec, limit, on_bad_row)
    # The format is told by the first row, or when skipping by the first row that tells one: earlier rows wait.
    pending: list[tuple[Path, int, Any]] = []
    kind = spec.formatting
    first_error: DataError | None = None
    for item in located:
        pending.append(item)
        if kind is not None:
            break
        try:
            kind = detect_format(item[2], source=str(item[0]))
            break
        except DataError as error:
            if on_bad_row is None:
                raise
            first_error = first_error or error
    if not pending:
        raise _no_rows(spec)
    if kind is None:
        assert first_error is not None
        raise first_error
    fmt = _row_format(spec, pending[0], kind, task)
    yield from _parse_located(pending, fmt, on_bad_row)
    pending.clear()
    yield from _parse_located(located, fmt, on_bad_row)


def _capped_rows(
    spec: DatasetSpec, limit: int | None, on_bad_row: Callable[[DataError], None] | None
) -> Iterator[tuple[Path, int, Any]]:
    """At most `limit` located rows; with num_samples the files are read again until it is reached."""
    count = 0
    report = on_bad_row
    while True:
        fresh = 0
        rows = _located_rows(spec.files, report)
        while limit is None or count < limit:  # never read a row past the cap
            item = next(rows, None)
            if item is None:
                break
            yield item
            count += 1
            fresh += 1
        rows.close()
        if spec.num_samples is None or fresh == 0 or (limit is not None and count >= limit):
            return
        # load_dataset reads each file once, so it reports a bad line once: so does a second pass
        report = _ignore_bad_row


def _ignore_bad_row(error: DataError) -> None:
    pass


def _checked_spec(name: str, dataset_dir: str | Path, task: str) -> DatasetSpec:
    spec = resolve_dataset(name, dataset_dir)
    if spec.ranking and task != "preference":
        raise DataError(
            f"{Path(dataset_dir) / DATASET_INFO} entry '{name}': ranking (preference) datasets need stage "
            f"{stages_of_task('preference')}, not {stages_of_task(task)}"
        )
    return spec


def _no_rows(spec: DatasetSpec) -> DataError:
    return DataError(f"dataset '{spec.name}': no rows in {', '.join(str(p) for p in spec.files)}")


def _located_rows(
    files: tuple[Path, ...], on_bad_row: Callable[[DataError], None] | None
) -> Iterator[tuple[Path, int, Any]]:
    """(file, 1-based row number, raw row) over all files in order; jsonl rows are numbered by their line."""
    for path in files:
        for number, row in iter_file_rows(path, on_bad_row):
            yield path, number, row


def _row_format(spec: DatasetSpec, first: tuple[Path, int, Any], kind: str, task: str) -> RowFormat:
    """How to parse the dataset's rows; a plain-task dataset whose first row holds pair/KTO columns is refused."""
    if task == "plain":
        # Training sft on pairs or KTO samples would fail row by row, or worse train on undesirable replies.
        found = detect_task(first[2], spec.columns)
        if found != "plain":
            path, number, _ = first
            raise DataError(
                f"{path} row {number}: the rows hold {found} data (their keys include the "
                f"{'chosen/rejected' if found == 'preference' else 'kto_tag'} columns); use stage "
                f"{stages_of_task(found)}"
            )
    return make_row_format(kind, spec.columns, spec.tags, task=task, where=f"dataset '{spec.name}'")


def _parse_located(
    located: Iterable[tuple[Path, int, Any]], fmt: RowFormat, on_bad_row: Callable[[DataError], None] | None
) -> Iterator[ParsedRow]:
    for path, number, row in located:
        try:
            item = parse_row(row, fmt, source=str(path), row_number=number)
        except DataError as error:
            if on_bad_row is None:
                raise
            on_bad_row(error)
            continue
        yield ParsedRow(str(path), number, item)


def _detect_dataset_format(located: list[tuple[Path, int, Any]], *, skipping: bool) -> str:
    """The format told by the first row, or when bad rows are skipped by the first row that tells one."""
    first_error: DataError | None = None
    for path, _, row in located if skipping else located[:1]:
        try:
            return detect_format(row, source=str(path))
        except DataError as error:
            first_error = first_error or error
    assert first_error is not None
    raise first_error
