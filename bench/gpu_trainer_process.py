"""Chat beside idletune's real training engine in a thread (as shipped) vs in a process of its own.

The added time to first token under a backlog has a tail that runs with the machine: the slow
requests wait for the interpreter lock, which serving shares with training's Python (the
engine's layer calls, autograd's device thread; docs/BENCHMARKS.md, "What is left"). A trainer
in another process shares no lock with serving, but it is another CUDA context, which the GPU
runs in time slices beside serving's instead of side by side (``gpu_process_split.py`` measures
that part alone; run DV saw no slice-sized wait). This measures the whole: the same
service, the same engine and settings, training in one of two places, gated in both by the
request in flight as the scheduler does (the engine stops at its next layer boundary).

Conditions, alternated block by block in one run: ``off`` (no training), ``thread`` (the
serving process's own engine in a trainer thread: the product as shipped), ``process`` (a second
service's engine in a spawned process, told of requests through shared memory). Requests: the
service's ``generate``, 256 prompt tokens, 128 new, greedy, one client; with ``--http``, streamed
``POST /v1/chat/completions`` to the real server (uvicorn on loopback, in the serving process) from
a client in a process of its own, with the time to the first content chunk.

Changed after runs DW–DZ (fourteenth session), from a review: a chat is told to the training
process where the serving process's tracker marks it, also without ``--http`` (DW marked it
just before ``generate``, microseconds earlier than the thread's mark); ``--first`` picks the
condition round 0 starts with (it was always off, thread, process, so the thread always trained
first in a process); both trainers start the blocks with the user active and train alone with
the user away (in DZ the thread's engine counted the user active for its first 7 s alone); the
step counts are taken before the training-alone phase (DZ's printed ones included it).

Usage: python bench/gpu_trainer_process.py [OUT.json] [--shape qwen2.5-0.5b] [--rounds 10] [--per-block 16] [--http]
"""
import argparse
import contextlib
import json
import math
import multiprocessing as mp
import random
import tempfile
import threading
import time

import torch

import gpu_common as C
from gpu_training import fixed_batch

CONDITIONS = ("off", "thread", "process")


def _trainer_loop(eng, examples, go, stop, should_yield, wait_for_no_request, stats, shared_steps=None):
    """The bench's backlog: train rounds while ``go``, yielding while a request is in flight
    (steps so far also in ``shared_steps``, where given)."""
    while not stop.is_set():
        if not go.is_set():
            go.wait(0.05)
            continue
        if should_yield():
            wait_for_no_request()
            continue
        r = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 0.5)
        stats["steps"] += r.steps
        stats["rounds"] += 1
        stats["preempted"] += int(r.preempted)
        if shared_steps is not None:
            shared_steps.value = stats["steps"]


def _process_main(shape, in_flight, last_request, go, stop, ready, q, warmup_steps, shared_steps):
    """The spawned trainer: a service of its own (same settings), its engine told of the parent's
    requests through ``in_flight`` / ``last_request`` (shared memory, no lock)."""
    with tempfile.TemporaryDirectory() as tmp:
        svc = C.service(shape, tmp)
        eng = svc.engine
        eng.should_yield = lambda: in_flight.value > 0
        eng.idle_for = lambda: 0.0 if in_flight.value else time.monotonic() - last_request.value
        examples = fixed_batch(svc.tokenizer, chat=False)
        stats = {"steps": 0, "rounds": 0, "preempted": 0}
        while stats["steps"] < warmup_steps:  # compiles and records the graphs
            stats["steps"] += eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 5).steps
        stats.update(steps=0, rounds=0, preempted=0)
        ready.set()

        def wait_for_no_request():
            t = time.monotonic()
            while in_flight.value and time.monotonic() - t < 0.05:
                time.sleep(0.0002)  # a process of its own: polling takes no lock from serving
        _trainer_loop(eng, examples, go, stop, lambda: in_flight.value > 0, wait_for_no_request, stats, shared_steps)
        q.put(stats)
        svc.close()


def _client_main(url, conn):
    """A user's client in a process of its own: on ("run", n, max_tokens), n streamed requests, each
    after an idle gap; sends back (time to first content chunk, gaps between chunks) of each."""
    import httpx

    http = httpx.Client(timeout=600)  # one client kept, as OpenAI's SDK keeps one
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, n, max_tokens = msg
        out = []
        for _ in range(n):
            time.sleep(random.uniform(0.02, 0.08))
            t0, marks = time.perf_counter(), []
            with http.stream("POST", f"{url}/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens,
                                   "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"content"' in line:
                        chunk = json.loads(line[6:])
                        if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                            marks.append(time.perf_counter())
            out.append({"ttft": (marks[0] if marks else time.perf_counter()) - t0,
                        "gaps": [y - x for x, y in zip(marks, marks[1:])]})
        conn.send(out)


def serve_http(svc):
    """The real server on a free loopback port, in a thread of this process; returns (url, server)."""
    import socket

    import uvicorn

    from idletune.server.app import create_app

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True, name="uvicorn").start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-block", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--first", default="off", choices=CONDITIONS, help="the condition the first round starts "
                    "with (the rounds then alternate forwards and backwards from there)")
    ap.add_argument("--alone-s", type=float, default=10.0, help="seconds of training alone (no requests) per place")
    ap.add_argument("--http", action="store_true", help="requests over HTTP to the real server, from a client process")
    a = ap.parse_args()
    from idletune.inference import GenerationParams

    res = C.header()
    res.update(question="chat beside the engine in a thread vs in a process", shape=a.shape, http=a.http)
    C.model_dir(a.shape)  # saved once, before two processes would race to save it
    ctx = mp.get_context("spawn")
    in_flight, last_request = ctx.Value("i", 0, lock=False), ctx.Value("d", time.monotonic(), lock=False)
    pgo, pstop, pready, q = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    psteps = ctx.Value("i", 0, lock=False)
    proc = ctx.Process(target=_process_main, args=(a.shape, in_flight, last_request, pgo, pstop, pready, q,
                                                   a.warmup_steps, psteps), daemon=True)
    proc.start()
    with tempfile.TemporaryDirectory() as tmp:
        svc = C.service(a.shape, tmp)
        inf, eng = svc.inference, svc.engine
        prompt = torch.randint(100, len(svc.tokenizer) - 1, (256,)).tolist()
        inf.encode_chat = lambda messages: list(prompt)
        examples = fixed_batch(svc.tokenizer, chat=False)
        times = threading.local()
        orig_emit = inf._emit

        def timed_emit(tokens, *args):
            marks = getattr(times, "tokens", None)  # None in the server's threads (--http: timed by the client)
            if marks is None:
                return orig_emit(tokens, *args)

            def gen():
                for t in tokens:
                    marks.append(time.perf_counter())
                    yield t
            return orig_emit(gen(), *args)
        inf._emit = timed_emit

        tgo, tstop = threading.Event(), threading.Event()
        tstats = {"steps": 0, "rounds": 0, "preempted": 0}
        ended = threading.Condition()

        def wait_for_no_request():
            with ended:
                ended.wait_for(lambda: not svc.activity.should_yield() or tstop.is_set(), 0.05)
        th = threading.Thread(target=_trainer_loop, name="trainer", daemon=True,
                              args=(eng, examples, tgo, tstop, svc.activity.should_yield, wait_for_no_request, tstats))
        th.start()
        times.tokens = []
        inf.generate([{"role": "user", "content": "x"}], GenerationParams(max_tokens=a.new))  # graphs
        tgo.set()
        t0 = time.perf_counter()
        while tstats["steps"] < a.warmup_steps and time.perf_counter() - t0 < 300:
            time.sleep(0.05)
        tgo.clear()
        end = time.monotonic() + 600
        while not pready.wait(1.0):
            if not proc.is_alive() or time.monotonic() > end:
                raise SystemExit(f"the training process did not start (exit code {proc.exitcode})")
        time.sleep(1.0)
        # A chat in flight is told to the training process in the "process" condition, where the
        # serving process's own tracker marks it: the same moment for both trainers (over HTTP
        # once the body is in, MarkChatInFlight; else when generate starts).
        tracked, cond_now = svc.activity.request, {"c": "off"}

        @contextlib.contextmanager
        def request_told():
            told = cond_now["c"] == "process"
            if told:
                in_flight.value += 1
            try:
                with tracked():
                    yield
            finally:
                if told:
                    last_request.value = time.monotonic()
                    in_flight.value -= 1
                with ended:
                    ended.notify_all()
        svc.activity.request = request_told
        if a.http:
            url, server = serve_http(svc)
            here, there = ctx.Pipe()
            client = ctx.Process(target=_client_main, args=(url, there), daemon=True)
            client.start()
            here.send(("run", 3, a.new))  # warm-up: connections, the route's first calls
            here.recv()

        def http_block(out, cond, n):
            cond_now["c"] = cond
            here.send(("run", n, a.new))
            out.extend(here.recv())

        def one_request(out, cond):
            cond_now["c"] = cond
            times.tokens = []
            time.sleep(random.uniform(0.02, 0.08))  # an idle gap: training resumes in it
            t0 = time.perf_counter()
            inf.generate([{"role": "user", "content": "x"}], GenerationParams(max_tokens=a.new))
            tt = times.tokens
            out.append({"ttft": tt[0] - t0, "gaps": [y - x for x, y in zip(tt, tt[1:])]})

        data = {c: [] for c in CONDITIONS}
        random.seed(0)
        tstats.update(steps=0, rounds=0, preempted=0)
        p0 = psteps.value
        last_request.value = time.monotonic()  # both trainers start the blocks with the user active
        k = CONDITIONS.index(a.first)
        first = list(CONDITIONS[k:] + CONDITIONS[:k])
        for rnd in range(a.rounds):
            order = first if rnd % 2 == 0 else list(reversed(first))
            for cond in order:
                (tgo.set if cond == "thread" else tgo.clear)()
                (pgo.set if cond == "process" else pgo.clear)()
                time.sleep(0.7)  # a round of the other condition (≤ 0.5 s) ends; this one's starts
                if a.http:
                    http_block(data[cond], cond, a.per_block)
                else:
                    for _ in range(a.per_block):
                        one_request(data[cond], cond)
            print(f"round {rnd + 1}/{a.rounds}", flush=True)
        tgo.clear()
        pgo.clear()
        time.sleep(0.7)
        in_blocks = {"thread": tstats["steps"], "process": psteps.value - p0}
        # training alone, no requests: a step's own speed in a thread and in the other process,
        # both with the user away
        eng.idle_for = lambda: math.inf
        last_request.value = 0.0
        alone = {}
        for cond, go_, count in (("thread", tgo, lambda: tstats["steps"]), ("process", pgo, lambda: psteps.value)):
            go_.set()
            time.sleep(2.0)  # past the round in progress: count whole rounds from here
            n0, t0 = count(), time.perf_counter()
            time.sleep(a.alone_s)
            alone[cond] = (count() - n0) / (time.perf_counter() - t0)
            go_.clear()
            time.sleep(0.7)
        res["training_alone_steps_per_s"] = alone
        if a.http:
            here.send(("stop",))
            client.join(30)
            server.should_exit = True
        tstop.set()
        pstop.set()
        pgo.set()
        th.join(30)
        try:
            pstats = q.get(timeout=60)
        except Exception:
            pstats = {}
        proc.join(30)
        svc.close()

    out, rows = {}, []
    for cond in CONDITIONS:
        rs = data[cond]
        gaps = [g for r in rs for g in r["gaps"]]
        ttft = [1e3 * r["ttft"] for r in rs]
        out[cond] = {"requests": len(rs), "ttft_p50_ms": C.med(ttft), "ttft_p99_ms": C.pct(ttft, 99),
                     "ttft_max_ms": max(ttft), "token_p50_ms": 1e3 * C.med(gaps), "token_p99_ms": 1e3 * C.pct(gaps, 99),
                     "decode_tok_s": len(gaps) / sum(gaps), "ttft_ms": [round(x, 2) for x in ttft]}
    out["thread"]["training_steps"] = tstats  # the blocks and the training-alone phase
    out["process"]["training_steps"] = pstats
    res["training_steps_in_blocks"] = in_blocks
    for cond in CONDITIONS:
        d, o = out[cond], out["off"]
        rows.append([cond, d["requests"], f"{d['ttft_p50_ms']:.2f}", f"{d['ttft_p99_ms']:.2f}", f"{d['ttft_max_ms']:.1f}",
                     f"{d['ttft_p50_ms'] - o['ttft_p50_ms']:+.2f}", f"{d['ttft_p99_ms'] - o['ttft_p99_ms']:+.2f}",
                     f"{d['token_p50_ms']:.3f}", f"{d['token_p99_ms']:.3f}", f"×{d['decode_tok_s'] / o['decode_tok_s']:.3f}"])
    print(f"chat beside the engine in a thread vs a process, {a.shape}{', over HTTP' if a.http else ''}, "
          f"256 prompt + {a.new} new ({res['device']}); "
          f"training steps in the blocks: {in_blocks}; training alone, steps/s: "
          f"{ {k: round(v, 2) for k, v in res['training_alone_steps_per_s'].items()} }")
    C.table(rows, ["condition", "n", "TTFT p50", "p99", "max", "p50 added", "p99 added", "token p50", "token p99",
                   "decode"])
    res["results"] = out
    C.write(res, "gpu_trainer_process.json")


if __name__ == "__main__":
    main()
