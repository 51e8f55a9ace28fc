"""TrainingQueue: the durable store of training examples (one SQLite file, WAL mode).

Every example accepted here survives a crash of the process: each write is its own committed
transaction with ``synchronous=FULL``. Dedup is by content hash (the same conversation resent
by a client is stored once); re-adding known content only ever raises its priority.

A small fraction of low-priority examples (imports) is held out: it never trains and measures
whether updates generalise. User corrections and chat pairs are never held out — a user who
teaches the model something expects it to be learned.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .examples import Priority, Status, TrainingExample

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash  TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    source        TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    status        TEXT NOT NULL,
    metadata      TEXT NOT NULL,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    times_trained INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    reason        TEXT
);
CREATE INDEX IF NOT EXISTS examples_pick ON examples (status, priority DESC, created_at);
"""


class QueueError(RuntimeError):
    """The queue could not be opened or written; the message says why."""


class QueueFullError(QueueError):
    pass


@dataclass
class AddResult:
    """What :meth:`TrainingQueue.add_many` did with each example."""

    added: list[int] = field(default_factory=list)
    duplicates: int = 0
    held_out: int = 0  # of ``added``: kept out of training, to measure whether learning generalises

    @property
    def count(self) -> int:
        return len(self.added)


class TrainingQueue:
    """Durable, prioritised, deduplicated training examples.

    Args:
        path: the SQLite file (created if missing).
        heldout_percent: share of low-priority examples kept out of training for evaluation.
        max_examples: refuse new examples (``QueueFullError``) once this many are stored.
    """

    def __init__(self, path: str | Path, *, heldout_percent: int = 10, max_examples: int = 1_000_000):
        if not 0 <= heldout_percent <= 50:
            raise ValueError(f"heldout_percent must be between 0 and 50, got {heldout_percent}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.heldout_percent = heldout_percent
        self.max_examples = max_examples
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            ok = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise QueueError(f"training queue {self.path} is corrupt: {ok}")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(examples)")}
            if "attempts" not in columns:  # a queue written by 0.1.0 before attempts were counted
                self._db.execute("ALTER TABLE examples ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
        except sqlite3.DatabaseError as e:
            raise QueueError(f"cannot open training queue {self.path}: {e}") from None

    # ---- writing -------------------------------------------------------------------------
    def add(self, example: TrainingExample) -> int | None:
        """Store one example. Returns its id, or None if the same content is already queued."""
        result = self.add_many([example])
        return result.added[0] if result.added else None

    def add_many(self, examples: Iterable[TrainingExample]) -> AddResult:
        """Store examples in one transaction: all of them are stored, or none."""
        examples = list(examples)
        result = AddResult()
        now = time.time()
        # At most heldout_percent of what one call brings is held out: an import of a few chunks
        # keeps them all for training (its only chunk, held out, would never be learned).
        may_hold = sum(ex.priority == Priority.LOW for ex in examples) * self.heldout_percent // 100
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                total = self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
                for ex in examples:
                    h = ex.content_hash
                    row = self._db.execute("SELECT id, priority FROM examples WHERE content_hash=?", (h,)).fetchone()
                    if row is not None:
                        result.duplicates += 1
                        if int(ex.priority) > row[1]:  # a chat pair later confirmed as a correction
                            self._db.execute("UPDATE examples SET priority=?, source=?, updated_at=? WHERE id=?",
                                             (int(ex.priority), ex.source, now, row[0]))
                        continue
                    if total >= self.max_examples:
                        raise QueueFullError(
                            f"the training queue is full ({self.max_examples} examples, queue.max_examples); "
                            "nothing new is accepted until that limit is raised or trained examples are removed")
                    status = Status.PENDING
                    if result.held_out < may_hold and self._holds_out(ex, h):
                        status = Status.HELD_OUT
                        result.held_out += 1
                    payload = json.dumps(ex.messages if ex.kind == "chat" else ex.text, ensure_ascii=False)
                    cur = self._db.execute(
                        "INSERT INTO examples (content_hash, kind, payload, source, priority, status, metadata,"
                        " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                        (h, ex.kind, payload, ex.source, int(ex.priority), status,
                         json.dumps(ex.metadata, ensure_ascii=False, default=str), ex.created_at, now))
                    ex.id, ex.status = cur.lastrowid, status
                    result.added.append(cur.lastrowid)
                    total += 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return result

    def _holds_out(self, ex: TrainingExample, content_hash: str) -> bool:
        if ex.priority != Priority.LOW or self.heldout_percent == 0:
            return False
        return int(content_hash[:8], 16) % 100 < self.heldout_percent

    def set_status(self, ids: Iterable[int], status: str, reason: str | None = None, *,
                   only_from: Iterable[str] | None = None) -> None:
        """``only_from``: change only the examples in one of these statuses (the others keep theirs)."""
        ids = list(ids)
        if not ids:
            return
        trained = 1 if status == Status.TRAINED else 0
        where, extra = "id=?", ()
        if only_from is not None:
            only_from = tuple(only_from)
            where, extra = f"id=? AND status IN ({','.join('?' * len(only_from))})", only_from
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                f"UPDATE examples SET status=?, reason=?, updated_at=?, times_trained=times_trained+? WHERE {where}",
                [(status, reason, time.time(), trained, i, *extra) for i in ids])
            self._db.execute("COMMIT")

    def record_attempt(self, ids: Iterable[int]) -> dict[int, int]:
        """Count a training round an example took part in; returns each id's attempts so far."""
        ids = list(ids)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE examples SET attempts=attempts+1 WHERE id=?", [(i,) for i in ids])
            rows = self._db.execute(f"SELECT id, attempts FROM examples WHERE id IN ({','.join('?' * len(ids))})",
                                    ids).fetchall() if ids else []
            self._db.execute("COMMIT")
        return dict(rows)

    def requeue(self, ids: Iterable[int]) -> None:
        """Pending again, with no attempts counted (a correction the user sent again)."""
        ids = list(ids)
        if not ids:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE examples SET status=?, reason=NULL, attempts=0, updated_at=? WHERE id=?",
                                 [(Status.PENDING, time.time(), i) for i in ids])
            self._db.execute("COMMIT")

    def mark_trained(self, ids: Iterable[int]) -> None:
        """A round's examples, done: those still pending (one withdrawn meanwhile stays withdrawn)."""
        self.set_status(ids, Status.TRAINED, only_from=(Status.PENDING,))

    def mark_rejected(self, ids: Iterable[int], reason: str, *, only_from: Iterable[str] = (Status.PENDING,)) -> None:
        """Never to train (again): by default only examples still pending (a round's, whose
        examples may have been withdrawn meanwhile, keep the reason they were withdrawn for)."""
        self.set_status(ids, Status.REJECTED, reason, only_from=only_from)

    def withdrawn_among(self, ids: Iterable[int]) -> list[int]:
        """Those of ``ids`` that are rejected: of a round's examples (all pending when it took
        them), those the user withdrew while it trained (a correction, a thumbs-down)."""
        ids = list(ids)
        if not ids:
            return []
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM examples WHERE id IN ({','.join('?' * len(ids))}) AND status=?",
                                    (*ids, Status.REJECTED)).fetchall()
        return [r[0] for r in rows]

    # ---- reading -------------------------------------------------------------------------
    def _rows(self, sql: str, args: tuple = ()) -> list[TrainingExample]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, payload, source, priority, status, metadata, created_at, times_trained, reason "
                "FROM examples " + sql, args).fetchall()
        out = []
        for (i, kind, payload, source, prio, status, meta, created, times, reason) in rows:
            data = json.loads(payload)
            out.append(TrainingExample(
                kind=kind, messages=data if kind == "chat" else None, text=data if kind == "text" else None,
                source=source, priority=Priority(prio), metadata=json.loads(meta), id=i, status=status,
                created_at=created, times_trained=times, reason=reason))
        return out

    def pending(self, limit: int = 64, *, priority: Priority | None = None) -> list[TrainingExample]:
        """Examples waiting to train, highest priority first, oldest first within a priority."""
        if priority is None:
            return self._rows("WHERE status=? ORDER BY priority DESC, created_at, id LIMIT ?",
                              (Status.PENDING, limit))
        return self._rows("WHERE status=? AND priority=? ORDER BY created_at, id LIMIT ?",
                          (Status.PENDING, int(priority), limit))

    def sample(self, status: str, limit: int) -> list[TrainingExample]:
        """A random sample of examples in a status (replay of trained examples, held-out sets)."""
        return self._rows("WHERE status=? ORDER BY RANDOM() LIMIT ?", (status, limit))

    def get(self, example_id: int) -> TrainingExample | None:
        rows = self._rows("WHERE id=?", (example_id,))
        return rows[0] if rows else None

    def find(self, content_hash: str) -> TrainingExample | None:
        rows = self._rows("WHERE content_hash=?", (content_hash,))
        return rows[0] if rows else None

    def from_source(self, source: str, limit: int = 100_000) -> list[TrainingExample]:
        """Examples of one source (any status), oldest first."""
        return self._rows("WHERE source=? ORDER BY id LIMIT ?", (source, limit))

    def recent(self, limit: int = 50) -> list[TrainingExample]:
        return self._rows("ORDER BY id DESC LIMIT ?", (limit,))

    def pending_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM examples WHERE status=?", (Status.PENDING,)).fetchone()[0]

    def size(self) -> int:
        """All stored examples, whatever their status."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM examples").fetchone()[0]

    def __len__(self) -> int:
        return self.size()

    def get_stats(self) -> dict:
        """Counts: total, and by priority, by source and by status."""
        with self._lock:
            def group(col: str) -> dict:
                return dict(self._db.execute(f"SELECT {col}, COUNT(*) FROM examples GROUP BY {col}").fetchall())
            by_priority = {Priority(k).name.lower(): v for k, v in group("priority").items()}
            pending_by_priority = dict(self._db.execute(
                "SELECT priority, COUNT(*) FROM examples WHERE status=? GROUP BY priority", (Status.PENDING,)).fetchall())
            stats = {
                "total": self.size(),
                "pending": self.pending_count(),
                "by_priority": {p.name.lower(): by_priority.get(p.name.lower(), 0) for p in Priority},
                "pending_by_priority": {p.name.lower(): pending_by_priority.get(int(p), 0) for p in Priority},
                "by_source": group("source"),
                "by_status": {s: 0 for s in (Status.PENDING, Status.TRAINED, Status.HELD_OUT, Status.REJECTED)}
                | group("status"),
            }
        return stats

    def close(self) -> None:
        with self._lock:
            self._db.close()
