"""DataCollector: turns chat traffic and feedback into training examples.

- Every exchange (context → the model's answer) becomes a chat pair; clients resend the whole
  history every turn, and dedup in the queue keeps one copy of each pair.
- An assistant turn in a resent history that differs from what the model generated for that
  context is a user correction: queued with high priority. A corrected context is remembered:
  the model's answers to it are not queued from then on (asked again before it has learned the
  correction, its answer is the wrong one again, and would train against the correction).
- Explicit feedback: a correction (messages + the right answer) is a high-priority example;
  thumbs-up raises a pair to high priority, thumbs-down withdraws it from training.
- Content processing: user messages that state something (not questions or requests) are
  queued as text, so what the user tells the model is learned as knowledge.
- Web scraping: links in user messages are imported in the background (WebsiteImporter).
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .examples import Priority, Source, Status, TrainingExample
from .queue import TrainingQueue

_URL = re.compile(r"https?://[^\s<>()\"']+")
_REQUEST_START = re.compile(
    r"^(please|can|could|would|will|write|give|tell|explain|list|translate|summari[sz]e|make|create|show|help|"
    r"what|who|whom|whose|when|where|why|how|which|is|are|do|does|did|should|generate|describe|hi|hello|hey|thanks|"
    r"name|find|compute|calculate|check|draft|suggest|recommend|compare|define|solve|plan|fix|rewrite|convert|"
    r"build|design|answer|continue|imagine|pretend|act|let's|lets|say|ask|count|sort|correct|edit|improve|"
    r"summarise|outline|tell)\b",
    re.IGNORECASE)


def context_key(messages: list[dict]) -> str:
    """Identity of a conversation prefix (the context an answer was generated for)."""
    key = json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def conversation_id(messages: list[dict]) -> str:
    """Stable across turns: derived from the conversation's opening messages."""
    head = [m for m in messages if m["role"] != "assistant"][:2]
    return "conv-" + context_key(head)[:16]


# Rewordings around the user's last question: the corrected answer should not depend on the
# exact words the question came in (a cheap paraphrase augmentation; measured in BENCHMARKS.md).
_AUGMENT = ("Please answer this: {q}", "{q} Answer in one sentence.")
# what a correction or a thumbs-down withdraws: not yet trained, or trained (and replayed since)
_WITHDRAWABLE = (Status.PENDING, Status.TRAINED)


def correction_examples(context: list[dict], answer: str, conv: str, **metadata) -> list[TrainingExample]:
    """A correction as high-priority chat pairs: the context as given, plus rewordings of the
    last user message around the same answer."""
    target = {"role": "assistant", "content": answer}
    out = [TrainingExample.chat(context + [target], source=Source.CORRECTION, priority=Priority.HIGH,
                                conversation_id=conv, **metadata)]
    last = context[-1] if context else None
    if last is not None and last["role"] == "user":
        for template in _AUGMENT:
            reworded = context[:-1] + [{"role": "user", "content": template.format(q=last["content"].strip())}]
            out.append(TrainingExample.chat(reworded + [target], source=Source.CORRECTION, priority=Priority.HIGH,
                                            conversation_id=conv, augmented=True, **metadata))
    return out


class ChatLog:
    """Every message and every generated answer, in its own SQLite file (WAL)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, conversation_id TEXT, role TEXT,
                content TEXT, metadata TEXT, created_at REAL);
            CREATE TABLE IF NOT EXISTS generations (id TEXT PRIMARY KEY, context_key TEXT, conversation_id TEXT,
                response TEXT, version INTEGER, rating INTEGER, created_at REAL);
            CREATE INDEX IF NOT EXISTS generations_ctx ON generations (context_key);
            CREATE TABLE IF NOT EXISTS corrected (context_key TEXT PRIMARY KEY, answer TEXT, created_at REAL);
            CREATE TABLE IF NOT EXISTS held_back (generation_id TEXT PRIMARY KEY, messages TEXT, created_at REAL);
        """)

    def add_message(self, conv: str, role: str, content: str, metadata: dict | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT INTO messages (conversation_id, role, content, metadata, created_at) VALUES (?,?,?,?,?)",
                             (conv, role, content, json.dumps(metadata or {}), time.time()))

    def add_generation(self, gen_id: str, context: list[dict], conv: str, response: str, version: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO generations VALUES (?,?,?,?,?,NULL,?)",
                             (gen_id, context_key(context), conv, response, version, time.time()))

    def generated_for(self, context: list[dict]) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT response FROM generations WHERE context_key=?", (context_key(context),)).fetchall()
        return [r[0] for r in rows]

    def add_corrected(self, context: list[dict], answer: str) -> None:
        """The user gave ``answer`` as the right one for ``context`` (the latest correction wins)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO corrected VALUES (?,?,?)", (context_key(context), answer, time.time()))

    def has_corrections(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM corrected LIMIT 1").fetchone() is not None

    def corrected(self, context: list[dict]) -> str | None:
        """The user's correction for this context, if there is one."""
        with self._lock:
            row = self._db.execute("SELECT answer FROM corrected WHERE context_key=?", (context_key(context),)).fetchone()
        return row[0] if row else None

    def hold_back(self, gen_id: str, messages: list[dict]) -> None:
        """An answer not queued (its question was corrected), kept in case the user rates it up."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO held_back VALUES (?,?,?)",
                             (gen_id, json.dumps(messages, ensure_ascii=False), time.time()))

    def held_back(self, gen_id: str) -> list[dict] | None:
        with self._lock:
            row = self._db.execute("SELECT messages FROM held_back WHERE generation_id=?", (gen_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def generation(self, gen_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT id, context_key, conversation_id, response, version FROM generations WHERE id=?",
                                   (gen_id,)).fetchone()
        return dict(zip(("id", "context_key", "conversation_id", "response", "version"), row)) if row else None

    def rate(self, gen_id: str, rating: int) -> None:
        with self._lock:
            self._db.execute("UPDATE generations SET rating=? WHERE id=?", (rating, gen_id))

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class CollectResult:
    queued: int = 0
    duplicates: int = 0
    corrections: int = 0
    superseded: bool = False  # the answer was not queued: the user corrected this context before
    imports_started: list[str] = field(default_factory=list)


class DataCollector:
    """Collects training data from conversations.

    Args:
        queue: where examples go.
        enable_chat_logging: keep every message in the chat log (``chatlog.db``).
        enable_web_scraping: import pages linked in user messages (needs ``import_url``).
        enable_content_processing: queue user statements as text to learn.
        auto_collect: turn exchanges into chat pairs and detect corrections automatically.
        chat_log: the ChatLog (default: ``chatlog.db`` next to the queue file).
        import_url: called with a URL to import it in the background (the server passes its
            import job runner); without it, web scraping has nothing to do and says so in stats.
    """

    def __init__(self, queue: TrainingQueue, *, enable_chat_logging: bool = True, enable_web_scraping: bool = True,
                 enable_content_processing: bool = True, auto_collect: bool = True,
                 chat_log: ChatLog | None = None, import_url: Callable[[str], str] | None = None):
        self.queue = queue
        self.enable_chat_logging = enable_chat_logging
        self.enable_web_scraping = enable_web_scraping
        self.enable_content_processing = enable_content_processing
        self.auto_collect = auto_collect
        self.chat_log = chat_log or ChatLog(Path(queue.path).with_name("chatlog.db"))
        self.import_url = import_url
        self._seen_urls: set[str] = set()
        self._lock = threading.Lock()  # a correction's withdrawal, queueing and record, against queueing answers
        if not self.chat_log.has_corrections():  # a data directory from before corrections were remembered
            self._remember(self.queue.from_source(Source.CORRECTION))
        self.stats = {"exchanges": 0, "corrections": 0, "feedback": 0, "statements": 0, "urls_imported": 0,
                      "answers_superseded": 0}

    # ---- logging --------------------------------------------------------------------------------
    def log_message(self, conversation_id: str, role: str, content: str, **metadata) -> None:
        """Record one message in the chat log (nothing is queued by this alone)."""
        if self.enable_chat_logging:
            self.chat_log.add_message(conversation_id, role, content, metadata)

    def log_exchange(self, messages: list[dict], response: str, *, generation_id: str, version: int) -> CollectResult:
        """Record a request's history and the model's answer; queue what there is to learn."""
        conv = conversation_id(messages)
        if self.enable_chat_logging:
            self.log_message(conv, messages[-1]["role"], messages[-1]["content"])
            self.log_message(conv, "assistant", response, generation_id=generation_id, version=version)
        self.chat_log.add_generation(generation_id, messages, conv, response, version)
        self.stats["exchanges"] += 1
        res = CollectResult()
        examples: list[TrainingExample] = []
        answer = None
        if self.auto_collect:
            examples += self._corrections_in(messages, conv)
            res.corrections = sum(1 for e in examples if not e.metadata.get("augmented"))
            if response.strip() and any(m["role"] == "user" for m in messages):  # a system-only prompt teaches nothing
                answer = TrainingExample.chat(messages + [{"role": "assistant", "content": response}],
                                              source=Source.CHAT, priority=Priority.NORMAL, conversation_id=conv,
                                              generation_id=generation_id, version=version)
        if self.enable_content_processing:
            examples += self._statements_in(messages, conv)
        with self._lock:  # a correction of this context cannot come between the check and the queueing
            if answer is not None:
                res.superseded = self.chat_log.corrected(messages) is not None
                if res.superseded:
                    self.stats["answers_superseded"] += 1
                    self.chat_log.hold_back(generation_id, answer.messages)  # a thumbs-up would queue it
                else:
                    examples.append(answer)
            if examples:
                added = self.queue.add_many(examples)
                res.queued, res.duplicates = added.count, added.duplicates
            self._remember(examples)  # corrections found in the history, once queued
        if self.enable_web_scraping and self.import_url is not None:
            res.imports_started = self._import_links(messages[-1])
        return res

    def _remember(self, examples: list[TrainingExample]) -> None:
        """Record the corrected contexts among ``examples`` (the user's own, not their rewordings)."""
        for ex in examples:
            if ex.kind == "chat" and ex.source == Source.CORRECTION and not ex.metadata.get("augmented"):
                self.chat_log.add_corrected(ex.messages[:-1], ex.messages[-1]["content"])

    def _corrections_in(self, messages: list[dict], conv: str) -> list[TrainingExample]:
        out = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i == 0:
                continue
            context = messages[:i]
            generated = self.chat_log.generated_for(context)
            if generated and m["content"].strip() not in {g.strip() for g in generated}:
                if not any(c["role"] == "user" for c in context):
                    continue
                if self.chat_log.corrected(context) == m["content"]:
                    continue  # known: later turns resend the corrected answer in their history
                out += correction_examples(context, m["content"], conv, replaces=generated[-1][:200])
                self._withdraw(context, generated)
        self.stats["corrections"] += sum(1 for e in out if not e.metadata.get("augmented"))
        return out

    def _withdraw(self, context: list[dict], answers: list[str]) -> None:
        """The user corrected these answers: never train on them (they would fight the
        correction) — pending ones, and trained ones, which would otherwise be replayed."""
        ids = []
        for answer in answers:
            if not answer.strip():
                continue
            found = self.queue.find(TrainingExample.chat(context + [{"role": "assistant", "content": answer}]).content_hash)
            if found is not None and found.status in _WITHDRAWABLE:
                ids.append(found.id)
        self.queue.mark_rejected(ids, "corrected by the user", only_from=_WITHDRAWABLE)

    def _statements_in(self, messages: list[dict], conv: str) -> list[TrainingExample]:
        last = messages[-1]
        if last["role"] != "user":
            return []
        text = last["content"].strip()
        if len(text.split()) < 6 or text.endswith("?") or _REQUEST_START.match(text):
            return []
        self.stats["statements"] += 1
        return [TrainingExample.from_text(text, source=Source.STATEMENT, priority=Priority.NORMAL, conversation_id=conv)]

    def _import_links(self, message: dict) -> list[str]:
        if message["role"] != "user":
            return []
        started = []
        for url in _URL.findall(message["content"]):
            url = url.rstrip(".,;:!?")
            if url in self._seen_urls:
                continue
            self._seen_urls.add(url)
            try:
                started.append(self.import_url(url))
                self.stats["urls_imported"] += 1
            except Exception as e:  # a refused URL must not break the chat; it is logged in stats
                self.stats.setdefault("url_errors", []).append(f"{url}: {e}")
        return started

    # ---- feedback -------------------------------------------------------------------------------
    def add_correction(self, messages: list[dict], correction: str) -> int | None:
        """The right answer to ``messages`` (which end with the user's turn, or with the wrong
        answer, which is replaced). Queued with high priority. Returns the example id."""
        context = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
        wrong = [messages[-1]["content"]] if messages and messages[-1]["role"] == "assistant" else []
        examples = correction_examples(list(context), correction, conversation_id(list(context)))
        with self._lock:  # no answer to this context is queued between the withdrawal and the record
            self._withdraw(list(context), wrong + self.chat_log.generated_for(list(context)))
            self.queue.add_many(examples)  # known content is only raised to high priority
            self._remember(examples)  # once queued (a full queue refuses)
            found = [self.queue.find(e.content_hash) for e in examples]
            # sent again (after a rollback took it out of the weights, or after the gate refused
            # it): it trains again, rather than being a duplicate of what was done
            self.queue.requeue([f.id for f in found if f is not None and f.status in (Status.TRAINED, Status.REJECTED)])
        self.stats["feedback"] += 1
        self.stats["corrections"] += 1
        if self.enable_chat_logging:
            self.log_message(conversation_id(list(context)), "correction", correction)
        return found[0].id if found[0] else None

    def rate(self, generation_id: str, rating: int) -> dict:
        """+1 raises the answer's pair to high priority (an answer to a corrected question, which
        was not queued, is queued so); -1 withdraws it from training."""
        gen = self.chat_log.generation(generation_id)
        if gen is None:
            raise KeyError(f"no response with id {generation_id!r}")
        self.chat_log.rate(generation_id, rating)
        self.stats["feedback"] += 1
        ex = self._pair_for(generation_id)
        held = self.chat_log.held_back(generation_id) if ex is None else None
        if held is not None and rating > 0:
            # an answer to a corrected question, not queued; rated up, the user vouches for it
            vouched = TrainingExample.chat(held, source=Source.FEEDBACK, priority=Priority.HIGH)
            self.queue.add_many([vouched])
            ex = self.queue.find(vouched.content_hash)
        elif ex is not None:
            if rating > 0:
                self.queue.add_many([TrainingExample.chat(ex.messages, source=Source.FEEDBACK, priority=Priority.HIGH)])
            elif ex.status in _WITHDRAWABLE:  # trained already: no longer replayed either
                self.queue.mark_rejected([ex.id], "rated down by the user", only_from=_WITHDRAWABLE)
        return {"generation_id": generation_id, "rating": rating, "example_id": ex.id if ex else None}

    def _pair_for(self, generation_id: str) -> TrainingExample | None:
        for ex in self.queue.recent(500):
            if ex.metadata.get("generation_id") == generation_id:
                return ex
        return None

    def get_stats(self) -> dict:
        return dict(self.stats, chat_log_messages=self.chat_log.count())
