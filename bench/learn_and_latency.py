"""Benchmark for the end-to-end slice (issue 2), against a real `idletune serve` on loopback.

1. Time to learn: a made-up fact is taught as a correction; the clock runs until the server,
   asked in other words, answers with it (it is asked only after each newly published version,
   so asking never interrupts training).
2. Chat latency with background training off vs. with a training backlog, interleaved in one
   run: requests alternate between the two conditions; in the "backlog" condition the queue
   holds pending examples (refilled while training is paused, as accepted rounds use them up)
   and the scheduler is training when the request arrives (counted: ``training_active_at_arrival``).
   Reports time to first token and total time, median and p99, and their ratios. With
   ``--warm-training N`` the server first trains N steps with no request in flight (on a GPU:
   the first step's compilation and graph recording, 40–55 s on a fresh machine), so that the
   measurement sees training as it runs afterwards, as gpu_inference_impact.py does; without
   it, a fresh machine's first minute of measuring includes that compilation.

Usage:
    python bench/learn_and_latency.py [--model DIR] [--requests 40] [--set section.field=value] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serving import free_port, start_server

FACT_Q = "What is the codename of Project Bluebird?"
FACT_A = "The codename of Project Bluebird is ZEPHYR-42."
PARAPHRASES = ["Tell me the codename of Project Bluebird.", "Which codename does Project Bluebird have?"]
PROMPT = "Write two sentences about the sea."
# One client for the whole run, as a chat client keeps one (the OpenAI SDK does): a new
# httpx client per request spends ~20 ms building its TLS context before it connects, which
# the first version of this script counted in every request's time to first token.
HTTP = httpx.Client(timeout=600)


def chat(url: str, content: str, max_tokens: int) -> dict:
    """One streamed request: time to first token, total time, tokens."""
    t0 = time.perf_counter()
    ttft, n, text = None, 0, []
    with HTTP.stream("POST", f"{url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                            "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    text.append(c["delta"]["content"])
    return {"ttft": ttft or time.perf_counter() - t0, "total": time.perf_counter() - t0, "tokens": n, "text": "".join(text)}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def time_to_learn(url: str, timeout: float) -> dict:
    st = HTTP.get(f"{url}/api/status").json()
    version = st["live_version"]
    t0 = time.perf_counter()
    HTTP.post(f"{url}/api/feedback", json={"messages": [{"role": "user", "content": FACT_Q}], "correction": FACT_A})
    while time.perf_counter() - t0 < timeout:
        st = HTTP.get(f"{url}/api/status").json()
        if st["live_version"] != version and not st["scheduler"]["is_training_active"]:
            version = st["live_version"]
            answers = [chat(url, q, 32)["text"] for q in PARAPHRASES]
            if all("ZEPHYR-42" in a for a in answers):
                return {"seconds": time.perf_counter() - t0, "version": version, "answers": answers,
                        "steps": st["training"]["step"]}
        time.sleep(0.25)
    return {"seconds": None, "timeout": timeout}


def pause_training(url: str) -> None:
    """Pause the scheduler and let a round in progress end."""
    HTTP.post(f"{url}/api/training/pause")
    while HTTP.get(f"{url}/api/status").json()["scheduler"]["is_training_active"]:
        time.sleep(0.05)


def warm_training(url: str, steps: int, timeout: float = 600) -> dict:
    """Let the server train ``steps`` steps with no request in flight, then pause it."""
    def step() -> int:  # no "training" entry before the first round
        return (HTTP.get(f"{url}/api/status").json().get("training") or {}).get("step", 0)

    start = now = step()
    HTTP.post(f"{url}/api/training/resume")
    t0 = time.perf_counter()
    while now < start + steps and time.perf_counter() - t0 < timeout:
        time.sleep(0.5)
        now = step()
    pause_training(url)
    return {"steps": now - start, "seconds": round(time.perf_counter() - t0, 1)}


def summary(rs: list[dict]) -> dict:
    """Time to first token and total time (p50, p99), ms a token, the slowest five."""
    per_tok = [(r["total"] - r["ttft"]) / max(1, r["tokens"] - 1) for r in rs]
    return {"n": len(rs), "ttft_p50_ms": 1e3 * statistics.median(r["ttft"] for r in rs),
            "ttft_p99_ms": 1e3 * pct([r["ttft"] for r in rs], 99),
            "total_p50_ms": 1e3 * statistics.median(r["total"] for r in rs),
            "total_p99_ms": 1e3 * pct([r["total"] for r in rs], 99),
            "per_token_p50_ms": 1e3 * statistics.median(per_tok),
            "training_active_at_arrival": sum(r["training_was_active"] for r in rs),
            "ttft_ms_slowest": sorted((round(1e3 * r["ttft"], 2) for r in rs), reverse=True)[:5],
            "ttft_ms_slowest_at": sorted(range(len(rs)), key=lambda i: -rs[i]["ttft"])[:5]}


def latency(url: str, n: int, max_tokens: int, gap: float, warm_steps: int = 0, on_measure=None,
            on_progress=None) -> dict:
    """``on_measure``: called once the backlog is in and training warmed up, as measuring starts;
    ``on_progress``: called with both conditions' summaries so far after every 20 requests of
    each (a run cut short by a time limit keeps what it measured)."""
    # A backlog: many pending examples, so the scheduler always has work when allowed. Varied
    # sentences (repetitive text would be screened out before training); refilled while
    # measuring, since accepted rounds use it up (EH: 20 examples left after warming up, and
    # training was running at only 4 of 80 arrivals by the end).
    import random

    rng = random.Random(0)
    who = ["The ferry", "A courier", "Our neighbour", "The museum", "A small bakery", "The night train",
           "Professor Ilse Marr", "The harbour office", "A fox", "The council"]
    did = ["delivered", "painted", "repaired", "misplaced", "counted", "photographed", "sold", "borrowed"]
    what = ["seven blue lanterns", "an old violin", "the spare keys", "forty jars of honey", "a broken clock",
            "the winter timetable", "two maps of the coast", "a crate of pears"]
    where = ["near the lighthouse", "in Ravensholm", "behind the library", "on the third floor",
             "before sunrise", "during the storm", "at the market", "outside the station"]
    made = {"texts": 0, "imports": 0}

    def fill(documents: int) -> None:
        """Import ``documents`` new documents of 40 sentences each (two examples each, of ≤ 512 tokens)."""
        for _ in range(documents):
            first = made["texts"]
            texts = [f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.choice(where)} on day {i}."
                     for i in range(first, first + 40)]
            made["texts"] += 40
            made["imports"] += 1
            r = HTTP.post(f"{url}/api/import/text", json={"text": "\n\n".join(texts), "name": f"backlog-{first}"},
                          timeout=120)
            r.raise_for_status()

    def pending() -> int:
        return HTTP.get(f"{url}/api/status").json()["queue"]["pending"]

    fill(20)
    warmed = warm_training(url, warm_steps) if warm_steps else None
    pending_at_start = pending()
    refills = 0
    out = {"off": [], "backlog": []}
    chat(url, PROMPT, 4)  # warm-up
    if on_measure is not None:
        on_measure()
    window = [time.time()]  # wall clock, to match what the server logged or sampled meanwhile
    for i in range(2 * n):
        cond = "off" if i % 2 == 0 else "backlog"
        if cond == "off":  # no training at all
            pause_training(url)
            if pending() < 30:  # keep the backlog from running out (while paused: not timed)
                fill(10)
                refills += 1
        else:
            HTTP.post(f"{url}/api/training/resume")
        time.sleep(gap)  # idle gap: with a backlog, training is running when the request arrives
        training = HTTP.get(f"{url}/api/status").json()["scheduler"]["is_training_active"]
        r = chat(url, PROMPT, max_tokens)
        r["training_was_active"] = training
        r.pop("text")
        out[cond].append(r)
        if on_progress is not None and i % 40 == 39:
            on_progress({"requests_a_condition": len(out["backlog"]), "off": summary(out["off"]),
                         "backlog": summary(out["backlog"])})
    HTTP.post(f"{url}/api/training/pause")
    window.append(time.time())

    off, bl = summary(out["off"]), summary(out["backlog"])
    ratios = {k: bl[k] / off[k] for k in off if k.endswith("_ms")}
    active = [r for r in out["backlog"] if r["training_was_active"]]  # training running as it arrived
    bl_active = summary(active) if active else None
    st = HTTP.get(f"{url}/api/status").json()
    # every request as measured (seconds), so a subset (training running at arrival) can be read again
    requests = {c: [{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rs]
                for c, rs in out.items()}
    return {"off": off, "backlog": bl, "ratio_backlog_over_off": ratios, "backlog_training_active": bl_active, "preemptions": st["scheduler"]["preemptions"],
            "backlog_pending_at_start": pending_at_start, "backlog_refills": refills,
            "rounds_published": st["scheduler"]["training_count"],
            "max_tokens": max_tokens, "gap_s": gap, "warmed_training": warmed, "measured_wall_clock": window,
            "requests": requests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a local HF model folder (default: the default model)")
    ap.add_argument("--requests", type=int, default=30, help="requests per condition")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--gap", type=float, default=1.5, help="seconds between requests")
    ap.add_argument("--learn-timeout", type=float, default=600)
    ap.add_argument("--skip-learning", action="store_true")
    ap.add_argument("--warm-training", type=int, default=0, metavar="STEPS",
                    help="train this many steps before measuring latency (0: measure from the start)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="passed to the server, e.g. --set training.trainer=process")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    res = {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
           "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_server(Path(tmp) / "data", args.model, port,
                            ["--set", "scheduler.min_idle_time_ms=500", "--set", "scheduler.check_interval_ms=50"]
                            + [a for kv in args.set for a in ("--set", kv)])
        url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        start = {"at": 0}

        def measuring():  # where in the server's log measuring starts
            start["at"] = log.stat().st_size if log.exists() else 0
        try:
            if not args.skip_learning:
                res["time_to_learn"] = time_to_learn(url, args.learn_timeout)
                print("time to learn:", json.dumps(res["time_to_learn"]), flush=True)
            def progress(part: dict) -> None:
                res["latency_so_far"] = part
                print(f'{part["requests_a_condition"]} requests a condition: TTFT p50 / p99 off '
                      f'{part["off"]["ttft_p50_ms"]:.2f} / {part["off"]["ttft_p99_ms"]:.2f} ms, backlog '
                      f'{part["backlog"]["ttft_p50_ms"]:.2f} / {part["backlog"]["ttft_p99_ms"]:.2f} ms', flush=True)
                if args.out:  # whole or not at all: a time limit may stop the run while it writes
                    tmp = Path(args.out).with_suffix(".partial")
                    tmp.write_text(json.dumps(res, indent=1))
                    os.replace(tmp, args.out)
            res["latency"] = latency(url, args.requests, args.max_tokens, args.gap, args.warm_training, measuring,
                                     progress)
            res.pop("latency_so_far", None)
        finally:
            proc.terminate()
            proc.wait(30)
            # the server's last lines (where the GPU path logs how it started, and any warning),
            # and what it logged about training while latency was measured (rounds, new shapes)
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()
                res["server_log_head"] = lines[:30]  # how it started: the GPU path, where training runs
                res["server_log_tail"] = lines[-40:]
                if start["at"]:
                    with open(log, "rb") as f:
                        f.seek(start["at"])
                        lines = f.read().decode(errors="replace").splitlines()
                    res["server_log_while_measuring"] = [x for x in lines if "training" in x][:200]
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
