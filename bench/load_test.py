"""Load test (issue 7): concurrent streaming chat clients against a real `idletune serve` on the
default model, while text imports arrive and training is due.

Each client streams an answer, then "reads" it for a random think time, like a person. Every
``--import-every`` seconds a text import arrives. The scheduler trains in the idle gaps.

Reports: requests, errors (with their messages), time to first token and total latency
percentiles, the server's RSS at start (after warm-up) and end (and its peak), training rounds and
steps during the run, preemptions, and a deadlock check (a request and a status call must both
finish within 60 s after the clients stop, and no 120 s passed without a finished request).

Usage:
    python bench/load_test.py [--duration 300] [--clients 16] [--model DIR] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from serving import free_port, start_server

TOPICS = ["the sea", "mountains", "bread", "rain", "libraries", "bicycles", "owls", "winter", "tea", "trains"]


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))], 3)


class Load:
    def __init__(self, url: str, args):
        self.url, self.args = url, args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ttft: list[float] = []
        self.total: list[float] = []
        self.errors: list[str] = []
        self.requests = 0
        self.imports = 0
        self.import_errors: list[str] = []
        self.last_finish = time.monotonic()
        self.longest_gap = 0.0

    def client(self, n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(timeout=httpx.Timeout(600, connect=10)) as http:
            while not self.stop.is_set():
                prompt = f"Client {n}: write two sentences about {rng.choice(TOPICS)}."
                t0 = time.monotonic()
                first = None
                try:
                    with http.stream("POST", f"{self.url}/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": prompt}], "stream": True,
                            "max_tokens": self.args.max_tokens}) as r:
                        if r.status_code != 200:
                            r.read()
                            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                        done = False
                        for line in r.iter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                done = True
                                break
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(f"stream error: {chunk['error']['message']}")
                            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                            if first is None and delta.get("content"):
                                first = time.monotonic() - t0
                        if not done:
                            raise RuntimeError("stream ended without [DONE]")
                    now = time.monotonic()
                    with self.lock:
                        self.requests += 1
                        self.total.append(now - t0)
                        if first is not None:
                            self.ttft.append(first)
                        self.longest_gap = max(self.longest_gap, now - self.last_finish)
                        self.last_finish = now
                except Exception as e:  # counted and reported, the client goes on
                    with self.lock:
                        self.errors.append(f"{type(e).__name__}: {e}"[:300])
                self.stop.wait(rng.uniform(*self.args.think))

    def importer(self) -> None:
        i = 0
        while not self.stop.wait(self.args.import_every):
            i += 1
            text = (f"# Field notes {i}\n\nOn day {i} the survey team counted {i * 7} herons along the canal. "
                    f"The water level was {100 + i} centimetres and the wind came from the west.\n")
            try:
                r = httpx.post(f"{self.url}/api/import/text", json={"text": text, "name": f"notes-{i}.md"}, timeout=120)
                if r.status_code not in (200, 202):
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                with self.lock:
                    self.imports += 1
            except Exception as e:
                with self.lock:
                    self.import_errors.append(f"{type(e).__name__}: {e}"[:300])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--think", type=float, nargs=2, default=(1.0, 6.0), metavar=("MIN", "MAX"),
                    help="seconds a client waits between its requests (default 1 6)")
    ap.add_argument("--import-every", type=float, default=10.0)
    ap.add_argument("--min-idle-ms", type=int, default=500, help="scheduler.min_idle_time_ms of the server")
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        port = free_port()
        proc = start_server(data, args.model, port, ["--set", f"scheduler.min_idle_time_ms={args.min_idle_ms}"])
        url = f"http://127.0.0.1:{port}"
        ps = psutil.Process(proc.pid)
        try:
            # warm-up: one request, and a backlog so that training is due from the start
            httpx.post(f"{url}/v1/chat/completions", timeout=300,
                       json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
            for i in range(8):
                httpx.post(f"{url}/api/feedback", json={"messages": [{"role": "user", "content": f"Who is caretaker {i}?"}],
                                                         "correction": f"Caretaker {i} is Mira Olsen-{i}."})
            st0 = httpx.get(f"{url}/api/status").json()
            rss_start = ps.memory_info().rss
            rss_peak = rss_start
            load = Load(url, args)
            threads = [threading.Thread(target=load.client, args=(n,), daemon=True) for n in range(args.clients)]
            threads.append(threading.Thread(target=load.importer, daemon=True))
            t_start = time.monotonic()
            for t in threads:
                t.start()
            rss_series = []  # (seconds into the run, MB) every 30 s: is memory flat once training has run?
            while time.monotonic() - t_start < args.duration:
                time.sleep(2)
                rss = ps.memory_info().rss
                rss_peak = max(rss_peak, rss)
                el = time.monotonic() - t_start
                if not rss_series or el - rss_series[-1][0] >= 30:
                    rss_series.append((round(el), round(rss / 2**20)))
            load.stop.set()
            for t in threads:
                t.join(900)
            stuck = [t.name for t in threads if t.is_alive()]
            rss_end = ps.memory_info().rss
            # deadlock check: the server still answers, promptly, once the clients are gone
            t0 = time.monotonic()
            final = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                               json={"messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 8})
            st1 = httpx.get(f"{url}/api/status", timeout=60).json()
            after = time.monotonic() - t0
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    sched0, sched1 = st0["scheduler"], st1["scheduler"]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {round(psutil.virtual_memory().total / 2**30)} GiB, "
                   f"Python {platform.python_version()}",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": st1.get("model"),
        "duration_s": args.duration, "clients": args.clients, "max_tokens": args.max_tokens,
        "requests": load.requests, "errors": len(load.errors), "error_samples": sorted(set(load.errors))[:5],
        "imports": load.imports, "import_errors": load.import_errors[:5],
        "ttft_s": {"p50": pct(load.ttft, 50), "p90": pct(load.ttft, 90), "p99": pct(load.ttft, 99),
                   "max": pct(load.ttft, 100)},
        "total_s": {"p50": pct(load.total, 50), "p90": pct(load.total, 90), "p99": pct(load.total, 99),
                    "max": pct(load.total, 100), "mean": round(statistics.mean(load.total), 3) if load.total else None},
        "rss_mb": {"start": round(rss_start / 2**20), "end": round(rss_end / 2**20), "peak": round(rss_peak / 2**20),
                   "every_30_s": rss_series},
        "training": {"rounds_accepted": sched1["training_count"] - sched0["training_count"],
                     "rounds_rejected": sched1["rounds_rejected"] - sched0["rounds_rejected"],
                     "steps_at_end": (st1.get("training") or {}).get("step"),
                     "preemptions": sched1.get("preemptions"), "live_version": st1["live_version"],
                     "rounds_under_load_minimum_share": sched1.get("starved_rounds", 0) - sched0.get("starved_rounds", 0),
                     "last_round": sched1.get("last_round"),
                     "queue_pending_at_end": st1["queue"]["pending"]},
        "deadlock_check": {"threads_stuck": stuck, "final_request_status": final.status_code,
                           "final_request_and_status_s": round(after, 2),
                           "longest_gap_between_finished_requests_s": round(load.longest_gap, 1),
                           "ok": not stuck and final.status_code == 200 and after < 60 and load.longest_gap < 120},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if result["errors"] == 0 and result["deadlock_check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
