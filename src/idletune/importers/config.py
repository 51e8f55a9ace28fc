"""Settings of the importers: limits and safety defaults, validated when built."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable

MB = 1024 * 1024


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive number, got {value!r}")


@dataclass
class ChunkConfig:
    """How text is cut into training examples."""

    max_tokens: int = 512
    """Largest chunk, in tokens (of ``count_tokens`` or the heuristic)."""
    overlap_tokens: int = 64
    """Tokens of the previous chunk repeated at the start of the next one within a section."""

    def __post_init__(self) -> None:
        _positive(self, "max_tokens")
        if not isinstance(self.overlap_tokens, int) or not 0 <= self.overlap_tokens < self.max_tokens // 2 + 1:
            raise ValueError(f"ChunkConfig.overlap_tokens must be between 0 and max_tokens/2 "
                             f"({self.max_tokens // 2}), got {self.overlap_tokens!r}")


@dataclass
class WebImportConfig:
    """Fetching web pages: politeness, limits and SSRF protection."""

    user_agent: str = "idletune/0.1 (local training-data import)"
    """Sent with every request and matched against robots.txt groups (``idletune``)."""
    timeout_s: float = 15.0
    """Connect/read timeout of one request."""
    page_time_s: float = 30.0
    """Most time spent fetching one page, redirects and body included."""
    total_time_s: float = 300.0
    """Most time spent on one import (a crawl stops and keeps what it has)."""
    max_page_bytes: int = 5 * MB
    """Largest page body; larger pages are refused."""
    max_redirects: int = 5
    max_pages: int = 20
    """Default page limit of a crawl (``import_website(max_pages=...)`` overrides it)."""
    max_pages_limit: int = 500
    """Largest ``max_pages`` a caller may ask for."""
    max_depth: int = 3
    """Largest crawl ``depth`` a caller may ask for."""
    max_crawl_delay_s: float = 5.0
    """A robots.txt ``Crawl-delay`` is honoured up to this many seconds."""
    allow_private: bool = False
    """Allow loopback, private, link-local and other non-public addresses (off: SSRF protection)."""
    allow_hosts: list[str] = field(default_factory=list)
    """Host names, IP addresses or networks (``10.0.0.0/8``) allowed even if not public."""
    chunk: ChunkConfig = field(default_factory=ChunkConfig)

    def __post_init__(self) -> None:
        _positive(self, "timeout_s", "page_time_s", "total_time_s", "max_page_bytes", "max_pages",
                  "max_pages_limit")
        for name in ("max_redirects", "max_depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"WebImportConfig.{name} must be a non-negative integer, got {v!r}")
        if self.max_crawl_delay_s < 0:
            raise ValueError(f"WebImportConfig.max_crawl_delay_s must be >= 0, got {self.max_crawl_delay_s!r}")
        if isinstance(self.allow_hosts, str):
            raise ValueError("WebImportConfig.allow_hosts must be a list of hosts, not one string")
        for h in self.allow_hosts:
            if not isinstance(h, str) or not h.strip():
                raise ValueError(f"WebImportConfig.allow_hosts entries must be host names or networks, got {h!r}")
            if "/" in h:
                try:
                    ipaddress.ip_network(h, strict=False)
                except ValueError:
                    raise ValueError(f"WebImportConfig.allow_hosts: {h!r} is not a valid network") from None


@dataclass
class ImageImportConfig:
    """Reading images: limits, OCR and the optional captioner."""

    max_bytes: int = 25 * MB
    max_pixels: int = 40_000_000
    """Images with more pixels are refused (decompression-bomb protection)."""
    ocr_lang: str = "eng"
    """Tesseract language(s), e.g. ``"eng+deu"``."""
    ocr_timeout_s: float = 60.0
    min_ocr_confidence: float = 50.0
    """OCR text whose mean word confidence (0-100) is lower is treated as no text."""
    tesseract_cmd: str = "tesseract"
    """The tesseract program (a name on PATH or a path)."""
    caption_model_dir: str | None = None
    """A local image-to-text model directory (transformers); None: no captions."""
    chunk: ChunkConfig = field(default_factory=ChunkConfig)

    def __post_init__(self) -> None:
        _positive(self, "max_bytes", "max_pixels", "ocr_timeout_s")
        if not 0 <= self.min_ocr_confidence <= 100:
            raise ValueError(f"ImageImportConfig.min_ocr_confidence must be 0-100, got {self.min_ocr_confidence!r}")
        if not self.ocr_lang or not isinstance(self.ocr_lang, str):
            raise ValueError(f"ImageImportConfig.ocr_lang must be a tesseract language like 'eng', got {self.ocr_lang!r}")


@dataclass
class TextImportConfig:
    """Reading text, documents and chat datasets."""

    max_bytes: int = 64 * MB
    """Largest file or text accepted."""
    max_examples: int = 100_000
    """An import that would produce more examples is refused (split the file)."""
    max_pdf_pages: int = 2000
    max_unzipped_bytes: int = 200 * MB
    """DOCX files whose contents unpack to more are refused (zip-bomb protection)."""
    chunk: ChunkConfig = field(default_factory=ChunkConfig)

    def __post_init__(self) -> None:
        _positive(self, "max_bytes", "max_examples", "max_pdf_pages", "max_unzipped_bytes")


@dataclass
class ImportersConfig:
    """Everything the HTTP routes and the CLI need to build importers."""

    web: WebImportConfig = field(default_factory=WebImportConfig)
    image: ImageImportConfig = field(default_factory=ImageImportConfig)
    text: TextImportConfig = field(default_factory=TextImportConfig)
    max_upload_bytes: int = 64 * MB
    """Largest upload to ``POST /api/import/file`` (413 above)."""
    inline_max_bytes: int = 2 * MB
    """Uploads and texts up to this size are imported before the response (200 or 4xx);
    larger ones run as a job and the response is 202."""
    inline_wait_s: float = 20.0
    """How long a response waits for an inline import before answering 202 anyway."""
    count_tokens: Callable[[str], int] | None = None
    """Token counter for chunking (e.g. ``lambda s: len(tokenizer(s).input_ids)``); None: heuristic."""

    def __post_init__(self) -> None:
        _positive(self, "max_upload_bytes", "inline_wait_s")
        if not isinstance(self.inline_max_bytes, int) or self.inline_max_bytes < 0:
            raise ValueError(f"ImportersConfig.inline_max_bytes must be >= 0, got {self.inline_max_bytes!r}")
        if self.count_tokens is not None and not callable(self.count_tokens):
            raise ValueError("ImportersConfig.count_tokens must be a callable str -> int or None")

    @classmethod
    def for_server(cls, server, count_tokens: Callable[[str], int] | None = None) -> "ImportersConfig":
        """From a server's settings (``server.import_allow_hosts``, ``server.max_upload_bytes``):
        one mapping for the server and for ``idletune import``."""
        return cls(web=WebImportConfig(allow_hosts=list(server.import_allow_hosts)),
                   max_upload_bytes=server.max_upload_bytes, count_tokens=count_tokens)
