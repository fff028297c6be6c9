"""The one in-memory shape every dataset row is parsed into: a Conversation (chat) or a TextDocument (plain text).

Formats (alpaca, sharegpt, OpenAI messages, text) are converted by formats.py; encode.py tokenizes these types.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        """The chat-template input: the system prompt (if any) first, then every turn."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": t.role, "content": t.content} for t in self.turns]


@dataclass(frozen=True)
class TextDocument:
    text: str
