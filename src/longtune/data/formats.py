"""Parse one dataset row (alpaca, sharegpt, OpenAI messages or plain text) into a Conversation or TextDocument.

Column and tag names follow LLaMA-Factory's dataset_info.json, so its registered datasets parse unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from longtune.data.conversation import Conversation, TextDocument, Turn
from longtune.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "text")

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "history": "history",
        "system": "system",
    },
    "sharegpt": {"messages": "conversations", "system": "system"},
    "messages": {"messages": "messages", "system": "system"},
    "text": {"prompt": "text"},
}

DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "sharegpt": {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "observation_tag": "observation",
        "function_tag": "function_call",
        "system_tag": "system",
    },
    "messages": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "function_tag": "function_call",
        "system_tag": "system",
    },
}

# Which Turn role each tag maps to; a function call is something the assistant says, an observation is a tool's.
_TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "assistant",
    "system_tag": "system",
}


@dataclass(frozen=True)
class RowFormat:
    """How to read rows of one dataset: the format and its (LLaMA-Factory) column and tag names."""

    kind: str
    columns: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


def make_row_format(
    kind: str, columns: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None, *, where: str
) -> RowFormat:
    """Merge user column/tag overrides onto the defaults of `kind`; unknown names are errors naming `where`."""
    if kind not in FORMATS:
        raise DataError(f"{where}: unknown formatting '{kind}'; expected one of {', '.join(FORMATS)}")
    merged_columns = dict(DEFAULT_COLUMNS[kind])
    for key, value in (columns or {}).items():
        if key not in merged_columns:
            raise DataError(
                f"{where}: column '{key}' is not supported for {kind} rows; "
                f"expected one of {', '.join(DEFAULT_COLUMNS[kind])}"
            )
        merged_columns[key] = value
    merged_tags = dict(DEFAULT_TAGS.get(kind, {}))
    for key, value in (tags or {}).items():
        if key not in merged_tags:
            known = ", ".join(merged_tags) or "none"
            raise DataError(f"{where}: tag '{key}' is not supported for {kind} rows; expected one of {known}")
        merged_tags[key] = value
    return RowFormat(kind, merged_columns, merged_tags)


def detect_format(row: Any, *, source: str) -> str:
    """The format of a dataset, told from the keys of its first row."""
    if isinstance(row, Mapping):
        if "conversations" in row:
            return "sharegpt"
        if "messages" in row:
            return "messages"
        if "instruction" in row:
            return "alpaca"
        if "text" in row:
            return "text"
        keys = ", ".join(repr(k) for k in row) or "none"
    else:
        keys = f"a {type(row).__name__}, not an object"
    raise DataError(
        f"{source} row 1: cannot tell the format from its keys ({keys}); expected 'instruction'+'output' (alpaca), "
        f"'conversations' (sharegpt), 'messages' (OpenAI) or 'text' (pretraining)"
    )


def parse_row(row: Any, fmt: RowFormat, *, source: str, row_number: int) -> Conversation | TextDocument:
    """Parse one row; `source` (the file) and the 1-based `row_number` go into every error message."""
    where = f"{source} row {row_number}"
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt.kind == "alpaca":
        return _parse_alpaca(row, fmt.columns, where)
    if fmt.kind == "text":
        return TextDocument(_required_str(row, fmt.columns["prompt"], where, "text rows need it"))
    return _parse_chat(row, fmt, where)


def _required_str(row: Mapping, key: str, where: str, need: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}' ({need})")
    return _as_str(row[key], where, key)


def _optional_str(row: Mapping, key: str, where: str) -> str | None:
    value = row.get(key)
    return None if value is None else _as_str(value, where, key)


def _as_str(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _parse_alpaca(row: Mapping, columns: Mapping[str, str], where: str) -> Conversation:
    need = f"alpaca rows need '{columns['prompt']}' and '{columns['response']}'"
    instruction = _required_str(row, columns["prompt"], where, need)
    response = _required_str(row, columns["response"], where, need)
    query = _optional_str(row, columns["query"], where)
    prompt = f"{instruction}\n{query}" if query else instruction
    turns: list[Turn] = []
    history = row.get(columns["history"])
    if history is not None:
        name = columns["history"]
        if not isinstance(history, list):
            raise DataError(f"{where}: field '{name}' must be a list of [query, response] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise DataError(f"{where}: field '{name}'[{i}] must be a [query, response] pair")
            turns.append(Turn("user", _as_str(pair[0], where, f"{name}[{i}][0]")))
            turns.append(Turn("assistant", _as_str(pair[1], where, f"{name}[{i}][1]")))
    turns += [Turn("user", prompt), Turn("assistant", response)]
    system = _optional_str(row, columns["system"], where)
    return Conversation(tuple(turns), system or None)


def _parse_chat(row: Mapping, fmt: RowFormat, where: str) -> Conversation:
    key = fmt.columns["messages"]
    messages = row.get(key)
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else f"a {type(messages).__name__}" if messages else "empty"
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages, got {got}")
    role_tag, content_tag = fmt.tags["role_tag"], fmt.tags["content_tag"]
    roles = {fmt.tags[tag]: role for tag, role in _TAG_ROLES.items()}
    system = _optional_str(row, fmt.columns["system"], where) or None
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        name = f"{key}[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: {name} must be an object with '{role_tag}' and '{content_tag}'")
        for tag in (role_tag, content_tag):
            if tag not in message:
                raise DataError(f"{where}: {name} is missing field '{tag}'")
        if message[role_tag] not in roles:
            raise DataError(f"{where}: {name}.{role_tag} is {message[role_tag]!r}; expected one of {', '.join(roles)}")
        role = roles[message[role_tag]]
        content = _as_str(message[content_tag], where, f"{name}.{content_tag}")
        if role == "system":
            if i != 0:
                raise DataError(f"{where}: {name} is a system message; only the first message may be one")
            system = content
        else:
            turns.append(Turn(role, content))
    return Conversation(tuple(turns), system)
