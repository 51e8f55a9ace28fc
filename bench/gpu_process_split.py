"""Would training in a process of its own cost chat less than training in a thread?

The added time to first token under a backlog comes partly from the interpreter lock, which the
serving thread shares with training's Python (docs/BENCHMARKS.md, "What is left"). A trainer in
another process would share no lock. But two processes on one GPU (without NVIDIA's MPS) are two
CUDA contexts, which the GPU runs in time slices instead of side by side, and stream priorities
do not reach across contexts. This measures that part alone, with no Python in the way: the
"training" is one CUDA graph of bf16 products sized to take about a millisecond (a decoder
layer's work on a large micro-batch), replayed one at a time (the next launched once the last
has run) on a low-priority stream, about as idletune's engine keeps a layer queued.

Conditions, alternated round by round in one run (requests: FastDecoder on a random-weight
model, a 256-token prompt, 128 new tokens, greedy, on a high-priority stream):
- ``off``: nothing else on the GPU;
- ``thread`` / ``process``: the training loop in a thread of this process / in another process,
  **gated** as the engine is: it stops launching while a request is in flight;
- ``thread_ungated`` / ``process_ungated``: the loop never stops (what the GPU alone does with
  two streams of one context / two contexts).
Each round starts one condition later than the one before, and a request's clock starts after
its own stream is idle. Run DV (fourteenth session) synchronized the whole device instead, which
in the thread conditions also waited for the trainer's graph in flight (one context) and in the
process conditions did not, favouring the thread; and its rounds always ran in one order, so
``off`` always followed the ungated process. Fixed since.

Usage: python bench/gpu_process_split.py [OUT.json] [--shape qwen2.5-0.5b] [--rounds 5] [--per-round 20]
"""
import argparse
import multiprocessing as mp
import threading
import time

import torch

import gpu_common as C
from gpu_decode import one_request  # given the serving stream (see the docstring: run DV)

CONDITIONS = ("off", "thread", "process", "thread_ungated", "process_ungated")


def training_graph(pairs: int | None = None, target_ms: float = 1.0, tokens: int = 4096, hidden: int = 896,
                   inner: int = 4864):
    """A CUDA graph of ``pairs`` pairs of products of a decoder layer's shapes on ``tokens``
    tokens (None: as many as take about ``target_ms``); returns (graph, measured ms, pairs,
    the tensors it uses)."""
    a = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(hidden, inner, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(inner, hidden, device="cuda", dtype=torch.bfloat16)
    h = torch.empty(tokens, inner, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(tokens, hidden, device="cuda", dtype=torch.bfloat16)

    def work(n):
        for _ in range(n):
            torch.mm(a, w1, out=h)
            torch.mm(h, w2, out=out)

    def capture(n):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            work(n)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            work(n)
        return g

    def time_ms(g):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            g.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / 50 * 1e3

    n = pairs
    if n is None:
        g1 = capture(1)
        time_ms(g1)
        n = max(1, round(target_ms / time_ms(g1)))
    g = capture(n)
    time_ms(g)
    return g, time_ms(g), n, (a, w1, w2, h, out)


def train_loop(pairs, go, stop, ready=None, info=None):
    """Replay the training graph on a low-priority stream, one graph at a time (the next one
    launched once the last has run), until ``stop``; while ``go`` is clear, wait (another
    condition is measured, or, gated, a request is in flight)."""
    torch.cuda.set_device(0)
    lo = torch.cuda.Stream(priority=0)
    with torch.cuda.stream(lo):
        g, ms, n, _keep = training_graph(pairs)
        if info is not None:
            info["graph_ms"], info["products"] = ms, 2 * n
        if ready is not None:
            ready.set()
        done = torch.cuda.Event()
        replays = 0
        while not stop.is_set():
            if not go.is_set():
                go.wait(0.05)
                continue
            g.replay()
            done.record(lo)
            done.synchronize()
            replays += 1
        if info is not None:
            info["replays"] = replays


def _process_main(pairs, go, stop, ready, q):
    info = {}
    train_loop(pairs, go, stop, ready, info)
    q.put(info)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    if args.new < 2 or args.rounds < 1 or args.per_round < 1:
        raise SystemExit("--new must be at least 2, --rounds and --per-round at least 1")
    from idletune.gpu.decoder import FastDecoder

    res = C.header()
    res.update(question="training in a thread vs in another process: chat beside it", shape=args.shape)
    hi = torch.cuda.Stream(priority=-1)
    with torch.cuda.stream(hi):
        model = C.build(args.shape)
        dec = FastDecoder(model, "live", max_len=1024, stream=hi)
        dec.warm_up()
    prompt = [int(x) for x in torch.randint(100, 20000, (256,))]
    with torch.cuda.stream(hi):
        for _ in range(3):
            one_request(dec, prompt, args.new, hi)
        _, graph_ms, pairs, _keep = training_graph()  # sized once: every worker runs the same graph
        del _keep
    res["training_graph_ms"] = graph_ms

    ctx = mp.get_context("spawn")
    workers = {}
    for cond in CONDITIONS[1:]:
        if cond.startswith("thread"):
            go, stop, ready, info = threading.Event(), threading.Event(), threading.Event(), {}
            t = threading.Thread(target=train_loop, args=(pairs, go, stop, ready, info), daemon=True)
            workers[cond] = dict(go=go, stop=stop, info=info, handle=t)
        else:
            go, stop, ready, q = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
            t = ctx.Process(target=_process_main, args=(pairs, go, stop, ready, q), daemon=True)
            workers[cond] = dict(go=go, stop=stop, q=q, handle=t)
        t.start()
        end = time.monotonic() + 300
        while not ready.wait(1.0):
            if not t.is_alive() or time.monotonic() > end:
                raise SystemExit(f"{cond}: the training loop did not start")
    print(f"training graph: {graph_ms:.2f} ms ({2 * pairs} products)", flush=True)
    print(f"training graph: {workers['thread']['info'].get('graph_ms', 0):.2f} ms "
          f"({workers['thread']['info'].get('products')} products)", flush=True)

    samples = {c: {"ttft": [], "tok": []} for c in CONDITIONS}
    for r in range(args.rounds):
        k = r % len(CONDITIONS)  # each round starts one condition later: none always follows another
        for cond in CONDITIONS[k:] + CONDITIONS[:k]:
            w = workers.get(cond)
            gated = w is not None and not cond.endswith("ungated")
            if w is not None:
                w["go"].set()
                time.sleep(0.3)  # the loop running
            for _ in range(args.per_round):
                if gated:
                    w["go"].clear()  # a request in flight: the trainer stops after its queued graph
                with torch.cuda.stream(hi):
                    ttft, tok = one_request(dec, prompt, args.new, hi)
                if gated:
                    w["go"].set()
                    time.sleep(0.02)  # training runs between requests
                samples[cond]["ttft"].append(ttft * 1e3)
                samples[cond]["tok"].append(tok * 1e3)
            if w is not None:
                w["go"].clear()
                time.sleep(0.05)  # its graph in flight (about 1 ms) ends before the next condition
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    for cond, w in workers.items():
        w["stop"].set()
        w["go"].set()
        if cond.startswith("process"):
            try:
                w["info"] = w["q"].get(timeout=30)
            except Exception:
                w["info"] = {}
        w["handle"].join(timeout=30)

    rows, out = [], {}
    for cond in CONDITIONS:
        s = samples[cond]
        d = {"ttft_p50": C.pct(s["ttft"], 50), "ttft_p99": C.pct(s["ttft"], 99), "ttft_max": max(s["ttft"]),
             "tok_p50": C.pct(s["tok"], 50), "tok_p99": C.pct(s["tok"], 99),
             "tok_s": 1e3 / C.med(s["tok"]), "n": len(s["ttft"]),
             "trainer_replays": (workers.get(cond) or {}).get("info", {}).get("replays")}
        out[cond] = d
        rows.append([cond, f"{d['ttft_p50']:.2f}", f"{d['ttft_p99']:.2f}", f"{d['ttft_max']:.2f}",
                     f"{d['ttft_p99'] - out['off']['ttft_p99']:+.2f}", f"{d['tok_p50']:.3f}",
                     f"{d['tok_s'] / out['off']['tok_s']:.3f}", str(d["trainer_replays"])])
    C.table(rows, ["condition", "TTFT p50 ms", "p99", "max", "p99 added", "ms/token p50", "decode ×off",
                   "training graphs run"])
    res["results"] = out
    res["samples"] = samples
    C.write(res, args.out or "gpu_process_split.json")


if __name__ == "__main__":
    main()
