"""Damaged SQLite files found at start: detected, moved aside, and salvaged — never silently lost.

The queue (``queue.db``) and the chat log (``chatlog.db``) are checked before they are opened
(``PRAGMA quick_check``; an existing file of 0 bytes counts as damaged: SQLite never leaves one
behind once it has written a table). A damaged file is renamed to ``NAME.corrupt-YYYYmmdd-HHMMSS``
(with its ``-wal``/``-shm``), the rows that can still be read are copied into a fresh file, and
the server starts on it; the problem, with both paths and the number of rows saved, is logged
and reported in ``GET /api/status`` under ``problems``. The renamed file is kept for the user.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

log = logging.getLogger("idletune")


def check_sqlite(path: str | Path) -> str | None:
    """Check one SQLite file; if damaged, move it aside and salvage it. Returns the problem, or None."""
    path = Path(path)
    if not path.exists():
        return None
    detail = _damage(path)
    if detail is None:
        return None
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            src.rename(str(aside) + suffix)
    saved, lost_tables = _salvage(aside, path)
    problem = (f"{path} was damaged ({detail}); it was moved to {aside} and a fresh one was started with the "
               f"{saved} row(s) that could still be read")
    if lost_tables:
        problem += f" (unreadable: {', '.join(lost_tables)})"
    log.error(problem)
    return problem


def _damage(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    try:
        con = sqlite3.connect(path, timeout=30)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return str(e)
    if rows == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows[:3])


def _salvage(src: Path, dest: Path) -> tuple[int, list[str]]:
    """Copy every readable row of every table of ``src`` into a new ``dest``: (rows, unreadable tables)."""
    old, tables = _open_tables(src)
    padded = None
    if old is None:
        padded = _padded_copy(src)  # a truncated file: zero pages where the lost ones were
        if padded is not None:
            old, tables = _open_tables(padded)
    if old is None:
        _remove(padded)
        return 0, ["all (the schema itself is unreadable)"]
    new = sqlite3.connect(dest, isolation_level=None)
    saved, lost = 0, []
    try:
        for name, sql in tables:
            try:
                new.execute(sql)
            except sqlite3.DatabaseError:
                lost.append(name)
                continue
            before = saved
            for order in ("ASC", "DESC"):  # forwards up to the damage, then backwards up to it
                try:
                    cur = old.execute(f'SELECT rowid, * FROM "{name}" ORDER BY rowid {order}')
                    new.execute("BEGIN")
                    for row in cur:
                        marks = ",".join("?" * (len(row) - 1))
                        saved += new.execute(f'INSERT OR IGNORE INTO "{name}" VALUES ({marks})', row[1:]).rowcount
                except sqlite3.DatabaseError:
                    pass
                finally:
                    if new.in_transaction:
                        new.execute("COMMIT")
            if saved == before:
                try:
                    old.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()
                except sqlite3.DatabaseError:
                    lost.append(name)
    finally:
        old.close()
        new.close()
        _remove(padded)
    return saved, lost


def _remove(path: Path | None) -> None:
    if path is not None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def _open_tables(path: Path):
    try:
        con = sqlite3.connect(path, timeout=30)
        tables = con.execute("SELECT name, sql FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
                             ).fetchall()
        return con, tables
    except sqlite3.DatabaseError:
        return None, []


def _padded_copy(path: Path) -> Path | None:
    """A copy of a truncated file extended with zeros to the size its header records, so that
    SQLite reads the pages that remain (the missing ones read as damaged and are skipped)."""
    raw = path.read_bytes()
    if len(raw) < 100 or not raw.startswith(b"SQLite format 3\x00"):
        return None
    page_size = int.from_bytes(raw[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(raw[28:32], "big")
    want = max(pages * page_size, -(-len(raw) // page_size) * page_size)
    if want <= len(raw):
        return None
    out = path.with_name(path.name + ".padded")
    out.write_bytes(raw + b"\x00" * (want - len(raw)))
    return out
