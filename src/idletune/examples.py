"""What the model learns from: training examples, their sources and priorities.

A training example is one of two kinds:

- ``chat``: a conversation whose *last* message is the assistant turn to learn. Loss is taken
  only on that turn; the messages before it are context.
- ``text``: a chunk of text (a web page, a document, an OCR'd image). Loss is taken on all of it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

ROLES = ("system", "user", "assistant")


class Priority(IntEnum):
    """Higher trains first. Corrections before chat pairs before imports."""

    LOW = 0  # imported documents, web pages, images
    NORMAL = 1  # ordinary chat exchanges
    HIGH = 2  # user corrections and explicit feedback

    @classmethod
    def parse(cls, value: "int | str | Priority") -> "Priority":
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown priority {value!r}; use one of low, normal, high") from None
        return cls(value)


class Source:
    """Where an example came from (free-form strings are accepted; these are the usual ones)."""

    CHAT = "chat"
    CORRECTION = "correction"
    FEEDBACK = "feedback"
    STATEMENT = "statement"
    WEB = "web"
    IMAGE = "image"
    TEXT = "text"
    DATASET = "dataset"


class Status:
    PENDING = "pending"  # waiting to be trained on
    TRAINED = "trained"  # trained on and accepted by the gate
    HELD_OUT = "held_out"  # never trained: measures whether updates generalise
    REJECTED = "rejected"  # the gate refused updates containing it; reason is recorded


def _clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{i}].content must be a non-empty string")
        out.append({"role": role, "content": content})
    return out


@dataclass
class TrainingExample:
    """One unit of training data. Build with :meth:`chat` or :meth:`text`."""

    kind: str  # "chat" | "text"
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    source: str = Source.CHAT
    priority: Priority = Priority.NORMAL
    metadata: dict[str, Any] = field(default_factory=dict)
    # Filled in by the queue:
    id: int | None = None
    status: str = Status.PENDING
    created_at: float = field(default_factory=time.time)
    times_trained: int = 0
    reason: str | None = None

    @classmethod
    def chat(cls, messages: list[dict[str, Any]], *, source: str = Source.CHAT,
             priority: "Priority | int | str" = Priority.NORMAL, **metadata: Any) -> "TrainingExample":
        msgs = _clean_messages(messages)
        if msgs[-1]["role"] != "assistant":
            raise ValueError("a chat example must end with the assistant turn to learn")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise ValueError("a chat example needs at least one user message before the assistant turn")
        return cls(kind="chat", messages=msgs, source=source, priority=Priority.parse(priority),
                   metadata=dict(metadata))

    @classmethod
    def from_text(cls, text: str, *, source: str = Source.TEXT,
                  priority: "Priority | int | str" = Priority.LOW, **metadata: Any) -> "TrainingExample":
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        return cls(kind="text", text=text.strip(), source=source, priority=Priority.parse(priority),
                   metadata=dict(metadata))

    @property
    def content_hash(self) -> str:
        """Identity for dedup: the content only, never the source, priority or metadata."""
        if self.kind == "chat":
            key = json.dumps([[m["role"], m["content"].strip()] for m in self.messages or []],
                             ensure_ascii=False)
        else:
            key = " ".join((self.text or "").split())
        return hashlib.sha256(f"{self.kind}\x00{key}".encode("utf-8")).hexdigest()

    @property
    def target(self) -> str:
        """The text the model should learn to produce."""
        return self.messages[-1]["content"] if self.kind == "chat" else (self.text or "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "messages": self.messages, "text": self.text,
            "source": self.source, "priority": self.priority.name.lower(), "metadata": self.metadata,
            "status": self.status, "created_at": self.created_at, "times_trained": self.times_trained,
            "reason": self.reason, "content_hash": self.content_hash,
        }
