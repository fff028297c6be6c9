"""Resolve dataset names (builtin:NAME, a .json/.jsonl path, or a dataset_info.json entry) and read their rows.

Files are read with the stdlib json module so that every error can name the file and the line or row at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longtune.data.conversation import Conversation, TextDocument
from longtune.data.formats import KTOSample, PreferencePair, detect_format, detect_task, make_row_format, parse_row
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
_SUFFIXES = (".json", ".jsonl")
_INFO_KEYS = {
    "file_name", "formatting", "columns", "tags", "num_samples", "ranking", "split", "load_from", "subset", "folder"
}
_TASK_STAGES = {"plain": "sft or pt", "preference": "dpo or rm", "kto": "kto"}
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
    """Find the files of `name`: `builtin:NAME`, a .json/.jsonl path (absolute or under dataset_dir), or an entry."""
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
            f"dataset: '{name}' is not builtin:NAME, not a .json/.jsonl file, and {info_path} does not exist; "
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
    path = dataset_dir / entry["file_name"]
    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.suffix.lower() in _SUFFIXES))
        if not files:
            raise DataError(f"{where}: folder {path} holds no .json/.jsonl files")
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


def read_rows(path: Path, on_bad_row: Callable[[DataError], None] | None = None) -> list[Any]:
    """Rows of a .json file (a list) or a .jsonl file (one object per non-blank line).

    A .jsonl line that is not valid JSON raises, or with `on_bad_row` is reported to it and left out.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        error = DataError(f"{path} line {line_number}: invalid JSON ({e.msg})")
                        if on_bad_row is None:
                            raise error from None
                        on_bad_row(error)
        return rows
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got a {type(data).__name__}")
    return data


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None


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
    spec = resolve_dataset(name, dataset_dir)
    if spec.ranking and task != "preference":
        raise DataError(
            f"{Path(dataset_dir) / DATASET_INFO} entry '{name}': ranking (preference) datasets need stage dpo or rm, "
            f"not {_TASK_STAGES[task]}"
        )
    located: list[tuple[Path, int, Any]] = []
    for path in spec.files:
        located += [(path, i, row) for i, row in enumerate(read_rows(path, on_bad_row), start=1)]
    if not located:
        raise DataError(f"dataset '{name}': no rows in {', '.join(str(p) for p in spec.files)}")
    if spec.num_samples is not None:
        located = [located[i % len(located)] for i in range(spec.num_samples)]
    if max_samples is not None:
        located = located[:max_samples]
    kind = spec.formatting or _detect_dataset_format(located, skipping=on_bad_row is not None)
    if task == "plain":
        # Training sft on pairs or KTO samples would fail row by row, or worse train on undesirable replies.
        found = detect_task(located[0][2], spec.columns)
        if found != "plain":
            path, number, _ = located[0]
            raise DataError(
                f"{path} row {number}: the rows hold {found} data (their keys include the "
                f"{'chosen/rejected' if found == 'preference' else 'kto_tag'} columns); use stage "
                f"{_TASK_STAGES[found]}"
            )
    fmt = make_row_format(kind, spec.columns, spec.tags, task=task, where=f"dataset '{name}'")
    if on_bad_row is None:
        return [
            ParsedRow(str(path), number, parse_row(row, fmt, source=str(path), row_number=number))
            for path, number, row in located
        ]
    parsed = []
    for path, number, row in located:
        try:
            parsed.append(ParsedRow(str(path), number, parse_row(row, fmt, source=str(path), row_number=number)))
        except DataError as error:
            on_bad_row(error)
    return parsed


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
