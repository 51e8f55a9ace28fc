"""Issue 6, question 1: what a full training backlog costs chat on the GPU.

idletune's real service (random-weight model, GPU path installed) serves chat requests — a
256-token prompt, 128 new tokens, greedy — from 1 or 8 concurrent clients, while a trainer
thread keeps the engine busy (8 × 512-token examples per step, restarted whenever no request is
in flight: a backlog that never runs dry and never waits for idle time). Conditions "off" and
"backlog" alternate round by round in one run. Per-token times are taken where tokens leave the
decoder. Reported: time to first token and inter-token latency, p50 and p99, decode throughput,
and backlog/off ratios. Every pause of over 50 ms inside a request (with one client, also before
its first token) is listed as a stall, with the trainer rounds and garbage collections that
overlapped it.

The trainer thread sleeps while a request is in flight and wakes when one returns (the service's
scheduler waits too); ``--poll-trainer`` makes it poll every 0.2 ms instead, as every run up to
CL did (py-spy in run CM: 1.2–1.4 s of 75 held the interpreter lock in that loop).

``--sample-threads``: every thread's Python stack is sampled each millisecond while measuring;
gaps of over 8 ms between samples (the interpreter lock held by a thread in C code) are listed
with the stacks just before and after (the sampler's own contention slows decoding a little).

Usage: python bench/gpu_inference_impact.py [OUT.json] [--shape qwen2.5-0.5b] [--rounds 8]
       [--clients 1,8] [--per-client 4,2] [--warmup-steps 3] [--sample-threads]
       [--micro-batch-tokens 2048]   (training in bounded memory: layers in units; runs BS, BV, BZ)
       [--mode full]   (full fine-tuning: every weight trains, the live copy served)
       [--trainer process [--unsplit-auto]]   (the product's trainer process; its automatic size as before run EQ)
"""
import argparse
import gc
import random
import tempfile
import threading
import time

import torch

import gpu_common as C
from gpu_training import fixed_batch


def sm_clock() -> int | None:
    """The GPU's current SM clock (MHz) through NVML, if available: an idle GPU clocks down."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetClockInfo(pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device()),
                                             pynvml.NVML_CLOCK_SM)
    except Exception:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--training-compile", default="auto", help="training.compile: auto (graphs on a GPU), graphs, on, off")
    ap.add_argument("--mode", default="lora", help="training.mode: lora, full (every weight trains; the fast "
                    "decoder serves the live copy) or hybrid")
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="training.micro_batch_tokens (0: automatic; "
                    "set: training in bounded memory, layers compiled in units)")
    ap.add_argument("--no-workspace-fix", action="store_true", help="capture the decoder's graphs with cuBLAS's "
                    "cached workspace, as before run W: reproduces the crash of run N under graphed training")
    ap.add_argument("--trainer", default="thread", help="training.trainer: thread (the engine in this process, "
                    "as every run up to EI), or process (the product's trainer process: the engine's calls go over a "
                    "pipe, and the examples are real text it encodes itself)")
    ap.add_argument("--unsplit-auto", action="store_true", help="with --trainer process: its automatic micro-batch "
                    "size as before run EQ (up to 16384 tokens: unsplit, layer by layer, every activation kept) "
                    "instead of at most 2048 tokens in units of 4 layers, cheap activations recomputed")
    ap.add_argument("--per-client", default="4,2", help="requests per client per block, for each --clients entry")
    ap.add_argument("--warmup-steps", type=int, default=3, help="training steps before measuring (the first "
                    "compiles and records the graphs)")
    ap.add_argument("--rehearse-preemptions", type=int, default=0, help="after the warm-up, this many training "
                    "rounds stopped at a random poll (a layer boundary or loss chunk, forward or backward) with no "
                    "request: does a first preemption cost the first request under training?")
    ap.add_argument("--poll-trainer", action="store_true", help="the trainer thread polls every 0.2 ms for the "
                    "end of a request, as in runs up to CL (it wakes 5000 times a second, taking the interpreter "
                    "lock each time); by default it sleeps until a request ends, as the service's scheduler does")
    ap.add_argument("--sample-threads", action="store_true", help="sample every thread's Python stack each "
                    "millisecond while measuring; list the gaps of over 8 ms between samples (the interpreter "
                    "lock held elsewhere) with the stacks just before and after")
    a = ap.parse_args()
    if a.unsplit_auto and a.trainer != "process":
        ap.error("--unsplit-auto is for --trainer process (a trainer thread's automatic size is unsplit already)")
    from idletune.inference import GenerationParams

    res = C.header()
    with tempfile.TemporaryDirectory() as tmp:
        if a.no_workspace_fix:
            import contextlib

            import idletune.gpu.decoder as D

            D._own_cublas_workspace = contextlib.nullcontext
        if a.unsplit_auto:
            import idletune.service as S
            from idletune.training.engine import AUTO_MOST_TOKENS

            AUTO_MOST_TOKENS["process"] = AUTO_MOST_TOKENS["thread"]  # read when the service builds its RemoteEngine
            shipped = S.training_compile_args
            S.training_compile_args = lambda tc, how, auto_tokens=0: shipped(tc, how)  # layer by layer, all kept
        svc = C.service(a.shape, tmp, **{"training.compile": a.training_compile, "training.mode": a.mode,
                                         "training.micro_batch_tokens": a.micro_batch_tokens,
                                         "training.trainer": a.trainer})
        res["trainer"] = a.trainer
        res["auto_most_tokens"] = getattr(svc.engine, "auto_most_tokens", None)
        res["compile_layers"] = getattr(svc.engine, "compile_layers", None)
        res["mode"] = svc.weights.mode
        res["training_graphs"] = svc.engine.graphs
        res["gpu_path"] = svc.inference.fast is not None
        inf, eng = svc.inference, svc.engine
        tok = svc.tokenizer
        prompt = torch.randint(100, len(tok) - 1, (256,)).tolist()
        inf.encode_chat = lambda messages: list(prompt)  # exactly 256 prompt tokens
        if a.trainer == "process":  # patching the encoder here would not reach the trainer process
            from gpu_trainer_checks import text_examples

            examples = text_examples(tok, n=8, length=512)
        else:
            examples = fixed_batch(tok, chat=False)
        times = threading.local()
        orig_emit = inf._emit

        def timed_emit(tokens, *args):
            def gen():
                for t in tokens:
                    times.tokens.append(time.perf_counter())
                    yield t
            return orig_emit(gen(), *args)
        inf._emit = timed_emit
        dec = inf.fast.decoder if inf.fast is not None else None
        if dec is not None:  # where a request's time to first token goes: host and device
            orig_prefill = dec.prefill

            def timed_prefill(prompt):
                t, e0 = time.perf_counter(), torch.cuda.Event(enable_timing=True)
                e0.record()
                out = orig_prefill(prompt)
                e1 = torch.cuda.Event(enable_timing=True)
                e1.record()
                times.prefill = (t, time.perf_counter(), e0, e1)
                return out
            dec.prefill = timed_prefill

        pauses = []  # (generation, seconds, training condition, start) of every garbage collection
        rounds = []  # (start, end, steps, preempted) of every trainer round: a timeline to lay stalls on

        def on_gc(phase, info, _t=[0.0]):
            if phase == "start":
                _t[0] = time.perf_counter()
            else:
                pauses.append((info["generation"], time.perf_counter() - _t[0], training.is_set(), _t[0]))
        training = threading.Event()
        gc.callbacks.append(on_gc)
        stop = threading.Event()
        in_round = threading.Event()  # set while the trainer thread is inside train_round
        request_ended = threading.Condition()  # notified when a request returns: the trainer resumes
        stats = {"steps": 0, "rounds": 0, "preempted": 0, "round_s_max": 0.0, "rounds_over_2s": 0}

        def trainer():
            while not stop.is_set():
                in_round.set()  # before the check: a round seen not to run has not started
                if not training.is_set() or svc.activity.should_yield():
                    in_round.clear()
                    if a.poll_trainer:
                        time.sleep(0.0002)
                    elif not training.is_set():
                        training.wait(0.05)
                    else:  # asleep until a request ends: no 5 kHz wake-ups competing for the lock
                        with request_ended:
                            request_ended.wait_for(lambda: not svc.activity.should_yield() or stop.is_set(), 0.05)
                    continue
                start = time.perf_counter()
                try:
                    r = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 0.5)  # short rounds: "off" starts clean
                finally:
                    in_round.clear()
                rounds.append((start, time.perf_counter(), r.steps, r.preempted))
                t = time.perf_counter() - start  # a long round: compiling or recording graphs
                stats["round_s_max"] = round(max(stats["round_s_max"], t), 2)
                stats["rounds_over_2s"] += int(t > 2)
                stats["steps"] += r.steps
                stats["rounds"] += 1
                stats["preempted"] += int(r.preempted)
        th = threading.Thread(target=trainer, daemon=True, name="trainer")
        th.start()

        def stall_record(r, cond, nc, over=0.05):
            """A request's longest pause between tokens (with one client, or before its first one),
            if over ``over`` seconds, with what the trainer and the garbage collector did meanwhile.
            (With several clients the time to the first token is mostly queueing behind the others.)"""
            marks = ([r["start"]] if nc == 1 else []) + r["tokens_at"]
            if len(marks) < 2:
                return None
            i = max(range(len(marks) - 1), key=lambda k: marks[k + 1] - marks[k])
            lo, hi = marks[i], marks[i + 1]
            if hi - lo <= over:
                return None
            return {"condition": cond, "clients": nc, "at_s": round(lo - t_run, 3), "ms": round(1e3 * (hi - lo), 1),
                    "before_token": i + (nc != 1),
                    "rounds": [(round(b - t_run, 3), round(e - t_run, 3), n, p) for b, e, n, p in rounds if b < hi and e > lo],
                    "gc": [(g, round(1e3 * d, 1)) for g, d, _, b in pauses if b < hi and b + d > lo]}

        def one_request(out, first=False):
            times.tokens = []
            time.sleep(random.uniform(0.02, 0.08))  # an idle gap: training resumes in it
            busy = getattr(eng, "_step_thread", None) is not None  # (not seen from here with a trainer process)
            clock = sm_clock()
            t0 = time.perf_counter()
            try:
                c = inf.generate([{"role": "user", "content": "x"}], GenerationParams(max_tokens=a.new))
            finally:
                with request_ended:  # after generate: the request is no longer in flight
                    request_ended.notify_all()
            tt = times.tokens
            parts = {}
            if dec is not None:
                pt, pe, e0, e1 = times.prefill
                e1.synchronize()
                parts = {"to_prefill_ms": 1e3 * (pt - t0), "prefill_call_ms": 1e3 * (pe - pt),
                         "prefill_gpu_ms": e0.elapsed_time(e1), "after_prefill_ms": 1e3 * (tt[0] - pe)}
            out.append({"parts": parts, "ttft": tt[0] - t0, "gaps": [b - x for x, b in zip(tt, tt[1:])], "total": time.perf_counter() - t0,
                        "n": c.completion_tokens, "training_in_step_at_arrival": busy,
                        "first_of_block": first, "gpu_clock_mhz_before": clock, "start": t0, "tokens_at": list(tt)})

        times.tokens = []
        inf.generate([{"role": "user", "content": "x"}], GenerationParams(max_tokens=a.new))  # warm-up, graphs
        training.set()  # warm-up of training: optimizer state, and compiling (training.compile = "auto")
        t0 = time.perf_counter()
        while stats["steps"] < a.warmup_steps and time.perf_counter() - t0 < 300:
            time.sleep(0.05)
        training.clear()
        while in_round.is_set():  # the trainer's last round ends (up to its 0.5 s deadline)
            time.sleep(0.01)
        if a.rehearse_preemptions:
            real_yield, boundaries = eng.should_yield, [0]

            def rehearsed_yield():
                # True at one random poll of each round: a layer boundary or a loss chunk of the
                # forward or backward pass mostly (about 70 a step at 0.5B), or a round's own
                # polls between steps (then no pass is cut)
                boundaries[0] -= 1
                return boundaries[0] == 0 or real_yield()
            eng.should_yield = rehearsed_yield
            try:
                for _ in range(a.rehearse_preemptions):
                    boundaries[0] = random.randint(1, 60)
                    r = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 0.5)
                    res.setdefault("rehearsed", []).append(r.preempted)
            finally:
                eng.should_yield = real_yield
            print("rehearsed preemptions:", res["rehearsed"])
        res["training_warmup_s"] = round(time.perf_counter() - t0, 1)

        def pause_probe(n=4):
            """Training off: TTFT of a request after a 0.7 s pause, made from a new thread (as the
            blocks below do) or from this one; and right after another request, from this one."""
            out = {"new_thread": [], "same_thread": [], "back_to_back": []}
            for _ in range(n):
                for kind in out:
                    if kind != "back_to_back":
                        time.sleep(0.7)
                    got = []
                    if kind == "new_thread":
                        th = threading.Thread(target=one_request, args=(got,))
                        th.start()
                        th.join()
                    else:
                        one_request(got)
                    out[kind].append(round(1e3 * got[0]["ttft"], 1))
            return out
        res["pause_probe_ttft_ms"] = pause_probe()
        print("TTFT after a 0.7 s pause (training off), ms:", res["pause_probe_ttft_ms"])
        stats.update(steps=0, rounds=0, preempted=0, round_s_max=0.0, rounds_over_2s=0)
        t_run = time.perf_counter()
        gaps_seen = []
        if a.sample_threads:
            import sys
            import traceback

            def stacks():
                me = threading.get_ident()
                names = {t.ident: t.name for t in threading.enumerate()}
                return {names.get(i, str(i)): [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                                               for f in traceback.extract_stack(fr, limit=40)[-8:]]
                        for i, fr in sys._current_frames().items() if i != me}

            def sampler():
                prev_t, prev = time.perf_counter(), stacks()
                while not stop.is_set() and len(gaps_seen) < 20:
                    time.sleep(0.001)
                    t, now = time.perf_counter(), stacks()
                    if t - prev_t > 0.008:
                        gaps_seen.append({"at_s": round(prev_t - t_run, 3), "ms": round(1e3 * (t - prev_t), 1),
                                          "training": training.is_set(), "before": prev, "after": now})
                    prev_t, prev = t, now
            threading.Thread(target=sampler, daemon=True, name="sampler").start()
        pauses.clear()
        random.seed(0)
        blocks = []  # per measured block: CUDA allocator calls and preemptions in it, and its slowest TTFT

        def alloc_counts():
            m = torch.cuda.memory_stats()
            return {k: m.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries",
                                              "num_sync_all_streams")}
        for nc, per_client in zip([int(x) for x in a.clients.split(",")], [int(x) for x in a.per_client.split(",")]):
            data = {"off": [], "backlog": []}
            for rnd in range(a.rounds):
                for cond in (("off", "backlog") if rnd % 2 == 0 else ("backlog", "off")):
                    (training.set if cond == "backlog" else training.clear)()
                    time.sleep(0.7)  # a round in flight (≤ 0.5 s) ends before "off" is measured
                    out = data[cond]

                    def client():
                        for j in range(per_client):
                            one_request(out, first=j == 0)
                    ts = [threading.Thread(target=client) for _ in range(nc)]
                    n0, a0, p0 = len(out), alloc_counts(), stats["preempted"]
                    [t.start() for t in ts]
                    [t.join() for t in ts]
                    a1 = alloc_counts()
                    blocks.append({"clients": nc, "round": rnd, "condition": cond,
                                   "ttft_max_ms": round(1e3 * max((r["ttft"] for r in out[n0:]), default=float("nan")), 2),
                                   "preempted": stats["preempted"] - p0, **{k: a1[k] - a0[k] for k in a1}})
            training.clear()

            def summary(rs):
                gaps = [g for r in rs for g in r["gaps"]]
                return {"requests": len(rs), "ttft_p50_ms": 1e3 * C.med([r["ttft"] for r in rs]),
                        "ttft_p99_ms": 1e3 * C.pct([r["ttft"] for r in rs], 99),
                        "ttft_max_ms": 1e3 * max((r["ttft"] for r in rs), default=float("nan")),
                        "token_p50_ms": 1e3 * C.med(gaps), "token_p99_ms": 1e3 * C.pct(gaps, 99),
                        "total_p99_ms": 1e3 * C.pct([r["total"] for r in rs], 99),
                        "decode_tok_s": sum(len(r["gaps"]) for r in rs) / sum(sum(r["gaps"]) for r in rs),
                        "training_in_step_at_arrival": sum(r["training_in_step_at_arrival"] for r in rs),
                        # the first request after the 0.7 s pause that separates conditions vs the rest
                        "ttft_p99_ms_first_of_block": 1e3 * C.pct([r["ttft"] for r in rs if r["first_of_block"]], 99),
                        "ttft_p99_ms_others": 1e3 * C.pct([r["ttft"] for r in rs if not r["first_of_block"]], 99),
                        "ttft_p50_ms_others": 1e3 * C.med([r["ttft"] for r in rs if not r["first_of_block"]]),
                        # requests with a pause of over 50 ms between two of their tokens, and the longest
                        "requests_with_token_gap_over_50ms": sum(1 for r in rs if r["gaps"] and max(r["gaps"]) > 0.05),
                        "longest_token_gap_ms": 1e3 * max((max(r["gaps"]) for r in rs if r["gaps"]), default=0.0),
                        "sm_clock_mhz_before_p50": C.med([r["gpu_clock_mhz_before"] for r in rs if r["gpu_clock_mhz_before"]]),
                        # TTFT in parts (ms): before the prefill call, the call, the prefill on the
                        # GPU (events on the serving stream), from the call's return to the token
                        "ttft_parts_first_of_block": [{k: round(v, 2) for k, v in r["parts"].items()}
                                                      for r in rs if r["first_of_block"] and r["parts"]],
                        "ttft_parts_others_p50": {k: round(C.med([r["parts"][k] for r in rs if not r["first_of_block"]]), 2)
                                                  for k in (rs[0]["parts"] if rs and rs[0]["parts"] else {})},
                        # the five slowest requests in parts: where a tail's time went
                        "ttft_parts_slowest": [{"ttft_ms": round(1e3 * r["ttft"], 2), "at_s": round(r["start"] - t_run, 3),
                                                "first_of_block": r["first_of_block"],
                                                **{k: round(v, 2) for k, v in r["parts"].items()}}
                                               for r in sorted(rs, key=lambda r: -r["ttft"])[:5]]}
            off, bl = summary(data["off"]), summary(data["backlog"])
            # each request's TTFT (ms, in order), so a p99 can be traced to the requests behind it
            res[f"ttft_ms_clients_{nc}"] = {c: [(round(1e3 * r["ttft"], 2), r["first_of_block"]) for r in rs]
                                            for c, rs in data.items()}
            res[f"clients_{nc}"] = {"off": off, "backlog": bl,
                                    "added_ttft_p99_ms": bl["ttft_p99_ms"] - off["ttft_p99_ms"],
                                    "added_ttft_p50_ms": bl["ttft_p50_ms"] - off["ttft_p50_ms"],
                                    "added_token_p99_ms": bl["token_p99_ms"] - off["token_p99_ms"],
                                    "decode_throughput_ratio": bl["decode_tok_s"] / off["decode_tok_s"]}
            for cond, rs in data.items():
                for r in rs:
                    stall = stall_record(r, cond, nc)
                    if stall and len(res.setdefault("stalls", [])) < 20:
                        res["stalls"].append(stall)
        stop.set()
        th.join(30)
        gc.callbacks.remove(on_gc)
        # rounds of over 2 s (compiling, recording graphs, or stuck): when each of their steps ended
        wall_of = time.time() - time.perf_counter()  # metrics carry wall-clock times
        steps_at = [m["time"] - wall_of for m in eng.metrics_history(100000)]
        res["long_rounds"] = [{"start_s": round(b - t_run, 3), "s": round(e - b, 2), "steps": n, "preempted": p,
                               "steps_end_s": [round(t - t_run, 3) for t in steps_at if b <= t <= e + 0.01]}
                              for b, e, n, p in rounds if b >= t_run and e - b > 2]
        res["gc_pauses"] = {f"gen{g}": {"count": sum(1 for x in pauses if x[0] == g),
                                        "max_ms": 1e3 * max([x[1] for x in pauses if x[0] == g], default=0.0),
                                        "over_20ms": sum(1 for x in pauses if x[0] == g and x[1] > 0.02)}
                            for g in (0, 1, 2)}
        res["gc_full_over_20ms"] = [(round(b - t_run, 3), round(1e3 * d, 1)) for g, d, _, b in pauses if g == 2 and d > 0.02]
        res["training"] = dict(stats)
        res["blocks"] = blocks
        res["sampler_gaps"] = gaps_seen
        from idletune.gpu.training import compilations
        res["compilations_ended"] = compilations()  # seen by the collector hold (0: torch reports none)
        svc.close()
    rows = []
    for nc in a.clients.split(","):
        r = res[f"clients_{nc}"]
        for cond in ("off", "backlog"):
            s = r[cond]
            rows.append([nc, cond, s["requests"], s["ttft_p50_ms"], s["ttft_p99_ms"], s["token_p50_ms"], s["token_p99_ms"],
                         s["decode_tok_s"], s["training_in_step_at_arrival"]])
        rows.append([nc, "backlog − off", "", r["added_ttft_p50_ms"], r["added_ttft_p99_ms"], "", r["added_token_p99_ms"],
                     f"×{r['decode_throughput_ratio']:.3f}", ""])
    print(f"chat with training off vs full backlog, {a.shape}, 256 prompt + {a.new} new ({res['device']}); "
          f"training graphed: {res['training_graphs']}; "
          f"training: {res['training']}; compilations ended: {res['compilations_ended']}")
    C.table(rows, ["clients", "condition", "n", "TTFT p50", "TTFT p99", "token p50", "token p99", "decode tok/s", "arrived mid-step"])
    for nc in a.clients.split(","):
        r = res[f"clients_{nc}"]
        print(f"{nc} client(s): TTFT max off/backlog {r['off']['ttft_max_ms']:.1f}/{r['backlog']['ttft_max_ms']:.1f} ms; "
              f"TTFT p99 first-of-block off/backlog "
              f"{r['off']['ttft_p99_ms_first_of_block']:.1f}/{r['backlog']['ttft_p99_ms_first_of_block']:.1f} ms, "
              f"others p50 {r['off']['ttft_p50_ms_others']:.1f}/{r['backlog']['ttft_p50_ms_others']:.1f}, "
              f"p99 {r['off']['ttft_p99_ms_others']:.1f}/{r['backlog']['ttft_p99_ms_others']:.1f} ms; "
              f"SM clock before p50 {r['off']['sm_clock_mhz_before_p50']}/{r['backlog']['sm_clock_mhz_before_p50']} MHz; "
              f"requests with a token gap > 50 ms {r['off']['requests_with_token_gap_over_50ms']}/"
              f"{r['backlog']['requests_with_token_gap_over_50ms']}, longest gap "
              f"{r['off']['longest_token_gap_ms']:.0f}/{r['backlog']['longest_token_gap_ms']:.0f} ms")
    for nc in a.clients.split(","):
        for cond in ("off", "backlog"):
            r = res[f"clients_{nc}"][cond]
            print(f"{nc} client(s), {cond}: TTFT parts, others p50 {r['ttft_parts_others_p50']}; first of block:")
            for parts in r["ttft_parts_first_of_block"][:8]:
                print("   ", parts)
            print(f"{nc} client(s), {cond}: the slowest requests in parts:")
            for parts in r["ttft_parts_slowest"]:
                print("   ", parts)
    print("garbage collections while measuring:", res["gc_pauses"], "; full ones over 20 ms (at s, ms):",
          res["gc_full_over_20ms"])
    print("per block (clients, round, condition): slowest TTFT ms, preempted rounds, cudaMalloc / cudaFree calls, "
          "allocation retries, all-stream syncs:")
    for b in res["blocks"]:
        print(f"   {b['clients']} {b['round']:2d} {b['condition']:8s} {b['ttft_max_ms']:7.2f} {b['preempted']:3d} "
              f"{b['num_device_alloc']:4d} {b['num_device_free']:4d} {b['num_alloc_retries']:3d} {b['num_sync_all_streams']:3d}")
    for lr in res["long_rounds"]:
        print("long trainer round:", lr)
    for st in res.get("stalls", []):  # each with the trainer rounds (start, end s, steps, preempted) and collections
        print("stall:", st)
    for g in res.get("sampler_gaps", []):
        print(f"no sample for {g['ms']} ms at {g['at_s']} s (training {'on' if g['training'] else 'off'}); stacks before:")
        for name, st in g["before"].items():
            print("   ", name, " <- ".join(reversed(st)))
        print("  after:")
        for name, st in g["after"].items():
            print("   ", name, " <- ".join(reversed(st)))
    C.write(res, "gpu_inference_impact.json")


if __name__ == "__main__":
    main()
