"""The one in-memory shape every dataset row is parsed into: a Conversation (chat) or a TextDocument (plain text).

Formats (alpaca, sharegpt, OpenAI messages, text) are converted by formats.py; encode.py tokenizes these types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# "function" is an assistant turn that calls tools (its content the calls' JSON), "tool" a tool's answer to it
ROLES = ("system", "user", "assistant", "function", "tool")


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str | None = None
    tools: str | None = None  # the JSON list of tools the assistant may call (the `tools` column), if any

    def messages(self) -> list[dict[str, str]]:
        """The jinja chat-template input: the system prompt (if any) first, then every turn (a function call is
        an assistant message whose content is the calls' JSON)."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        role = {"function": "assistant"}
        return head + [{"role": role.get(t.role, t.role), "content": t.content} for t in self.turns]

    def tool_list(self) -> list[dict] | None:
        """The tools, decoded (formats.py checked they are a JSON list of objects)."""
        return None if self.tools is None else json.loads(self.tools)


@dataclass(frozen=True)
class TextDocument:
    text: str
