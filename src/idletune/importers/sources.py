"""Importers: the three importers built once over one queue and config, and the choice between
them for a file or an upload (images by content, everything else as text/documents)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import documents
from .config import ImportersConfig
from .image import Captioner, ImageImporter
from .results import ImportFailed, ImportResult
from .text import TextImporter
from .website import WebsiteImporter

Progress = Callable[[int, int], None]


class Importers:
    """``web``, ``image`` and ``text`` importers sharing one queue, config and token counter."""

    def __init__(self, queue, config: ImportersConfig | None = None, *, captioner: Captioner | None = None):
        self.config = config or ImportersConfig()
        count = self.config.count_tokens
        self.web = WebsiteImporter(queue, self.config.web, count_tokens=count)
        self.image = ImageImporter(queue, captioner, config=self.config.image, count_tokens=count)
        self.text = TextImporter(queue, self.config.text, count_tokens=count)

    def import_bytes(self, data: bytes, name: str, *, format: str | None = None,
                     progress: Progress | None = None) -> ImportResult:
        """An uploaded file: images go to OCR, everything else to the text/document importer."""
        if format in (None, "", "auto", "image") and documents.is_image(data, name):
            return self.image.import_image_bytes(data, name, progress=progress)
        if format == "image":
            raise ImportFailed(f"{name} is not an image", code="unsupported_format", source=name, param="format")
        return self.text.import_bytes(data, name, format=format, progress=progress)

    def import_path(self, path: str | Path, *, progress: Progress | None = None) -> ImportResult:
        """A local file, by its content."""
        p = Path(path).expanduser()
        if not p.exists():
            raise ImportFailed(f"{p}: no such file (URLs must start with http:// or https://)", code="not_found",
                               source=str(p))
        if p.is_dir():
            raise ImportFailed(f"{p} is a directory; give the files in it", code="invalid_request", source=str(p))
        limit = max(self.config.text.max_bytes, self.config.image.max_bytes)
        size = p.stat().st_size
        if size > limit:
            raise ImportFailed(f"{p.name} is {size / 1e6:.1f} MB, over the {limit / 1e6:.0f} MB limit",
                               code="too_large", source=p.name)
        return self.import_bytes(p.read_bytes(), p.name, progress=progress)
