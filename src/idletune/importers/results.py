"""What an import did (:class:`ImportResult`) and why one could not happen at all (:class:`ImportFailed`).

The rule: a source that cannot be imported at all (404, unreachable host, corrupt file, refused
address, nothing to learn from) raises :class:`ImportFailed` and leaves the queue untouched.
Anything else returns an :class:`ImportResult`, whose ``skipped`` list says what was left out
and why (a disallowed page, a record without an assistant turn, a page of a PDF with no text).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Error codes, their HTTP status (over the API) and whether the *user's input* is at fault.
_HTTP_STATUS = {
    "too_large": 413,
    "unsupported_format": 415,
    "ocr_unavailable": 503,
    "captioner_unavailable": 503,
}


class ImportFailed(ValueError):
    """A source could not be imported at all; nothing was added to the queue.

    Attributes:
        code: a short machine-readable reason, e.g. ``http_404``, ``unreachable``,
            ``blocked_address``, ``robots_disallowed``, ``not_html``, ``corrupt_file``,
            ``invalid_encoding``, ``too_large``, ``unsupported_format``, ``empty``,
            ``no_content``, ``ocr_unavailable``, ``invalid_request``.
        source: the URL or file name concerned (None for pasted text).
        param: the request field at fault, when there is one (for HTTP error bodies).
    """

    def __init__(self, message: str, *, code: str = "import_failed", source: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.source = source
        self.param = param

    @property
    def http_status(self) -> int:
        """The 4xx/5xx status this failure maps to over HTTP (400 unless listed)."""
        return _HTTP_STATUS.get(self.code, 400)

    def to_dict(self) -> dict[str, Any]:
        """OpenAI-style error object (the value of ``{"error": ...}``)."""
        return {
            "message": self.message,
            "type": "server_error" if self.http_status >= 500 else "invalid_request_error",
            "param": self.param,
            "code": self.code,
        }


@dataclass
class ImportResult:
    """What one import produced.

    Attributes:
        source: the URL, file name or ``"text"`` that was imported.
        importer: ``"website"``, ``"image"`` or ``"text"``.
        examples_generated: examples the source produced (new and already-queued alike).
        example_ids: queue ids of the examples that were new (re-importing gives none).
        duplicates: examples whose content was already on the queue.
        held_out: of the new examples, those kept out of training to measure whether learning
            generalises (the quality gate's held-out set; at most ``heldout_percent`` of an
            import, none of an import of fewer than ten examples at the default 10 %).
        skipped: ``(what, why)`` for each part left out, e.g. ``("https://x/private", "disallowed
            by robots.txt")`` or ``("record 7", "no assistant turn")``.
        warnings: things the user should know that did not stop the import.
        metadata: about the source: ``title``, ``url`` or ``file``, ``format`` (detected), and
            importer-specific keys (pages fetched, image size, EXIF...).
    """

    source: str
    importer: str
    examples_generated: int = 0
    example_ids: list[int] = field(default_factory=list)
    duplicates: int = 0
    held_out: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def examples_added(self) -> int:
        """How many examples were new to the queue."""
        return len(self.example_ids)

    def record(self, examples: list, added) -> None:
        """What the queue did with the source's ``examples`` (its :class:`~idletune.queue.AddResult`)."""
        self.examples_generated = len(examples)
        self.example_ids = list(added.added)
        self.duplicates = added.duplicates
        self.held_out = added.held_out

    def skip(self, what: str, why: str) -> None:
        self.skipped.append((what, why))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["examples_added"] = self.examples_added
        d["skipped"] = [{"what": w, "why": y} for w, y in self.skipped]
        return d

    def summary(self) -> str:
        """One line for humans: what was added, what was already there, what was skipped."""
        parts = [f"{self.examples_added} example{'s' if self.examples_added != 1 else ''} added"]
        if self.held_out:
            parts.append(f"{self.held_out} of them held out to check that learning generalises")
        if self.duplicates:
            parts.append(f"{self.duplicates} already queued")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        detail = []
        if self.metadata.get("format"):
            detail.append(str(self.metadata["format"]))
        if self.metadata.get("pages_imported") is not None:
            detail.append(f"{self.metadata['pages_imported']} page(s)")
        if self.metadata.get("title"):
            detail.append(repr(self.metadata["title"]))
        return ", ".join(parts) + (f" ({', '.join(detail)})" if detail else "")
