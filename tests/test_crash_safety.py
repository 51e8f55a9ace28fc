"""Crash safety: `idletune serve` killed with SIGKILL at random moments, over and over.

The server trains constantly (tiny model, 50 ms idle, 3-step rounds, "train now" every few
hundred ms) while clients chat, correct and import. After every kill, before and after the
restart: every example the API acknowledged is in the queue, the served version is the one
``snapshots/LIVE`` names and it loads without a problem, and no half-written file is used.

Also: damaged files at start (a corrupt or truncated queue or chat log, a snapshot with a bad
checksum or a truncated meta.json) are detected, reported, and fallen back from.
"""
from __future__ import annotations

import random
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess

KILLS = 20
FAST = ["--set", "scheduler.enable_background_training=false",  # switched on once the restart is checked
        "--set", "scheduler.min_idle_time_ms=50", "--set", "scheduler.check_interval_ms=20",
        "--set", "scheduler.max_cpu_usage=100",
        "--set", "training.max_steps=3", "--set", "training.warmup_steps=0",
        "--set", "gate.num_retention_probes=4", "--set", "gate.heldout_examples=4",
        "--set", "server.default_max_tokens=4"]


class Traffic:
    """Client threads that chat, correct, import and ask for training; they record what was acknowledged."""

    def __init__(self, url: str, cycle: int, rng: random.Random):
        self.url, self.cycle, self.rng = url, cycle, rng
        self.acked_hashes: dict[str, str] = {}  # content hash -> what it was
        self.acked_ids: set[int] = set()
        self.max_version_served = -1
        self.server_errors: list[str] = []  # 5xx answers (a bug, reported; not a durability failure)
        self.stop = threading.Event()
        self.quiet = threading.Event()  # set: the clients hold off (an idle gap, so training can finish)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(f,), daemon=True)
                        for f in (self._chat, self._correct, self._import, self._train)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def _run(self, step) -> None:
        i = 0
        with httpx.Client(timeout=20) as client:
            while not self.stop.is_set():
                if self.quiet.is_set():
                    time.sleep(0.02)
                    continue
                i += 1
                try:
                    step(client, i)
                except httpx.HTTPError:  # the server was killed mid-request: nothing was acknowledged
                    pass
                time.sleep(self.rng.uniform(0, 0.12))

    def _chat(self, client: httpx.Client, i: int) -> None:
        from idletune.examples import TrainingExample

        messages = [{"role": "user", "content": f"Cycle {self.cycle} question {i}: what is the colour of stone {i}?"}]
        r = client.post(f"{self.url}/v1/chat/completions", json={"messages": messages})
        if r.status_code >= 500:
            self.server_errors.append(r.text[:200])
            return
        assert r.status_code == 200, r.text
        body = r.json()
        answer = body["choices"][0]["message"]["content"]
        with self.lock:
            self.max_version_served = max(self.max_version_served, int(body["system_fingerprint"].split("-v")[1]))
            if answer.strip():
                h = TrainingExample.chat(messages + [{"role": "assistant", "content": answer}]).content_hash
                self.acked_hashes[h] = f"chat pair {self.cycle}/{i}"

    def _correct(self, client: httpx.Client, i: int) -> None:
        from idletune.examples import TrainingExample

        messages = [{"role": "user", "content": f"Who keeps lighthouse {self.cycle}-{i}?"}]
        fix = f"Keeper number {self.cycle * 1000 + i} keeps it."
        r = client.post(f"{self.url}/api/feedback", json={"messages": messages, "correction": fix})
        assert r.status_code == 200, r.text
        h = TrainingExample.chat(messages + [{"role": "assistant", "content": fix}]).content_hash
        with self.lock:
            self.acked_hashes[h] = f"correction {self.cycle}/{i}"
            self.acked_ids.add(r.json()["example_id"])

    def _import(self, client: httpx.Client, i: int) -> None:
        text = (f"# Harbour log {self.cycle}.{i}\n\nThe ferry {self.cycle}-{i} left the harbour at dawn. "
                f"It carried {i} crates of apples and {self.cycle} sacks of flour to the island of Wend.")
        r = client.post(f"{self.url}/api/import/text", json={"text": text, "name": f"log-{self.cycle}-{i}.md"})
        assert r.status_code in (200, 202), r.text
        if r.status_code == 200:  # finished inline: its examples were committed before the answer
            with self.lock:
                self.acked_ids.update(r.json()["result"]["example_ids"])

    def _train(self, client: httpx.Client, i: int) -> None:
        client.post(f"{self.url}/api/training/force")
        time.sleep(0.2)


def _live_pointer(data_dir: Path) -> int:
    p = data_dir / "snapshots" / "LIVE"
    return int(p.read_text().strip()) if p.exists() else 0


def _start(data_dir: Path, model: Path) -> ServerProcess:
    return ServerProcess(data_dir, model, FAST).start(timeout=120)


@pytest.mark.slow  # 20 restarts of a real server: about 2 minutes
def test_sigkill_at_random_moments_loses_nothing(tmp_path, tiny_model_dir):
    from idletune.queue import TrainingQueue

    rng = random.Random(7)
    data = tmp_path / "data"
    acked_hashes: dict[str, str] = {}
    acked_ids: set[int] = set()
    report = {"kills": 0, "lost": 0, "served_version_ahead_of_LIVE": 0, "kills_leaving_tmp_snapshot": 0,
              "kills_leaving_tmp_file": 0, "versions_published": 0, "restored_other_than_LIVE": 0,
              "chat_5xx": 0}
    server = _start(data, tiny_model_dir)
    for cycle in range(KILLS):
        pointer_before = _live_pointer(data)
        httpx.post(f"{server.url}/api/training/config", json={"enable_background_training": True}).raise_for_status()
        with Traffic(server.url, cycle, rng) as traffic:
            time.sleep(rng.uniform(0.3, 1.8))
            if cycle % 4 == 3:  # now and then an idle gap, so a publish lands (training yields to any request)
                traffic.quiet.set()
                end = time.monotonic() + 30
                while _live_pointer(data) == pointer_before and time.monotonic() < end:
                    time.sleep(0.05)
                traffic.quiet.clear()
                time.sleep(rng.uniform(0.0, 0.5))
            server.stop(kill=True)  # SIGKILL, mid-whatever
        report["kills"] += 1
        acked_hashes.update(traffic.acked_hashes)
        acked_ids.update(traffic.acked_ids)
        report["chat_5xx"] += len(traffic.server_errors)

        # On disk, before any restart: what was acknowledged is there; what a kill cut short is only a temp.
        snaps = data / "snapshots"
        report["kills_leaving_tmp_snapshot"] += any(snaps.glob(".tmp-*"))
        report["kills_leaving_tmp_file"] += any(snaps.rglob("*.tmp"))
        q = TrainingQueue(data / "queue.db")
        try:
            missing = [what for h, what in acked_hashes.items() if q.find(h) is None]
            missing += [f"example {i}" for i in acked_ids if q.get(i) is None]
        finally:
            q.close()
        report["lost"] += len(missing)
        assert not missing, f"after kill {cycle + 1}: acknowledged but not in the queue: {missing[:5]}"
        live = _live_pointer(data)
        report["versions_published"] += live - pointer_before if live > pointer_before else 0
        report["served_version_ahead_of_LIVE"] += traffic.max_version_served > live

        # Restart: the version LIVE names is served, loads cleanly, and no temp was picked up.
        server = _start(data, tiny_model_dir)
        st = httpx.get(f"{server.url}/api/status").json()
        assert st["weights"]["problems"] == [] and st["problems"] == [], (st["weights"]["problems"], st["problems"])
        report["restored_other_than_LIVE"] += st["live_version"] != live
        assert st["live_version"] == live, f"after kill {cycle + 1}: serving v{st['live_version']}, LIVE says v{live}"
        assert not list(snaps.glob(".tmp-*")), "a half-written snapshot was left after the restart"
        if live:
            assert (snaps / f"v{live:06d}" / "meta.json").exists()
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": f"still there {cycle}?"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["system_fingerprint"] == f"idletune-v{live}"
    server.stop()
    print(f"\ncrash safety: {report}; acknowledged examples checked: {len(acked_hashes) + len(acked_ids)}")
    assert report["kills"] >= 20 and report["lost"] == 0
    assert len(acked_hashes) > 3 * KILLS  # the clients really were acknowledged, every cycle
    assert report["versions_published"] >= 3, f"too little training between kills to test snapshots: {report}"


@pytest.mark.slow  # 5 restarts: about 40 s
def test_sigkill_inside_a_snapshot_write(tmp_path, tiny_model_dir, monkeypatch):
    """Random kills rarely land in a write that takes milliseconds, so the server is made to
    pause inside it (fault injection) and killed there: the version being written must never
    be served, nothing acknowledged may be lost, and the half-written folder is never used."""
    from idletune.queue import TrainingQueue

    monkeypatch.setenv("IDLETUNE_FAULT_SNAPSHOT_PAUSE_S", "3")
    data = tmp_path / "data"
    snaps = data / "snapshots"
    server = _start(data, tiny_model_dir)
    kills_inside = 0
    for cycle in range(5):
        live = _live_pointer(data)
        r = httpx.post(f"{server.url}/api/feedback", timeout=30, json={
            "messages": [{"role": "user", "content": f"What opens locker {cycle}?"}],
            "correction": f"Locker {cycle} opens with code {4000 + cycle}."})
        example_id = r.json()["example_id"]
        httpx.post(f"{server.url}/api/training/force", timeout=30).raise_for_status()
        end = time.monotonic() + 60
        while not list(snaps.glob(".tmp-*")) and time.monotonic() < end:
            time.sleep(0.02)
        assert list(snaps.glob(".tmp-*")), f"cycle {cycle}: no snapshot write began: {httpx.get(f'{server.url}/api/status').json()['scheduler']}"
        server.stop(kill=True)  # SIGKILL inside the write
        kills_inside += 1
        assert _live_pointer(data) == live, "the version being written became live"
        q = TrainingQueue(data / "queue.db")
        try:
            assert q.get(example_id) is not None, "an acknowledged correction was lost"
        finally:
            q.close()
        server = _start(data, tiny_model_dir)
        st = httpx.get(f"{server.url}/api/status").json()
        assert st["live_version"] == live and st["weights"]["problems"] == [] and st["problems"] == []
        assert not list(snaps.glob(".tmp-*")), "the half-written snapshot was left behind"
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["system_fingerprint"] == f"idletune-v{live}"
    server.stop()
    print(f"\ncrash safety: {kills_inside} kills inside a snapshot write, nothing lost, the old version served each time")
    assert kills_inside == 5


# ---- damaged files at start ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A data directory with queued examples and two accepted snapshots (v1, v2; v2 live)."""
    data = tmp_path_factory.mktemp("damaged") / "data"
    s = ServerProcess(data, tiny_model_dir, FAST).start()
    try:
        for round_ in range(2):
            for i in range(3):
                httpx.post(f"{s.url}/api/feedback", json={
                    "messages": [{"role": "user", "content": f"Round {round_} question {i}?"}],
                    "correction": f"Round {round_} answer {i}."}).raise_for_status()
            for _ in range(5):
                out = httpx.post(f"{s.url}/api/training/force?wait=true", timeout=120).json()
                if _live_pointer(data) == round_ + 1:
                    break
            assert _live_pointer(data) == round_ + 1, out
    finally:
        s.stop()
    return data


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_corrupt_snapshot_falls_back_to_the_one_before(trained_dir, tmp_path, tiny_model_dir):
    data = _copy(trained_dir, tmp_path / "data")
    weights = data / "snapshots" / "v000002" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the checksum catches it
    weights.write_bytes(bytes(raw))
    s = ServerProcess(data, tiny_model_dir, FAST).start()
    try:
        st = httpx.get(f"{s.url}/api/status").json()
        assert st["live_version"] == 1
        assert any("v000002" in p and "checksum" in p for p in st["weights"]["problems"]), st["weights"]["problems"]
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 2}, timeout=30)
        assert r.json()["system_fingerprint"] == "idletune-v1"
    finally:
        s.stop()
    assert "v000002" in s.log_path.read_text()  # reported in the server log too
    assert _live_pointer(data) == 1


def test_truncated_snapshot_meta_falls_back(trained_dir, tmp_path, tiny_model_dir):
    data = _copy(trained_dir, tmp_path / "data")
    meta = data / "snapshots" / "v000002" / "meta.json"
    meta.write_bytes(meta.read_bytes()[:20])
    s = ServerProcess(data, tiny_model_dir, FAST).start()
    try:
        st = httpx.get(f"{s.url}/api/status").json()
        assert st["live_version"] == 1 and any("v000002" in p for p in st["weights"]["problems"])
    finally:
        s.stop()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_queue_is_moved_aside_salvaged_and_reported(trained_dir, tmp_path, tiny_model_dir, damage):
    from idletune.queue import TrainingQueue

    data = _copy(trained_dir, tmp_path / "data")
    db = data / "queue.db"
    from idletune.examples import TrainingExample

    q = TrainingQueue(db)  # enough rows for several pages, so a torn file still has readable ones
    q.add_many([TrainingExample.from_text(f"Imported paragraph {i} about the tides of Wend. " * 4) for i in range(200)])
    before = q.size()
    q.close()
    for side in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        side.unlink(missing_ok=True)  # closed cleanly: everything is in the main file
    raw = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated":
        db.write_bytes(raw[: len(raw) - 4096 - 100])  # the last page and a bit: a torn copy
    else:
        db.write_bytes(b"")
    s = ServerProcess(data, tiny_model_dir, FAST).start()
    try:
        st = httpx.get(f"{s.url}/api/status").json()
    finally:
        s.stop()
    problems = [p for p in st["problems"] if "queue.db" in p]
    assert len(problems) == 1, st["problems"]
    aside = sorted(data.glob("queue.db.corrupt-*"))
    assert len(aside) == 1 and str(aside[0]) in problems[0]  # says where the old file is
    assert aside[0].read_bytes()[:100] == (b"" if damage == "empty" else raw[:100] if damage == "truncated"
                                           else (b"this is not a database" * 100)[:100])  # kept as it was
    if damage == "truncated":
        assert before - 30 < st["queue"]["total"] < before  # all but the torn pages' rows were kept
    else:
        assert st["queue"]["total"] == 0
    assert "queue.db" in s.log_path.read_text()


def test_damaged_chat_log_is_moved_aside(trained_dir, tmp_path, tiny_model_dir):
    data = _copy(trained_dir, tmp_path / "data")
    for side in ("chatlog.db-wal", "chatlog.db-shm"):
        (data / side).unlink(missing_ok=True)  # else SQLite reads page 1 from the WAL, over the garbage
    (data / "chatlog.db").write_bytes(b"\x00garbage" * 1000)
    s = ServerProcess(data, tiny_model_dir, FAST).start()
    try:
        st = httpx.get(f"{s.url}/api/status").json()
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        s.stop()
    assert any("chatlog.db" in p and "moved to" in p for p in st["problems"])
    assert st["queue"]["total"] == _queue_total(trained_dir)  # the queue itself was untouched


def _queue_total(data: Path) -> int:
    from idletune.queue import TrainingQueue

    q = TrainingQueue(data / "queue.db")
    try:
        return q.size()
    finally:
        q.close()
