"""``idletune import URL_OR_PATH...``: import each source with a progress bar and a summary line."""
from __future__ import annotations

import dataclasses
import re
import sys
from typing import TextIO

from .config import ImportersConfig
from .results import ImportFailed


class _Bar:
    """A one-line text progress bar, drawn only on a terminal."""

    def __init__(self, out: TextIO, label: str, width: int = 28):
        self.out, self.width = out, width
        self.label = label if len(label) <= 40 else "…" + label[-39:]
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.drawn = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.tty:
            return
        frac = min(done / total, 1.0) if total > 0 else 0.0
        filled = int(frac * self.width)
        line = f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}"
        self.out.write(line.ljust(self.drawn))
        self.out.flush()
        self.drawn = len(line)

    def clear(self) -> None:
        if self.drawn:
            self.out.write("\r" + " " * self.drawn + "\r")
            self.drawn = 0


def run_import(sources: list[str], queue, *, depth: int = 0, max_pages: int = 20, allow_private: bool = False,
               out: TextIO = sys.stdout, config: ImportersConfig | None = None) -> int:
    """Import URLs (``http(s)://...``), files and ``-`` (text from stdin) into ``queue``.

    Prints one line per source: ``imported SOURCE: N examples added ...`` or ``failed SOURCE: why``.
    Returns the exit code: 0 if every source was imported, 1 if any failed, 2 if none were given.
    """
    from ..queue import QueueError
    from .sources import Importers

    if not sources:
        print("nothing to import: give one or more URLs or file paths", file=out)
        return 2
    config = config or ImportersConfig()
    if allow_private and not config.web.allow_private:
        config = dataclasses.replace(config, web=dataclasses.replace(config.web, allow_private=True))
    importers = Importers(queue, config)
    failed = 0
    for source in sources:
        bar = _Bar(out, source)
        try:
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", source):  # a URL (other than http(s): refused, saying so)
                result = importers.web.import_website(source, depth=depth, max_pages=max_pages, progress=bar)
            elif source == "-":
                result = importers.text.import_text(sys.stdin.read(), name="stdin", progress=bar)
            else:
                result = importers.import_path(source, progress=bar)
        except (ImportFailed, QueueError, OSError) as e:
            bar.clear()
            print(f"failed   {source}: {e}", file=out)
            failed += 1
            continue
        bar.clear()
        print(f"imported {source}: {result.summary()}", file=out)
    return 1 if failed else 0
