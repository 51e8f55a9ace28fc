"""Cut text into training-sized chunks along its structure, with overlap.

Text is read as sections (a Markdown ``#`` heading and what follows it) made of paragraphs
(separated by blank lines; fenced code blocks stay whole). Chunks are filled greedily with whole
paragraphs; a paragraph longer than the budget is split into sentences (lines for code), a
sentence longer than the budget into words, and a word longer than that into pieces.

- A section starts a new chunk when it does not fit in what is left of the current one, so
  small sections share a chunk and sections are split only when they are themselves too long.
- A chunk that continues a section starts with the section's heading and repeats up to
  ``overlap_tokens`` of the previous chunk's last sentences/paragraphs, so no chunk starts
  without context. Overlap never crosses a section boundary.

Token counts come from ``count_tokens`` (e.g. ``lambda s: len(tokenizer(s).input_ids)``) or,
without one, :func:`estimate_tokens`. A chunk's size is the sum of its parts' counts plus one
token per separator; with a real tokenizer the true count of the joined text is within a token
or two of that.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

CountTokens = Callable[[str], int]

_HEADING = re.compile(r"^(#{1,6})\s+(\S.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？])\s+(?=\S)")
# CJK characters are about one token each; runs of letters/digits about one per 4 characters;
# each punctuation mark one.
_TOKEN_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+|[^\w\s]|_+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def estimate_tokens(text: str) -> int:
    """Rough token count without a tokenizer (the fallback).

    Counts ``ceil(len/4)`` tokens per run of letters or digits, one per punctuation mark and one
    per CJK character. For English prose this is about 1.4 tokens per word, a little above what
    BPE tokenizers of current chat models produce, so chunks err on the small side.
    """
    n = 0
    for m in _TOKEN_RE.finditer(text):
        s = m.group()
        n += 1 if _CJK.match(s) else -(-len(s) // 4)
    return n


@dataclass
class Chunk:
    text: str
    section: str | None
    """The heading of the section the chunk is in (None before the first heading)."""
    index: int
    tokens: int
    """The chunk's size as counted while packing (see the module docstring)."""


@dataclass
class _Unit:
    text: str
    tokens: int
    para: int  # paragraph id: units of one paragraph are joined by `joiner`, else by a blank line
    joiner: str = " "
    heading: bool = False


def _blocks(text: str) -> list[tuple[str, str]]:
    """Split into ("heading"|"para"|"code", text) blocks."""
    blocks: list[tuple[str, str]] = []
    buf: list[str] = []
    in_code = False

    def flush(kind: str = "para") -> None:
        if buf and "".join(buf).strip():
            blocks.append((kind, "\n".join(buf).strip("\n")))
        buf.clear()

    for line in text.split("\n"):
        if _FENCE.match(line):
            if in_code:
                buf.append(line)
                flush("code")
                in_code = False
            else:
                flush()
                buf.append(line)
                in_code = True
            continue
        if in_code:
            buf.append(line)
        elif not line.strip():
            flush()
        elif _HEADING.match(line):
            flush()
            blocks.append(("heading", line.strip()))
        else:
            buf.append(line.rstrip())
    flush("code" if in_code else "para")
    return blocks


class _Splitter:
    def __init__(self, max_tokens: int, count: CountTokens):
        self.max = max_tokens
        self.count = count

    def units(self, kind: str, text: str, para: int) -> list[_Unit]:
        n = self.count(text)
        if n <= self.max:
            return [_Unit(text, n, para, heading=kind == "heading")]
        if kind == "code":
            pieces, joiner = text.split("\n"), "\n"
        else:
            pieces, joiner = _SENTENCE_END.split(" ".join(text.split("\n")) if kind == "para" else text), " "
        out: list[_Unit] = []
        for piece in pieces:
            if not piece.strip():
                continue
            k = self.count(piece)
            if k <= self.max:
                out.append(_Unit(piece, k, para, joiner))
            else:
                out.extend(_Unit(p, self.count(p), para, " ") for p in self._split_long(piece))
        return out

    def _split_long(self, text: str) -> list[str]:
        """Split an over-long sentence into word runs (and an over-long word into pieces)."""
        out, cur, cur_n = [], [], 0
        for word in text.split():
            k = self.count(word) + 1
            if k > self.max:
                if cur:
                    out.append(" ".join(cur))
                    cur, cur_n = [], 0
                out.extend(self._split_word(word))
                continue
            if cur_n + k > self.max and cur:
                out.append(" ".join(cur))
                cur, cur_n = [], 0
            cur.append(word)
            cur_n += k
        if cur:
            out.append(" ".join(cur))
        return out

    def _split_word(self, word: str) -> list[str]:
        out = []
        while word:
            size = max(1, len(word) * self.max // max(self.count(word), 1))
            while size > 1 and self.count(word[:size]) > self.max:
                size //= 2
            out.append(word[:size])
            word = word[size:]
        return out


def _join(units: list[_Unit]) -> str:
    parts: list[str] = []
    prev: _Unit | None = None
    for u in units:
        if prev is not None:
            parts.append(u.joiner if u.para == prev.para else "\n\n")
        parts.append(u.text)
        prev = u
    return "".join(parts)


def _size(units: list[_Unit]) -> int:
    return sum(u.tokens for u in units) + max(len(units) - 1, 0)


def chunk_text(text: str, *, max_tokens: int = 512, overlap_tokens: int = 64,
               count_tokens: CountTokens | None = None) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``max_tokens`` tokens (see the module docstring).

    Args:
        text: cleaned text; Markdown ``#`` headings mark sections.
        max_tokens: the budget of one chunk.
        overlap_tokens: how much of a chunk's end is repeated at the start of the next one in
            the same section (whole sentences or paragraphs only; 0 for none).
        count_tokens: a token counter; None uses :func:`estimate_tokens`.

    Returns:
        The chunks in order; an empty list for empty or whitespace-only text.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens must be between 0 and max_tokens - 1, got {overlap_tokens}")
    count = count_tokens or estimate_tokens
    splitter = _Splitter(max_tokens, count)

    # Sections: (heading unit or None, [units]).
    sections: list[tuple[_Unit | None, str | None, list[_Unit]]] = []
    heading: _Unit | None = None
    title: str | None = None
    body: list[_Unit] = []
    for para, (kind, block) in enumerate(_blocks(text.replace("\r\n", "\n").replace("\r", "\n"))):
        if kind == "heading":
            if heading is not None or body:
                sections.append((heading, title, body))
            units = splitter.units(kind, block, para)
            heading = units[0] if len(units) == 1 else None
            title = _HEADING.match(block).group(2)
            body = [] if heading is not None else units  # an absurdly long heading is plain text
        else:
            body.extend(splitter.units(kind, block, para))
    if heading is not None or body:
        sections.append((heading, title, body))

    chunks: list[Chunk] = []
    cur: list[_Unit] = []
    cur_section: str | None = None

    def emit() -> None:
        if any(not u.heading for u in cur) or (cur and not chunks):
            t = _join(cur).strip()
            if t:
                chunks.append(Chunk(t, cur_section, len(chunks), _size(cur)))

    for heading, title, body in sections:
        whole = ([heading] if heading else []) + body
        if cur and _size(cur) + 1 + _size(whole) > max_tokens:
            emit()
            cur = []
        if not cur:
            cur_section = title
        if heading:
            cur.append(heading)
        for unit in body:
            if _size(cur) + 1 + unit.tokens <= max_tokens or not cur:
                cur.append(unit)
                continue
            emit()
            # Continue the section: its heading, then the previous chunk's tail as overlap.
            tail: list[_Unit] = []
            for u in reversed(cur):
                if u.heading or _size([u] + tail) > overlap_tokens:
                    break
                tail.insert(0, u)
            nxt = ([heading] if heading else []) + tail + [unit]
            while _size(nxt) > max_tokens and tail:
                tail.pop(0)
                nxt = ([heading] if heading else []) + tail + [unit]
            if _size(nxt) > max_tokens:
                nxt = [unit]
            cur = nxt
            cur_section = title
    emit()
    return chunks
