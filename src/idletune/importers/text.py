"""TextImporter: text, documents and chat datasets → training examples on the queue.

Documents (plain text, Markdown, HTML, PDF, DOCX, CSV/JSON without chat structure) become text
chunks cut along headings and paragraphs (:mod:`.chunking`). Chat datasets (OpenAI JSONL,
ShareGPT, Alpaca, prompt/completion, a ChatGPT ``conversations.json`` export, and CSVs with
instruction/output-like columns) become chat pairs, one per assistant turn (:mod:`.chat_formats`).
All examples of one import are added in one transaction.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path, PurePath
from typing import Any, BinaryIO, Callable

from ..examples import Priority, Source, TrainingExample
from . import chat_formats, documents
from .chunking import CountTokens, chunk_text
from .config import TextImportConfig
from .results import ImportFailed, ImportResult

Progress = Callable[[int, int], None]

# CSV header names that make a CSV a chat dataset: (user column(s), assistant column).
_CSV_CHAT_COLUMNS = [(("instruction", "input"), "output"), (("prompt",), "completion"), (("prompt",), "response"),
                     (("question",), "answer"), (("input",), "output"), (("user",), "assistant")]


class TextImporter:
    """Import pasted text, files and uploads.

    Args:
        queue: the :class:`~idletune.queue.TrainingQueue` to add to.
        config: limits and chunk sizes.
        count_tokens: token counter for chunking (None: :func:`~.chunking.estimate_tokens`).
    """

    def __init__(self, queue, config: TextImportConfig | None = None, *, count_tokens: CountTokens | None = None):
        self.queue = queue
        self.config = config or TextImportConfig()
        self.count_tokens = count_tokens

    # ---- entry points ---------------------------------------------------------------------------
    def import_text(self, text: str, format: str | None = None, name: str | None = None, *,
                    progress: Progress | None = None) -> ImportResult:
        """Import a string. ``format`` is one of :data:`~.documents.TEXT_FORMATS` or None to detect."""
        if not isinstance(text, str):
            raise ImportFailed(f"text must be a string, got {type(text).__name__}", code="invalid_request", param="text")
        fmt = documents.normalize_format(format)
        if fmt in documents.BINARY_FORMATS:
            raise ImportFailed(f"format {fmt!r} is a binary format; upload the file instead of pasting text",
                               code="unsupported_format", param="format")
        label = name or "text"
        size = len(text.encode("utf-8", "surrogatepass"))
        self._check_size(size, label)
        text = documents.clean_plain(text) if fmt not in ("json", "jsonl", "csv", "tsv") else text
        if not text.strip():
            raise ImportFailed(f"{label} is empty: there is nothing to import", code="empty", source=name, param="text")
        if fmt is None:
            fmt = documents.sniff_text_format(text, label, None)
        return self._import_decoded(text, fmt, label, file=name, progress=progress)

    def import_file(self, path: str | Path | BinaryIO, *, format: str | None = None, name: str | None = None,
                    progress: Progress | None = None) -> ImportResult:
        """Import a file (a path or a binary file object); its format is detected from its content."""
        if isinstance(path, (str, Path)):
            p = Path(path)
            label = name or p.name
            if not p.exists():
                raise ImportFailed(f"{p}: no such file", code="not_found", source=str(p))
            if not p.is_file():
                raise ImportFailed(f"{p} is not a regular file", code="invalid_request", source=str(p))
            self._check_size(p.stat().st_size, label)
            with p.open("rb") as f:
                data = f.read(self.config.max_bytes + 1)
        else:
            label = name or PurePath(getattr(path, "name", "") or "upload").name
            data = path.read(self.config.max_bytes + 1)
            if not isinstance(data, bytes):
                raise ImportFailed(f"{label}: open the file in binary mode ('rb')", code="invalid_request")
        return self.import_bytes(data, label, format=format, progress=progress)

    def import_bytes(self, data: bytes, name: str, *, format: str | None = None,
                     progress: Progress | None = None) -> ImportResult:
        """Import the contents of a file called ``name`` (used for uploads)."""
        self._check_size(len(data), name)
        if not data.strip():
            raise ImportFailed(f"{name} is empty: there is nothing to import", code="empty", source=name)
        declared = documents.normalize_format(format)
        ext = PurePath(name).suffix.lower()
        ext_format = documents.EXTENSIONS.get(ext)
        magic = documents.sniff_binary(data, name)
        result_warnings: list[str] = []
        if declared in documents.BINARY_FORMATS and magic != declared:
            raise ImportFailed(f"{name} is not a {declared.upper()} file (it does not start like one)",
                               code="corrupt_file" if magic is None else "unsupported_format", source=name)
        if ext_format in documents.BINARY_FORMATS and magic != ext_format:
            what = f"a {magic.upper()} file" if magic else "not one (it does not start like one; truncated or renamed?)"
            raise ImportFailed(f"{name} is named {ext} but is {what}", code="corrupt_file", source=name)
        if magic is not None:
            if ext_format and ext_format != magic:
                result_warnings.append(f"{name} is named {ext} but is a {magic.upper()} file; read it as {magic}")
            result = self._import_document(data, magic, name, progress)
        else:
            text = documents.decode_text(data, name)
            if not text.strip():
                raise ImportFailed(f"{name} is empty: there is nothing to import", code="empty", source=name)
            fmt = declared or documents.sniff_text_format(text, name, ext_format)
            if fmt not in ("json", "jsonl", "csv", "tsv"):
                text = documents.clean_plain(text)
            result = self._import_decoded(text, fmt, name, file=name, progress=progress)
        result.warnings[:0] = result_warnings
        return result

    # ---- formats --------------------------------------------------------------------------------
    def _import_document(self, data: bytes, fmt: str, name: str, progress: Progress | None) -> ImportResult:
        result = ImportResult(source=name, importer="text", metadata={"file": name, "format": fmt})
        if fmt == "pdf":
            pages = documents.pdf_pages(data, name, max_pages=self.config.max_pdf_pages, progress=progress)
            result.skipped.extend(pages.skipped)
            result.metadata.update(title=pages.title, pages=len(pages.pages))
            examples = []
            for i, page in enumerate(pages.pages):
                examples += self._text_examples(page, result, page=i + 1)
            if not examples:
                raise ImportFailed(f"{name} has no extractable text (a scanned PDF? import its pages as images "
                                   "for OCR)", code="no_content", source=name)
            return self._commit(examples, result)
        text, title = documents.docx_text(data, name, max_unzipped_bytes=self.config.max_unzipped_bytes)
        result.metadata["title"] = title
        return self._commit(self._need(self._text_examples(text, result), name), result, progress)

    def _import_decoded(self, text: str, fmt: str, label: str, *, file: str | None,
                        progress: Progress | None) -> ImportResult:
        result = ImportResult(source=label, importer="text", metadata={"file": file, "format": fmt})
        if fmt in ("json", "jsonl"):
            records = _parse_json(text, fmt, label, result)
            return self._import_records(records, label, result, progress)
        if fmt in ("csv", "tsv"):
            return self._import_csv(text, fmt, label, result, progress)
        if fmt == "html":
            title = documents.html_title(text)
            body = documents.html_to_text(text)
        elif fmt == "markdown":
            body, title = documents.clean_markdown(text)
        else:
            body, title = text, None
        result.metadata["title"] = title
        return self._commit(self._need(self._text_examples(body, result), label), result, progress)

    def _import_records(self, records: list[tuple[str, Any]], label: str, result: ImportResult,
                        progress: Progress | None) -> ImportResult:
        kinds = [chat_formats.classify(r) for _, r in records]
        chat_kinds = {k for k in kinds if k in chat_formats.CHAT_KINDS}
        text_records = kinds.count("text")
        if not chat_kinds and not text_records:
            # Not a dataset: import the JSON as readable text ("key: value" lines, one paragraph per record).
            body = "\n\n".join(_render(r) for _, r in records)
            result.metadata["dataset"] = None
            return self._commit(self._need(self._text_examples(body, result), label), result, progress)
        result.metadata["dataset"] = ",".join(sorted(chat_kinds)) if chat_kinds else "text records"
        examples: list[TrainingExample] = []
        for n, ((where, record), kind) in enumerate(zip(records, kinds), 1):
            if kind == "text":
                examples += self._text_examples(documents.clean_plain(record["text"]), result, record=where)
            elif kind is None:
                result.skip(where, "not a chat record (expected messages, conversations, instruction/output, "
                                   "prompt/completion or a ChatGPT export conversation)")
            else:
                examples += self._chat_examples(record, kind, where, result)
            self._check_count(len(examples), label)
            if progress:
                progress(n, len(records))
        return self._commit(self._need(examples, label, result), result)

    def _chat_examples(self, record: dict, kind: str, where: str, result: ImportResult) -> list[TrainingExample]:
        try:
            conv = chat_formats.conversation(record, kind)
        except ValueError as e:
            result.skip(where, f"malformed {kind} record: {e}")
            return []
        pairs = conv.examples()
        if conv.dropped:
            result.skip(where, f"{conv.dropped} tool/function message(s) left out of the conversation")
        if not pairs:
            result.skip(where, "no assistant turn to learn after a user message")
            return []
        meta = {k: v for k, v in (("file", result.metadata.get("file")), ("dataset", kind),
                                  ("record", where), ("title", conv.title)) if v}
        out = []
        for turn, messages in enumerate(pairs):
            try:
                out.append(TrainingExample.chat(messages, source=Source.DATASET, priority=Priority.LOW,
                                                turn=turn, **meta))
            except ValueError as e:
                result.skip(f"{where} turn {turn}", str(e))
        return out

    def _import_csv(self, text: str, fmt: str, label: str, result: ImportResult,
                    progress: Progress | None) -> ImportResult:
        rows = _parse_csv(text, fmt, label)
        header = [h.strip() for h in rows[0]]
        lower = [h.lower() for h in header]
        body_rows = rows[1:]
        if not body_rows:
            raise ImportFailed(f"{label} has a header row but no data rows", code="empty", source=label)
        chat_cols = next(((u, a) for u, a in _CSV_CHAT_COLUMNS if u[0] in lower and a in lower), None)
        examples: list[TrainingExample] = []
        paragraphs: list[str] = []
        for i, row in enumerate(body_rows, start=2):
            where = f"row {i}"
            if len(row) != len(header):
                result.skip(where, f"has {len(row)} fields, the header has {len(header)}")
                continue
            if not any(c.strip() for c in row):
                continue
            if chat_cols:
                values = dict(zip(lower, row))
                user = "\n\n".join(values[c].strip() for c in chat_cols[0] if c in values and values[c].strip())
                answer = values[chat_cols[1]].strip()
                if not user or not answer:
                    result.skip(where, f"empty {chat_cols[0][0] if not user else chat_cols[1]}")
                    continue
                examples.append(TrainingExample.chat(
                    [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                    source=Source.DATASET, priority=Priority.LOW, file=result.metadata.get("file"),
                    dataset="csv", record=where))
                self._check_count(len(examples), label)
            else:
                paragraphs.append("\n".join(f"{h}: {v.strip()}" for h, v in zip(header, row) if v.strip()))
            if progress:
                progress(i - 1, len(body_rows))
        result.metadata["dataset"] = "csv chat columns" if chat_cols else None
        if not chat_cols:
            examples = self._text_examples("\n\n".join(paragraphs), result)
        return self._commit(self._need(examples, label, result), result)

    # ---- helpers --------------------------------------------------------------------------------
    def _text_examples(self, text: str, result: ImportResult, **meta: Any) -> list[TrainingExample]:
        chunks = chunk_text(text, max_tokens=self.config.chunk.max_tokens,
                            overlap_tokens=self.config.chunk.overlap_tokens, count_tokens=self.count_tokens)
        self._check_count(len(chunks), result.source)
        base = {k: v for k, v in (("file", result.metadata.get("file")), ("title", result.metadata.get("title")),
                                  ("format", result.metadata.get("format"))) if v}
        return [TrainingExample.from_text(c.text, source=Source.TEXT, priority=Priority.LOW, **base, **meta,
                                          chunk=c.index, **({"section": c.section} if c.section else {}))
                for c in chunks]

    def _need(self, examples: list[TrainingExample], label: str, result: ImportResult | None = None):
        if not examples:
            why = ""
            if result is not None and result.skipped:
                why = f"; every part was skipped, e.g. {result.skipped[0][0]}: {result.skipped[0][1]}"
            raise ImportFailed(f"{label} contains no text to learn from{why}", code="no_content", source=label)
        return examples

    def _check_size(self, size: int, label: str) -> None:
        if size > self.config.max_bytes:
            raise ImportFailed(f"{label} is {size / 1e6:.1f} MB, over the {self.config.max_bytes / 1e6:.0f} MB "
                               "limit for text and documents", code="too_large", source=label)

    def _check_count(self, n: int, label: str) -> None:
        if n > self.config.max_examples:
            raise ImportFailed(f"{label} would produce more than {self.config.max_examples} examples; split it",
                               code="too_large", source=label)

    def _commit(self, examples: list[TrainingExample], result: ImportResult,
                progress: Progress | None = None) -> ImportResult:
        self._check_count(len(examples), result.source)
        result.record(examples, self.queue.add_many(examples))
        if progress:
            progress(len(examples), len(examples))
        return result


def _parse_json(text: str, fmt: str, label: str, result: ImportResult) -> list[tuple[str, Any]]:
    """Records of a JSON or JSONL text as ``(where, record)``; a syntax error is an ImportFailed."""
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if len(lines) > 1 and e.msg == "Extra data":  # JSON Lines named .json
                result.warnings.append(f"{label} holds one JSON value per line; read it as JSON Lines")
                result.metadata["format"] = "jsonl"
                return _parse_json(text, "jsonl", label, result)
            truncated = e.pos >= len(text.rstrip()) - 1
            raise ImportFailed(f"{label} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                               + (" (the file looks truncated)" if truncated else ""), code="corrupt_file",
                               source=label) from None
        if isinstance(data, list):
            return [(f"record {i + 1}", r) for i, r in enumerate(data)]
        if isinstance(data, dict) and chat_formats.classify(data) is None:
            for key in ("data", "records", "examples", "conversations", "items"):
                if isinstance(data.get(key), list) and data[key] and all(isinstance(r, dict) for r in data[key]):
                    return [(f"{key}[{i}]", r) for i, r in enumerate(data[key])]
        return [("document", data)]
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            last = not any(ln.strip() for ln in text.split("\n")[n:])
            raise ImportFailed(f"{label} line {n} is not valid JSON ({e.msg} at column {e.colno})"
                               + ("; the file looks truncated" if last else "")
                               + "; nothing was imported", code="corrupt_file", source=label) from None
    return records


def _parse_csv(text: str, fmt: str, label: str) -> list[list[str]]:
    sample = text[:8192]
    if fmt == "tsv":
        dialect: Any = csv.excel_tab
    else:
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel
    try:
        rows = [r for r in csv.reader(io.StringIO(text), dialect, strict=True)]
    except csv.Error as e:
        raise ImportFailed(f"{label} is not valid CSV: {e} (a truncated file or an unclosed quote?)",
                           code="corrupt_file", source=label) from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ImportFailed(f"{label} is empty: there is nothing to import", code="empty", source=label)
    return rows


def _render(value: Any, indent: str = "") -> str:
    """JSON → readable ``key: value`` lines."""
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{indent}{k}:")
                lines.append(_render(v, indent + "  "))
            elif v not in (None, "", [], {}):
                lines.append(f"{indent}{k}: {v}")
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(_render(v, indent) if isinstance(v, (dict, list)) else f"{indent}- {v}" for v in value)
    return f"{indent}{value}"
