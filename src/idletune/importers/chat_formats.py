"""Chat datasets → conversations → chat examples (one per assistant turn, with its context).

Recognised records (one JSON object each):

- OpenAI fine-tuning: ``{"messages": [{"role": ..., "content": ...}, ...]}``; an assistant
  message with ``"weight": 0`` is context only; tool calls/results are left out.
- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``.
- Alpaca: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional).
- Prompt/completion: ``{"prompt": ..., "completion": ...}`` (or ``"response"``).
- ChatGPT export (``conversations.json``): ``{"title": ..., "mapping": {id: node}, "current_node": id}``;
  the branch that ends at ``current_node`` is the conversation (edited-away branches are not).
- Plain text records: ``{"text": ...}`` (not chat; imported as text chunks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHAT_KINDS = ("openai", "sharegpt", "alpaca", "prompt_completion", "chatgpt_export")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                   "bot": "assistant", "system": "system"}


@dataclass
class Conversation:
    """Normalised messages; ``learn[i]`` says whether message i may be a training target."""

    messages: list[dict[str, str]] = field(default_factory=list)
    learn: list[bool] = field(default_factory=list)
    title: str | None = None
    dropped: int = 0  # tool calls/results and other messages that are not plain chat

    def add(self, role: str, content: Any, learn: bool = True) -> None:
        text = _content_text(content)
        if not text:
            return  # empty turns (ChatGPT's blank root system message, tool-call stubs) carry nothing
        if self.messages and self.messages[-1]["role"] == role:  # merge runs (split answers, tool detours)
            self.messages[-1]["content"] += "\n\n" + text
            self.learn[-1] = self.learn[-1] and learn
            return
        self.messages.append({"role": role, "content": text})
        self.learn.append(learn)

    def examples(self) -> list[list[dict[str, str]]]:
        """One message list per learnable assistant turn: the turn and everything before it."""
        out = []
        for i, m in enumerate(self.messages):
            if m["role"] == "assistant" and self.learn[i] and any(p["role"] == "user" for p in self.messages[:i]):
                out.append([dict(p) for p in self.messages[: i + 1]])
        return out


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):  # OpenAI content parts / ChatGPT export parts
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text") \
                    and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(t for t in texts if t.strip()).strip()
    return ""


def classify(record: Any) -> str | None:
    """Which kind of record this is: one of :data:`CHAT_KINDS`, ``"text"``, or None."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "openai"
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if isinstance(record.get("mapping"), dict):
        return "chatgpt_export"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt_completion"
    if isinstance(record.get("text"), str):
        return "text"
    return None


def conversation(record: dict, kind: str) -> Conversation:
    """The conversation in one record of a known chat kind (ValueError says what is wrong)."""
    conv = Conversation()
    if kind == "openai":
        for i, m in enumerate(record["messages"]):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{i}] is not an object")
            role = m.get("role")
            role = "system" if role == "developer" else role
            if role in ("tool", "function") or (role == "assistant" and m.get("tool_calls") and not m.get("content")):
                conv.dropped += 1
            elif role in ("system", "user", "assistant"):
                conv.add(role, m.get("content"), learn=m.get("weight", 1) != 0)
            else:
                raise ValueError(f"messages[{i}] has an unknown role {role!r}")
    elif kind == "sharegpt":
        for i, m in enumerate(record["conversations"]):
            if not isinstance(m, dict):
                raise ValueError(f"conversations[{i}] is not an object")
            who = str(m.get("from", m.get("role", ""))).lower()
            role = _SHAREGPT_ROLES.get(who)
            if role is None:
                conv.dropped += 1  # function_call, observation, tool...
            else:
                conv.add(role, m.get("value", m.get("content")))
        if isinstance(record.get("system"), str) and record["system"].strip():
            conv.messages.insert(0, {"role": "system", "content": record["system"].strip()})
            conv.learn.insert(0, False)
    elif kind == "alpaca":
        instruction, inp, output = record.get("instruction"), record.get("input"), record.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise ValueError("instruction and output must be strings")
        if isinstance(record.get("system"), str):
            conv.add("system", record["system"])
        prompt = instruction.strip()
        if isinstance(inp, str) and inp.strip():
            prompt = f"{prompt}\n\n{inp.strip()}"
        conv.add("user", prompt)
        conv.add("assistant", output)
    elif kind == "prompt_completion":
        conv.add("user", record.get("prompt"))
        conv.add("assistant", record.get("completion", record.get("response")))
    elif kind == "chatgpt_export":
        _chatgpt(record, conv)
    else:
        raise ValueError(f"not a chat record kind: {kind}")
    return conv


def _chatgpt(record: dict, conv: Conversation) -> None:
    mapping: dict = record["mapping"]
    conv.title = record.get("title") if isinstance(record.get("title"), str) else None
    node_id = record.get("current_node")
    if node_id not in mapping:  # no current node: follow the last child from the root
        roots = [k for k, n in mapping.items() if isinstance(n, dict) and not n.get("parent")]
        node_id = roots[0] if roots else None
        while node_id is not None and mapping.get(node_id, {}).get("children"):
            node_id = mapping[node_id]["children"][-1]
    chain = []
    seen = set()
    while node_id is not None and node_id in mapping and node_id not in seen:
        seen.add(node_id)
        node = mapping[node_id]
        chain.append(node)
        node_id = node.get("parent")
    for node in reversed(chain):
        msg = node.get("message") if isinstance(node, dict) else None
        if not isinstance(msg, dict):
            continue
        role = (msg.get("author") or {}).get("role")
        content = msg.get("content") or {}
        meta = msg.get("metadata") or {}
        if meta.get("is_visually_hidden_from_conversation") or role not in ("system", "user", "assistant"):
            if role == "tool":
                conv.dropped += 1
            continue
        if content.get("content_type") not in ("text", "multimodal_text") or msg.get("recipient", "all") != "all":
            conv.dropped += 1  # code sent to a tool, browsing displays, images...
            continue
        conv.add(role, content.get("parts") or [])
