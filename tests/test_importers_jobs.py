"""ImportJobs: status, progress, results and errors of jobs on worker threads."""
from __future__ import annotations

import threading

import pytest

from idletune.importers import ImportFailed, ImportJobs, ImportResult


@pytest.fixture
def jobs():
    j = ImportJobs(max_workers=1, keep_finished=3)
    yield j
    j.shutdown()


def test_progress_result_and_queued_state(jobs):
    gate, started = threading.Event(), threading.Event()

    def slow(n, *, progress):
        started.set()
        for i in range(1, n + 1):
            progress(i, n)
            if i == 2:
                gate.wait(5)
        return ImportResult(source="s", importer="text", examples_generated=n, example_ids=list(range(n)))

    first = jobs.submit(slow, 4, kind="text", source="s")
    second = jobs.submit(slow, 1)
    assert started.wait(5)
    assert jobs.get(second)["status"] == "queued"  # one worker: the second waits
    job = jobs.get(first)
    assert job["status"] == "running" and job["progress"] == {"done": 2, "total": 4}
    gate.set()
    done = jobs.wait(first, 5)
    assert done["status"] == "done" and done["progress"] == {"done": 4, "total": 4}
    assert done["result"]["examples_added"] == 4 and done["error"] is None and done["finished_at"]
    assert jobs.wait(second, 5)["status"] == "done"


def test_failures_are_reported(jobs):
    def refuse(*, progress):
        raise ImportFailed("x.pdf is a truncated PDF", code="corrupt_file", source="x.pdf")

    def bug(*, progress):
        raise KeyError("oops")

    job = jobs.wait(jobs.submit(refuse), 5)
    assert job["status"] == "failed" and job["error"]["code"] == "corrupt_file"
    assert job["error"]["message"] == "x.pdf is a truncated PDF" and job["error"]["http_status"] == 400
    job = jobs.wait(jobs.submit(bug), 5)
    assert job["status"] == "failed" and job["error"]["code"] == "internal_error" and "oops" in job["error"]["message"]
    assert jobs.wait(jobs.submit(lambda *, progress: {"ok": True}), 5)["result"] == {"ok": True}


def test_old_jobs_are_forgotten_and_unknown_ids(jobs):
    ids = []
    for _ in range(5):
        ids.append(jobs.submit(lambda *, progress: {}))
        assert jobs.wait(ids[-1], 5)["status"] == "done"
    assert len(jobs.list()) == 3
    with pytest.raises(KeyError, match="no import job"):
        jobs.get(ids[0])
    with pytest.raises(ValueError):
        ImportJobs(max_workers=0)


def test_public_names():
    """Everything the package re-exports is in __all__, and only that (httpx's habit)."""
    import idletune.importers as importers

    exported = {n for n, v in vars(importers).items()
                if not n.startswith("_") and getattr(v, "__module__", "").startswith("idletune.importers")}
    assert set(importers.__all__) == exported
