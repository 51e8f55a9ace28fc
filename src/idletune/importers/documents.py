"""Turn bytes into clean text: format detection, decoding and the converters per format.

Heavy parsers (trafilatura/lxml, pypdf, python-docx) are imported only when their format is met.
Every failure is an :class:`ImportFailed` naming the file and what is wrong with it.
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePath

from .results import ImportFailed

TEXT_FORMATS = ("text", "markdown", "html", "json", "jsonl", "csv", "tsv")
BINARY_FORMATS = ("pdf", "docx")
FORMATS = TEXT_FORMATS + BINARY_FORMATS
_FORMAT_ALIASES = {"txt": "text", "plain": "text", "md": "markdown", "htm": "html", "xhtml": "html",
                   "ndjson": "jsonl"}
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
               ".html": "html", ".htm": "html", ".xhtml": "html", ".json": "json", ".jsonl": "jsonl",
               ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".pdf": "pdf", ".docx": "docx"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_OTHER_MAGIC = {  # formats we recognise only to refuse them clearly
    b"\xd0\xcf\x11\xe0": "an old binary Office file (.doc/.xls); save it as .docx or PDF",
    b"\x1f\x8b": "a gzip archive; unpack it first",
    b"7z\xbc\xaf": "a 7-Zip archive; unpack it first",
    b"Rar!": "a RAR archive; unpack it first",
    b"\x7fELF": "a program (ELF executable), not a document",
    b"MZ": "a Windows program, not a document",
    b"%!PS": "a PostScript file; convert it to PDF",
}


def normalize_format(fmt: str | None) -> str | None:
    """``None``/``"auto"`` → None; aliases (``md``, ``txt``...) → canonical; unknown → ImportFailed."""
    if fmt is None or fmt == "" or fmt == "auto":
        return None
    f = str(fmt).lower().lstrip(".")
    f = _FORMAT_ALIASES.get(f, f)
    if f not in FORMATS:
        raise ImportFailed(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or leave it out to detect it",
                           code="unsupported_format", param="format")
    return f


def is_image(data: bytes, name: str | None = None) -> bool:
    """True if the bytes look like an image (by magic number) or, failing that, by extension."""
    if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return True
    return bool(name) and PurePath(name).suffix.lower() in IMAGE_EXTENSIONS


def sniff_binary(data: bytes, name: str) -> str | None:
    """"pdf"/"docx" from magic numbers, None for text; ImportFailed for formats we do not read."""
    if data.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = set(z.namelist())
        except zipfile.BadZipFile as e:
            raise ImportFailed(f"{name} is a corrupt or truncated ZIP/DOCX file ({e})", code="corrupt_file",
                               source=name) from None
        if "word/document.xml" in names:
            return "docx"
        if any(n.startswith("xl/") for n in names) or any(n.startswith("ppt/") for n in names):
            raise ImportFailed(f"{name} is an Excel or PowerPoint file; only Word (.docx) documents are read",
                               code="unsupported_format", source=name)
        raise ImportFailed(f"{name} is a ZIP archive, not a DOCX document; unpack it and import the files",
                           code="unsupported_format", source=name)
    if is_image(data):
        raise ImportFailed(f"{name} is an image; import it as an image (OCR) instead", code="unsupported_format",
                           source=name)
    for magic, what in _OTHER_MAGIC.items():
        if data.startswith(magic):
            raise ImportFailed(f"{name} is {what}", code="unsupported_format", source=name)
    return None


def decode_text(data: bytes, name: str) -> str:
    """Decode UTF-8 (or UTF-16 with a byte-order mark); anything else is a clear error."""
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise ImportFailed(f"{name} starts with a UTF-16 byte-order mark but is not valid UTF-16 "
                               f"(byte {e.start}): the file may be truncated", code="invalid_encoding",
                               source=name) from None
    if b"\x00" in data[:8192]:
        raise ImportFailed(f"{name} is a binary file, not text (it contains NUL bytes)", code="unsupported_format",
                           source=name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        truncated = e.reason == "unexpected end of data" and e.end >= len(data)
        hint = ("the file ends in the middle of a character (truncated?)" if truncated
                else "save it as UTF-8 and import it again")
        raise ImportFailed(f"{name} is not valid UTF-8: byte {e.start} (line {line}) is "
                           f"{data[e.start:e.start + 1]!r}; {hint}", code="invalid_encoding", source=name) from None


def sniff_text_format(text: str, name: str, ext_format: str | None) -> str:
    """The text format from the extension when it names one, else from the content."""
    if ext_format in ("markdown", "html", "json", "jsonl", "csv", "tsv"):
        return ext_format
    head = text.lstrip()[:1000].lower()
    if head.startswith(("<!doctype html", "<html")) or (head.startswith("<") and "<body" in text[:20000].lower()):
        return "html"
    if head[:1] in ("{", "["):
        import json
        try:
            json.loads(text)
            return "json"
        except ValueError:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            try:
                json.loads(lines[0])
                return "jsonl"
            except (ValueError, IndexError):
                pass
    if re.search(r"(?m)^#{1,6} \S", text) or re.search(r"(?m)^(```|~~~)", text) or re.search(r"(?m)^.+\n(=+|-+)\s*$", text):
        return "markdown"
    return "text"


# ---- cleaning -----------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")


def clean_plain(text: str) -> str:
    """Normalise newlines, drop control characters and trailing spaces, collapse blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def clean_markdown(text: str) -> tuple[str, str | None]:
    """Markdown → clean Markdown and its title. Link targets, images, comments, front matter go."""
    text = clean_plain(text)
    title = None
    fm = re.match(r"^---\n(.*?)\n(---|\.\.\.)\n", text, re.S)
    if fm:
        m = re.search(r"(?m)^title:\s*[\"']?(.*?)[\"']?\s*$", fm.group(1))
        title = m.group(1) if m else None
        text = text[fm.end():]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)  # images → alt text
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # links → their text
    text = re.sub(r"(?m)^\s{0,3}\[[^\]]+\]:\s+\S+.*$", "", text)  # reference definitions
    # Setext headings → ATX, so the chunker sees them.
    text = re.sub(r"(?m)^(\S[^\n]*)\n=+\s*$", r"# \1", text)
    text = re.sub(r"(?m)^(\S[^\n]*)\n-{3,}\s*$", r"## \1", text)
    if title is None:
        m = re.search(r"(?m)^#\s+(.+?)\s*#*$", text)
        title = m.group(1) if m else None
    return clean_plain(text), title


# ---- HTML ---------------------------------------------------------------------------------------
_DROP_TAGS = ("script", "style", "noscript", "nav", "header", "footer", "aside", "form", "template", "svg",
              "iframe", "button", "select")
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "li", "tr", "pre", "blockquote", "dd", "dt",
               "table", "ul", "ol", "br", "hr"}


def html_title(html: str | bytes) -> str | None:
    import trafilatura

    meta = trafilatura.extract_metadata(html)
    if meta is not None and meta.title:
        return meta.title.strip()
    m = re.search(rb"<title[^>]*>(.*?)</title>" if isinstance(html, bytes) else r"<title[^>]*>(.*?)</title>",
                  html, re.S | re.I)
    if not m:
        return None
    t = m.group(1)
    return (t.decode("utf-8", "replace") if isinstance(t, bytes) else t).strip() or None


def html_to_text(html: str | bytes, url: str | None = None) -> str:
    """Main text of an HTML page as Markdown (headings kept), navigation and boilerplate dropped.

    trafilatura finds the main content; when it finds little (under 250 characters, where it
    falls back to any text including menus), a plain walk over the document without
    nav/header/footer/aside/script/style/form elements is used instead.
    """
    import trafilatura

    text = trafilatura.extract(html, url=url, output_format="markdown", include_comments=False,
                               include_tables=True, include_images=False, include_links=False)
    if text and len(text.strip()) >= 250:
        return clean_markdown(text)[0]
    # Short results are where trafilatura falls back to whatever text there is, menus included;
    # a walk that drops the page furniture is more faithful there.
    return _html_fallback(html)


def _html_fallback(html: str | bytes) -> str:
    import lxml.html
    from lxml import etree

    try:
        doc = lxml.html.fromstring(html)
    except (etree.ParserError, ValueError):
        return ""
    for bad in doc.xpath("|".join(f"//{t}" for t in _DROP_TAGS)):
        bad.drop_tree()
    parts: list[str] = []

    def walk(el) -> None:
        tag = el.tag if isinstance(el.tag, str) else ""
        if re.fullmatch(r"h[1-6]", tag):
            parts.append("\n\n" + "#" * int(tag[1]) + " " + " ".join(el.text_content().split()) + "\n\n")
        else:
            if tag in _BLOCK_TAGS:
                parts.append("\n\n")
            if el.text and tag not in ("html", "head"):
                parts.append(el.text)
            for child in el:
                walk(child)
            if tag in _BLOCK_TAGS:
                parts.append("\n\n")
        if el.tail:
            parts.append(el.tail)

    body = doc.find("body") if doc.tag == "html" else doc
    walk(body if body is not None else doc)
    text = "".join(parts)
    text = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))
    return clean_plain(text)


# ---- PDF and DOCX -------------------------------------------------------------------------------
@dataclass
class Pages:
    """Text of a paged document, one entry per page (empty where a page has no text layer)."""

    pages: list[str]
    title: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def pdf_pages(data: bytes, name: str, *, max_pages: int, progress=None) -> Pages:
    """The text layer of each page. Scanned pages (no text) are reported as skipped."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError, PyPdfError

    if b"%%EOF" not in data[-2048:]:
        raise ImportFailed(f"{name} is a truncated PDF (it does not end with the %%EOF marker); nothing was "
                           "imported", code="corrupt_file", source=name)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception:  # pypdf raises DependencyError etc. for unsupported ciphers
                ok = 0
            if not ok:
                raise ImportFailed(f"{name} is an encrypted PDF; remove the password and import it again",
                                   code="unsupported_format", source=name)
        n = len(reader.pages)
    except (PdfReadError, PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise ImportFailed(f"{name} is a corrupt or truncated PDF: {e}", code="corrupt_file", source=name) from None
    if n == 0:
        raise ImportFailed(f"{name} is a PDF without pages", code="empty", source=name)
    if n > max_pages:
        raise ImportFailed(f"{name} has {n} pages; the limit is {max_pages} (split the PDF)", code="too_large",
                           source=name)
    out = Pages([], None)
    try:
        meta = reader.metadata
        out.title = (meta.title or None) if meta else None
    except Exception:
        out.title = None
    for i, page in enumerate(reader.pages):
        try:
            text = page.extract_text() or ""
        except Exception as e:  # a broken content stream on one page does not sink the document
            text = ""
            out.skipped.append((f"page {i + 1}", f"could not read its text ({type(e).__name__}: {e})"))
        else:
            if not text.strip():
                out.skipped.append((f"page {i + 1}", "no text layer (a scanned page? import it as an image for OCR)"))
        out.pages.append(clean_plain(text))
        if progress:
            progress(i + 1, n)
    return out


def docx_text(data: bytes, name: str, *, max_unzipped_bytes: int) -> tuple[str, str | None]:
    """A DOCX document as Markdown: ``Heading N`` styles become ``#`` headings, tables rows of cells."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            unzipped = sum(i.file_size for i in z.infolist())
    except zipfile.BadZipFile as e:
        raise ImportFailed(f"{name} is a corrupt or truncated DOCX file ({e})", code="corrupt_file",
                           source=name) from None
    if unzipped > max_unzipped_bytes:
        raise ImportFailed(f"{name} unpacks to {unzipped // 1_000_000} MB, over the "
                           f"{max_unzipped_bytes // 1_000_000} MB limit (zip bomb?)", code="too_large", source=name)
    import docx
    from docx.opc.exceptions import OpcError

    try:
        doc = docx.Document(io.BytesIO(data))
    except (OpcError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ImportFailed(f"{name} is not a readable DOCX document: {e}", code="corrupt_file", source=name) from None
    except Exception as e:  # lxml errors on damaged XML parts
        raise ImportFailed(f"{name} is a damaged DOCX document ({type(e).__name__}: {e})", code="corrupt_file",
                           source=name) from None
    title = (doc.core_properties.title or "").strip() or None
    parts: list[str] = []
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    for block in doc.iter_inner_content():
        if isinstance(block, Paragraph):
            text = block.text.strip()
            if not text:
                continue
            style = (block.style.name if block.style is not None else "") or ""
            m = re.match(r"Heading (\d)", style)
            if style == "Title":
                title = title or text
                parts.append(f"# {text}")
            elif m:
                parts.append("#" * min(int(m.group(1)) + (1 if title else 0), 6) + " " + text)
            else:
                parts.append(text)
        elif isinstance(block, Table):
            rows = [" | ".join(c.text.strip() for c in row.cells) for row in block.rows]
            parts.append("\n".join(r for r in rows if r.strip(" |")))
    return clean_plain("\n\n".join(parts)), title
