"""Tokenize rendered conversations and texts into input ids and (unshifted) labels with exact loss masks.

This is the `template: auto` path (named templates encode slot by slot, templates.py) and the truncation rules
both share. A trained span is found by rendering, not by guessing token patterns: for each assistant turn i, the text
between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is what the model must
produce, end-of-turn marker included. The full render is tokenized once; tokens inside a span are trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jinja2 import TemplateError

from longtune.constants import IGNORE_INDEX
from longtune.data.conversation import Conversation
from longtune.errors import ConfigError, DataError


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    response_start: int  # index of the first token of the last assistant turn's span


def render_messages(
    tokenizer, chat_template: str, messages: list[dict[str, str]], add_generation_prompt: bool, where: str,
    tools: list[dict] | None = None,
) -> str:
    """The jinja render of `messages` (template: auto); `tools` go to the template as its `tools` variable."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False,
            tools=tools,
        )
    except TemplateError as e:
        raise DataError(f"{where}: the chat template refused this conversation: {e}") from None


def assistant_char_spans(
    conversation: Conversation, tokenizer, chat_template: str, where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character span of every assistant turn in it."""
    if not conversation.turns or conversation.turns[-1].role not in ("assistant", "function"):
        last = conversation.turns[-1].role if conversation.turns else "none"
        raise DataError(f"{where}: a conversation must end with an assistant turn (its last turn is {last})")
    messages = conversation.messages()
    tools = conversation.tool_list()
    full = render_messages(tokenizer, chat_template, messages, False, where, tools)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_messages(tokenizer, chat_template, messages[:j], True, where, tools)
        # the last message is an assistant turn whose rendering is `full`: one render fewer per row
        last = j == len(messages) - 1
        upto = full if last else render_messages(tokenizer, chat_template, messages[: j + 1], False, where, tools)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise ConfigError(
                f"template: the chat template does not render {where} incrementally (rendering message {j} "
                f"changes the text of earlier messages), so assistant tokens cannot be located exactly; "
                f"use a template that keeps earlier turns unchanged, e.g. template: chatml"
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def tokenize_batch(
    tokenizer, texts: list[str], *, add_special_tokens: bool, with_offsets: bool
) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
    """(ids, character offsets or None) of each text, in one call of the fast tokenizer (no per-text overhead)."""
    if not texts:
        return []
    encoding = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=with_offsets)
    offsets = encoding["offset_mapping"] if with_offsets else [None] * len(texts)
    return [(list(ids), off) for ids, off in zip(encoding["input_ids"], offsets, strict=True)]


def conversation_labels(
    input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], *, train_on_prompt: bool
) -> EncodedConversation:
    """Labels keeping exactly the tokens inside an assistant span (or all, train_on_prompt).

    A token counts as inside a span when its whole character range is; with a tokenizer whose markup is plain
    text (e.g. llama3 headers on a vocab without them) a token straddling a span edge is left untrained.
    Zero-width tokens are placed at their position.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if not len(ids):
        return EncodedConversation([], [], 0)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start, end = bounds[:, :1], bounds[:, 1:]
    span_start = np.array([a for a, _ in spans], dtype=np.int64)
    span_end = np.array([b for _, b in spans], dtype=np.int64)
    after_start = span_start <= start
    inside = np.where(end == start, after_start & (start < span_end), after_start & (end <= span_end)).any(axis=1)
    in_last_response = np.flatnonzero(bounds[:, 0] >= spans[-1][0])
    response_start = int(in_last_response[0]) if len(in_last_response) else len(ids)
    labels = ids if train_on_prompt else np.where(inside, ids, IGNORE_INDEX)
    return EncodedConversation(list(input_ids), labels.tolist(), response_start)


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    """`ids` ending with `eos` (appended unless the tokenizer already put it there; nothing when None)."""
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def truncate_conversation(
    input_ids: list[int], labels: list[int], response_start: int, cutoff_len: int
) -> tuple[list[int], list[int]]:
    """Cut an over-long conversation to cutoff_len tokens, keeping as much of the last response as possible.

    Like LLaMA-Factory, the response is what must survive; unlike its right-cut of the prompt, we keep the
    prompt's end (the question and the generation prompt sit there) and its beginning (system prompt, first
    header): the prompt loses its middle. The prompt always keeps min(its length, cutoff_len // 2) tokens so a
    very long response still has context; the response is then cut from the right.
    """
    if len(input_ids) <= cutoff_len:
        return input_ids, labels
    prompt_len, response_len = response_start, len(input_ids) - response_start
    prompt_keep = max(cutoff_len - response_len, min(prompt_len, cutoff_len // 2))
    response_keep = cutoff_len - prompt_keep
    head = prompt_keep // 4
    keep = (
        list(range(head))
        + list(range(prompt_len - (prompt_keep - head), prompt_len))
        + list(range(response_start, response_start + response_keep))
    )
    return [input_ids[t] for t in keep], [labels[t] for t in keep]


def split_into_pieces(input_ids: list[int], cutoff_len: int) -> list[list[int]]:
    """Consecutive pieces of at most cutoff_len tokens (pretraining loses no text to truncation)."""
    return [input_ids[i : i + cutoff_len] for i in range(0, len(input_ids), cutoff_len)]


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
