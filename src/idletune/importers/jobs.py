"""ImportJobs: run long imports on worker threads and report their progress.

``submit(fn, *args, **kwargs)`` calls ``fn(*args, progress=callback, **kwargs)`` on a worker
thread (every importer method takes ``progress``); ``get(job_id)`` reports::

    {"job_id": "...", "kind": "url", "source": "https://...", "status": "queued|running|done|failed",
     "progress": {"done": 3, "total": 10}, "result": {...ImportResult.to_dict()...} | None,
     "error": {"message": ..., "type": ..., "param": ..., "code": ...} | None,
     "created_at": ..., "started_at": ..., "finished_at": ...}

Finished jobs are kept (the newest ``keep_finished``) so clients can poll after the fact.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..queue import QueueFullError
from .results import ImportFailed

log = logging.getLogger(__name__)
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


class ImportJobs:
    """A small thread pool of import jobs with pollable status.

    Args:
        max_workers: imports running at once (the rest wait, ``queued``).
        keep_finished: finished jobs remembered for :meth:`get`; older ones are forgotten.
    """

    def __init__(self, max_workers: int = 2, keep_finished: int = 500):
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if keep_finished < 1:
            raise ValueError(f"keep_finished must be at least 1, got {keep_finished}")
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="idletune-import")
        self._jobs: dict[str, dict[str, Any]] = {}
        self._done_events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.keep_finished = keep_finished

    def submit(self, fn: Callable[..., Any], *args: Any, kind: str = "import", source: str | None = None,
               **kwargs: Any) -> str:
        """Queue ``fn(*args, progress=..., **kwargs)``; returns the job id at once."""
        job_id = uuid.uuid4().hex[:16]
        job = {"job_id": job_id, "kind": kind, "source": source, "status": QUEUED,
               "progress": {"done": 0, "total": 0}, "result": None, "error": None,
               "created_at": time.time(), "started_at": None, "finished_at": None}
        with self._lock:
            self._jobs[job_id] = job
            self._done_events[job_id] = threading.Event()
        self._pool.submit(self._run, job_id, fn, args, kwargs)
        return job_id

    def _run(self, job_id: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self._update(job_id, status=RUNNING, started_at=time.time())

        def progress(done: int, total: int) -> None:
            self._update(job_id, progress={"done": int(done), "total": int(total)})

        try:
            out = fn(*args, progress=progress, **kwargs)
            result = out.to_dict() if hasattr(out, "to_dict") else out
            self._update(job_id, status=DONE, result=result)
        except ImportFailed as e:
            self._update(job_id, status=FAILED, error={**e.to_dict(), "http_status": e.http_status})
        except QueueFullError as e:  # nothing of this import was stored (one transaction); say why
            self._update(job_id, status=FAILED, error={"message": str(e), "type": "insufficient_storage",
                                                       "param": None, "code": "queue_full", "http_status": 507})
        except Exception as e:  # never lose a worker to a bug; report it on the job
            log.exception("import job %s failed", job_id)
            self._update(job_id, status=FAILED, error={"message": f"internal error: {type(e).__name__}: {e}",
                                                       "type": "server_error", "param": None,
                                                       "code": "internal_error", "http_status": 500})
        finally:
            with self._lock:
                job = self._jobs.get(job_id)
                if job is not None:
                    job["finished_at"] = time.time()
                    if job["status"] == DONE and job["progress"]["total"] == 0:
                        job["progress"] = {"done": 1, "total": 1}
                event = self._done_events.get(job_id)
            if event is not None:
                event.set()
            self._forget_old()

    def _update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            if job_id in self._jobs:
                self._jobs[job_id].update(fields)

    def _forget_old(self) -> None:
        with self._lock:
            finished = [j for j in self._jobs.values() if j["status"] in (DONE, FAILED)]
            if len(finished) <= self.keep_finished:
                return
            finished.sort(key=lambda j: j["finished_at"] or 0)
            for j in finished[: len(finished) - self.keep_finished]:
                self._jobs.pop(j["job_id"], None)
                self._done_events.pop(j["job_id"], None)

    def get(self, job_id: str) -> dict[str, Any]:
        """A snapshot of the job (KeyError if unknown or forgotten)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(f"no import job {job_id!r} (unknown, or finished long ago)")
            return {**job, "progress": dict(job["progress"])}

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job finishes or ``timeout`` passes; returns its snapshot either way."""
        with self._lock:
            event = self._done_events.get(job_id)
        if event is None:
            return self.get(job_id)
        event.wait(timeout)
        return self.get(job_id)

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest jobs first."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j["created_at"], reverse=True)[:limit]
            return [{**j, "progress": dict(j["progress"])} for j in jobs]

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs; with ``wait``, let running ones finish."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
