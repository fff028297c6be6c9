"""Parse one dataset row (alpaca, sharegpt, OpenAI messages or plain text) into a Conversation or TextDocument,
or, for the preference and KTO stages, into a PreferencePair or a KTOSample.

Column and tag names follow LLaMA-Factory's dataset_info.json, so its registered datasets parse unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from longtune.data.conversation import Conversation, TextDocument, Turn
from longtune.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "text")
# What a row is read as: a conversation or text (sft, pt), a prompt with chosen and rejected responses (dpo, rm),
# or a prompt with one completion tagged desirable or not (kto).
TASKS = ("plain", "preference", "kto")

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "history": "history",
        "system": "system",
        "tools": "tools",
    },
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "messages": {"messages": "messages", "system": "system", "tools": "tools"},
    "text": {"prompt": "text"},
}

# Columns only the preference and KTO stages read (LLaMA-Factory names); not accepted for sft/pt datasets.
TASK_COLUMNS: dict[str, dict[str, str]] = {
    "plain": {},
    "preference": {"chosen": "chosen", "rejected": "rejected"},
    "kto": {"kto_tag": "kto_tag"},
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

# Which Turn role each tag maps to; a function call is the assistant's turn, an observation is a tool's.
_TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function",
    "system_tag": "system",
}


@dataclass(frozen=True)
class RowFormat:
    """How to read rows of one dataset: the format and its (LLaMA-Factory) column and tag names."""

    kind: str
    columns: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    task: str = "plain"  # one of TASKS


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (ending with a user or tool turn) and two candidate replies to it, the chosen one preferred."""

    prompt: Conversation
    chosen: Turn  # an assistant reply, or a function call (role "function")
    rejected: Turn


@dataclass(frozen=True)
class KTOSample:
    """A prompt (ending with a user or tool turn), one reply to it, and whether that reply is desirable."""

    prompt: Conversation
    completion: Turn  # an assistant reply, or a function call (role "function")
    desirable: bool


def make_row_format(
    kind: str,
    columns: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    task: str = "plain",
    where: str,
) -> RowFormat:
    """Merge user column/tag overrides onto the defaults of `kind`; unknown names are errors naming `where`."""
    if kind not in FORMATS:
        raise DataError(f"{where}: unknown formatting '{kind}'; expected one of {', '.join(FORMATS)}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if kind == "text" and task != "plain":
        raise DataError(f"{where}: plain-text rows have no responses to compare; {task} data needs alpaca, "
                        f"sharegpt or messages rows")
    merged_columns = dict(DEFAULT_COLUMNS[kind]) | TASK_COLUMNS[task]
    for key, value in (columns or {}).items():
        if key not in merged_columns:
            other_tasks = [t for t in TASKS if key in TASK_COLUMNS[t]]
            hint = f" (it is read by {other_tasks[0]} stages only)" if other_tasks and kind != "text" else ""
            raise DataError(
                f"{where}: column '{key}' is not supported for {kind} rows{hint}; "
                f"expected one of {', '.join(merged_columns)}"
            )
        merged_columns[key] = value
    merged_tags = dict(DEFAULT_TAGS.get(kind, {}))
    for key, value in (tags or {}).items():
        if key not in merged_tags:
            known = ", ".join(merged_tags) or "none"
            raise DataError(f"{where}: tag '{key}' is not supported for {kind} rows; expected one of {known}")
        merged_tags[key] = value
    return RowFormat(kind, merged_columns, merged_tags, task)


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


def detect_task(row: Any, columns: Mapping[str, str] | None = None) -> str:
    """What a row holds, told from its keys: preference pairs, KTO samples, or plain rows (`columns` renames)."""
    names = TASK_COLUMNS["preference"] | TASK_COLUMNS["kto"] | dict(columns or {})
    if not isinstance(row, Mapping):
        return "plain"
    if names["chosen"] in row and names["rejected"] in row:
        return "preference"
    if names["kto_tag"] in row:
        return "kto"
    return "plain"


def parse_row(
    row: Any, fmt: RowFormat, *, source: str, row_number: int
) -> Conversation | TextDocument | PreferencePair | KTOSample:
    """Parse one row as `fmt.task` says; `source` (the file) and the 1-based `row_number` go into every error."""
    where = f"{source} row {row_number}"
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt.task == "preference":
        return _parse_preference(row, fmt, where)
    if fmt.task == "kto":
        return _parse_kto(row, fmt, where)
    if fmt.kind == "alpaca":
        return _parse_alpaca(row, fmt.columns, where)
    if fmt.kind == "text":
        return TextDocument(_required_str(row, fmt.columns["prompt"], where, "text rows need it"))
    return _parse_chat(row, fmt, where)


def _parse_preference(row: Mapping, fmt: RowFormat, where: str) -> PreferencePair:
    """LLaMA-Factory ranking rows: an alpaca prompt with `chosen`/`rejected` strings, or a conversation ending with
    a user turn with `chosen`/`rejected` assistant messages (a plain string is accepted as the content)."""
    if fmt.kind == "alpaca":
        prompt = _alpaca_prompt(row, fmt.columns, where)
    else:
        prompt = _chat_prompt(_parse_chat(row, fmt, where), fmt.columns["messages"], where)
    need = f"preference rows need '{fmt.columns['chosen']}' and '{fmt.columns['rejected']}'"
    chosen, rejected = (_response(row, fmt, fmt.columns[key], where, need) for key in ("chosen", "rejected"))
    return PreferencePair(prompt, chosen, rejected)


def _parse_kto(row: Mapping, fmt: RowFormat, where: str) -> KTOSample:
    """LLaMA-Factory KTO rows: an alpaca row or a conversation ending with the assistant's completion, and a
    boolean `kto_tag` (true: desirable)."""
    name = fmt.columns["kto_tag"]
    if name not in row:
        raise DataError(f"{where}: missing field '{name}' (KTO rows need a boolean tag: true = desirable)")
    tag = row[name]
    if not isinstance(tag, bool):
        raise DataError(f"{where}: field '{name}' must be true or false, got {tag!r}")
    if fmt.kind == "alpaca":
        conversation = _parse_alpaca(row, fmt.columns, where)
        prompt = replace(conversation, turns=conversation.turns[:-1])
        return KTOSample(prompt, conversation.turns[-1], tag)
    conversation = _parse_chat(row, fmt, where)
    if conversation.turns[-1].role not in ("assistant", "function"):
        raise DataError(
            f"{where}: a KTO conversation must end with the assistant's completion "
            f"(its last turn is {conversation.turns[-1].role})"
        )
    prompt = _chat_prompt(replace(conversation, turns=conversation.turns[:-1]), fmt.columns["messages"], where)
    return KTOSample(prompt, conversation.turns[-1], tag)


def _chat_prompt(prompt: Conversation, field_name: str, where: str) -> Conversation:
    """`prompt` when it ends with a turn the assistant answers next (user or tool), else a DataError."""
    last = prompt.turns[-1].role if prompt.turns else "none"
    if last not in ("user", "tool"):
        raise DataError(
            f"{where}: the prompt in '{field_name}' must end with a user (or tool) turn, its last turn is {last}"
        )
    return prompt


def _response(row: Mapping, fmt: RowFormat, key: str, where: str, need: str) -> Turn:
    """A reply: a string, or (sharegpt/messages) an assistant or function-call message object, alone or as a
    one-message list (TRL's conversational preference rows)."""
    if key not in row:
        raise DataError(f"{where}: missing field '{key}' ({need})")
    if row[key] is None:
        raise DataError(f"{where}: field '{key}' is null; expected a string or message ({need})")
    value = row[key]
    if isinstance(value, list) and len(value) == 1 and fmt.kind != "alpaca":
        value = value[0]
    if isinstance(value, str) or fmt.kind == "alpaca":
        return Turn("assistant", _as_str(value, where, key))
    role_tag, content_tag = fmt.tags["role_tag"], fmt.tags["content_tag"]
    if not isinstance(value, Mapping) or content_tag not in value:
        raise DataError(
            f"{where}: field '{key}' must be a message object with '{role_tag}' and '{content_tag}', or a string"
        )
    replies = (fmt.tags["assistant_tag"], fmt.tags["function_tag"])
    if role_tag in value and value[role_tag] not in replies:
        raise DataError(f"{where}: {key}.{role_tag} is {value[role_tag]!r}; expected {replies[0]!r}")
    role = "function" if value.get(role_tag) == fmt.tags["function_tag"] else "assistant"
    return Turn(role, _as_str(value[content_tag], where, f"{key}.{content_tag}"))


def _required_str(row: Mapping, key: str, where: str, need: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field '{key}' ({need})")
    if row[key] is None:
        raise DataError(f"{where}: field '{key}' is null; expected a string ({need})")
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
    _required_str(row, columns["prompt"], where, need)  # named first when both are missing
    response = _required_str(row, columns["response"], where, need)
    prompt = _alpaca_prompt(row, columns, where)
    return replace(prompt, turns=prompt.turns + (Turn("assistant", response),))


def _alpaca_prompt(row: Mapping, columns: Mapping[str, str], where: str) -> Conversation:
    """History turns, then the instruction (+ input) as the last user turn; the system prompt if any."""
    instruction = _required_str(row, columns["prompt"], where, f"alpaca rows need '{columns['prompt']}'")
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
    turns.append(Turn("user", prompt))
    system = _optional_str(row, columns["system"], where)
    return Conversation(tuple(turns), system or None, _tools(row, columns["tools"], where))


def _tools(row: Mapping, key: str, where: str) -> str | None:
    """The `tools` column as JSON text (LLaMA-Factory stores a JSON string; OpenAI rows a list): None when absent
    or empty text; a DataError unless it is a list of tool objects."""
    value = row.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            tools = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field '{key}' must be a JSON list of tools, got unparseable text") from None
    else:
        tools, value = value, json.dumps(value, ensure_ascii=False)
    if not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise DataError(f"{where}: field '{key}' must be a JSON list of tool objects")
    return value


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
        if role_tag not in message:
            raise DataError(f"{where}: {name} is missing field '{role_tag}'")
        if message[role_tag] not in roles:
            raise DataError(f"{where}: {name}.{role_tag} is {message[role_tag]!r}; expected one of {', '.join(roles)}")
        role = roles[message[role_tag]]
        if role == "assistant" and fmt.kind == "messages" and message.get("tool_calls"):
            # OpenAI: the calls are in `tool_calls`, the content is null or empty
            turns.append(Turn("function", _openai_calls(message["tool_calls"], where, name)))
            continue
        if content_tag not in message:
            raise DataError(f"{where}: {name} is missing field '{content_tag}'")
        content = _as_str(message[content_tag], where, f"{name}.{content_tag}")
        if role == "tool" and fmt.kind == "messages" and turns and turns[-1].role == "tool":
            # OpenAI rows give one message per tool result; LLaMA-Factory joins them into one observation
            turns[-1] = Turn("tool", turns[-1].content + "\n</tool_response>\n<tool_response>\n" + content)
            continue
        if role == "system":
            if i != 0:
                raise DataError(f"{where}: {name} is a system message; only the first message may be one")
            system = content
        else:
            # As LLaMA-Factory: turns alternate, a user (or tool) turn, then the assistant's; two user turns in a
            # row would otherwise be rendered as one prompt the data never had.
            expected = ("user", "tool") if len(turns) % 2 == 0 else ("assistant", "function")
            if role not in expected:
                tags = [t for t, r in _TAG_ROLES.items() if r in expected and t != "function_tag"]
                raise DataError(f"{where}: {name}.{role_tag} is {message[role_tag]!r}, but turns must alternate; "
                                f"expected {' or '.join(repr(fmt.tags[t]) for t in tags)} here")
            turns.append(Turn(role, content))
    return Conversation(tuple(turns), system, _tools(row, fmt.columns["tools"], where))


def _openai_calls(tool_calls: Any, where: str, name: str) -> str:
    """OpenAI `tool_calls` as a function_call turn's JSON: [{"name", "arguments"}] (arguments decoded when they
    are JSON text, as the OpenAI API sends them)."""
    if not isinstance(tool_calls, list):
        raise DataError(f"{where}: {name}.tool_calls must be a list of calls")
    calls = []
    for j, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or "name" not in function:
            raise DataError(f"{where}: {name}.tool_calls[{j}] must have a 'function' with a 'name'")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise DataError(f"{where}: {name}.tool_calls[{j}].function.arguments is not JSON") from None
        calls.append({"name": function["name"], "arguments": arguments})
    return json.dumps(calls, ensure_ascii=False)
