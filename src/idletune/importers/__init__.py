"""Importers: websites, images, text, documents and chat datasets → training examples.

Each importer adds all the examples of one source to the queue in one transaction and returns
an :class:`ImportResult`; a source that cannot be imported at all raises :class:`ImportFailed`
(a ``ValueError``) and adds nothing. Heavy parsers are imported only when a source needs them.
See docs/IMPORTING.md.
"""
from .chunking import Chunk, chunk_text, estimate_tokens
from .cli import run_import
from .config import ChunkConfig, ImageImportConfig, ImportersConfig, TextImportConfig, WebImportConfig
from .image import Captioner, ImageImporter, TransformersCaptioner
from .jobs import ImportJobs
from .results import ImportFailed, ImportResult
from .sources import Importers
from .text import TextImporter
from .website import WebsiteImporter

__all__ = [
    "Captioner", "Chunk", "ChunkConfig", "ImageImportConfig", "ImageImporter", "ImportFailed", "ImportJobs",
    "ImportResult", "Importers", "ImportersConfig", "TextImportConfig", "TextImporter", "TransformersCaptioner",
    "WebImportConfig", "WebsiteImporter", "chunk_text", "estimate_tokens", "run_import",
]
