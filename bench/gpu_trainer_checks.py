"""``training.trainer = "process"`` on a GPU: the product's trainer process, checked and timed.

The option was built and tested on the CPU (fourteenth session); what a GPU run must check
(docs/BENCHMARKS.md, "Fourteenth session"), on idletune's own service (random-weight model):

1. It starts: every tensor mapped from the serving process (CUDA IPC), the decoder layers
   compiled and graphed in the trainer process. Time to ready, and the GPU memory it adds
   (its CUDA context, its compiled graphs, a step's activations: the device's used memory,
   as ``torch.cuda.mem_get_info`` sees it from the serving process).
2. It trains as fast as the trainer thread (the same engine, examples and settings; the
   service built again with ``trainer = "thread"`` after the first is closed): steps a second
   with the user away, and the memory the thread adds for comparison.
3. It trains the served tensors: the candidate adapter in the serving process moved; a
   publish (WeightUpdater, in the serving process) then serves it: the fast path's logits
   against the PEFT forward of the serving process's own model.
4. A rollback in the middle of a round: it waits for the trainer's step (the model lock is
   both processes'), the round is not published, and the live adapter is then exactly the
   version rolled back to.
5. A trainer process that dies (SIGKILL) between calls: its memory given back, the call
   reported, the next call starting a new one (time to ready again) that trains.
6. (Since run FC.) The serving process takes the model lock in the middle of a round: how long
   it waits; then the trainer process killed in the middle of a step: the round reported, the
   lock free, a rollback exact and served, a new trainer process training.

Examples are real text (random token ids decoded), encoded by the engine in whichever process
trains: the bench's usual patch of the encoder would not reach a spawned process.

Usage: python bench/gpu_trainer_checks.py [OUT.json] [--shape qwen2.5-0.5b] [--alone-s 10] [--warmup-steps 3] [--skip-thread]
       [--micro-batch-tokens N] [--skip-failures]
"""
import argparse
import copy
import os
import signal
import tempfile
import threading
import time

import torch

import gpu_common as C

SETTINGS = {"training.max_steps": 100_000, "training.target_loss": 0.0, "training.target_loss_text": 0.0}


def used_gb() -> float:
    if not torch.cuda.is_available():  # a CPU run checks the logic only
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 1e9


def text_examples(tok, n=8, length=500, seed=0):
    from idletune.examples import TrainingExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(100, len(tok) - 1, (length,), generator=g).tolist()
        ex = TrainingExample.from_text(tok.decode(ids))
        ex.id = i + 1
        out.append(ex)
    return out


def served_vs_peft(svc, which_live=True) -> dict:
    """The next request's logits from the fast path against the PEFT forward with the live adapter."""
    from idletune.training import adapters

    fast = svc.inference.fast
    if fast is None:
        return {"rel_err": None, "argmax_same": None}  # no fast path (a CPU run)
    prompt = torch.randint(100, len(svc.tokenizer) - 1, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    with fast.session():
        got = fast.decoder.prefill(prompt).float()
    ids = torch.tensor([prompt], device="cuda")
    with svc.engine.lock:
        adapters.activate(svc.model, adapters.LIVE)
        with torch.no_grad():
            ref = svc.model(input_ids=ids).logits[0, -1].float()
            # both against the same forward in float32 (a copy): is the fast path's difference
            # from PEFT's bf16 forward of bf16's size, or more?
            try:
                exact = copy.deepcopy(svc.model).float()
            except Exception as e:  # the thread's compiled layers may not copy
                exact = repr(e)[:200]

    def err(x, y):
        return round(float((x - y).norm() / y.norm()), 5)
    out = {"rel_err": err(got, ref), "argmax_same": bool(got.argmax() == ref.argmax())}
    if isinstance(exact, str):
        return dict(out, f32_error=exact)
    with torch.no_grad():
        f32 = exact(input_ids=ids).logits[0, -1].float()
    del exact
    torch.cuda.empty_cache()
    return dict(out, fast_vs_f32=err(got, f32), peft_bf16_vs_f32=err(ref, f32),
                argmax_same_f32=[bool(got.argmax() == f32.argmax()), bool(ref.argmax() == f32.argmax())])


def rate(eng, examples, seconds: float) -> dict:
    """Steps a second over rounds with the user away (whole rounds, each to its deadline); and
    within the rounds, as the engine timed them (``in_rounds``: without what a call costs
    around a round — with a trainer process, the pipe and the result sent back)."""
    steps, inside, t0 = 0, 0.0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        r = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 2.0)
        steps, inside = steps + r.steps, inside + r.seconds
    dt = time.perf_counter() - t0
    return {"steps": steps, "seconds": round(dt, 2), "steps_per_s": round(steps / dt, 2),
            "in_rounds_s": round(inside, 2), "steps_per_s_in_rounds": round(steps / max(inside, 1e-9), 2)}


def lock_taken_mid_round(svc, examples, times: int = 20) -> dict:
    """The serving process takes the model lock while the trainer process trains (a publish, a
    rollback would): how long it waits for it (the trainer's step under way, whose work is
    done before the trainer lets go)."""
    eng, lock = svc.engine, svc.engine.lock
    took, out = [], {}
    th = threading.Thread(target=_round, args=(eng, examples, 6.0, out))
    th.start()
    time.sleep(1.0)
    for _ in range(times):
        t0 = time.perf_counter()
        with lock:
            took.append(1e3 * (time.perf_counter() - t0))
        time.sleep(0.1)
    th.join(60)
    took.sort()
    return {"times": len(took), "round": _outcome(th, out),
            "lock_ms_p50_max": [round(took[len(took) // 2], 2), round(took[-1], 2)]}


def _round(eng, examples, seconds: float, out: dict) -> None:
    """One round in a thread of its own; its result or its error into ``out``."""
    try:
        out["steps"] = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + seconds).steps
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"


def _outcome(th: threading.Thread, out: dict) -> str:
    if th.is_alive():
        return "still running"
    return f"{out['steps']} steps" if "steps" in out else out.get("error", "?")


def killed_mid_step(svc, examples, zero: dict) -> dict:
    """SIGKILL the trainer process in the middle of a round (and so, most likely, of a step
    whose work is queued), then: the round reported, the model lock free, a rollback to v0
    exact and served, and a new trainer process training."""
    from idletune.training import adapters

    eng = svc.engine
    out = {}
    th = threading.Thread(target=_round, args=(eng, examples, 20.0, out))
    th.start()
    time.sleep(1.5)
    t0 = time.perf_counter()
    while not eng._holding.value and time.perf_counter() - t0 < 5:  # in a step: the lock held there
        time.sleep(0.0005)
    held = bool(eng._holding.value)
    os.kill(eng._proc.pid, signal.SIGKILL)
    t0 = time.perf_counter()
    th.join(60)
    reported_s = time.perf_counter() - t0
    reported = _outcome(th, out)
    t0 = time.perf_counter()
    got = eng.lock.acquire(timeout=30)
    lock_s = time.perf_counter() - t0
    if got:
        eng.lock.release()
    t0 = time.perf_counter()
    svc.weights.rollback(0, "bench: after a trainer killed mid-step")
    rollback_s = time.perf_counter() - t0
    live = adapters.clone_adapter(svc.model, adapters.LIVE)
    cand = adapters.clone_adapter(svc.model, adapters.TRAIN)
    steps = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 30).steps
    return {"held_the_lock_when_killed": held, "reported": reported, "reported_s": round(reported_s, 2),
            "lock_free": got, "lock_s": round(lock_s, 3), "rollback_s": round(rollback_s, 2),
            "live_exactly_v0": all(torch.equal(live[k], zero[k]) for k in zero),
            "candidate_exactly_v0": all(torch.equal(cand[k], zero[k]) for k in zero),
            "served_vs_peft": served_vs_peft(svc), "steps_after": steps}


def run_one(kind: str, a, res: dict) -> None:
    from idletune.training import adapters
    from idletune.training.remote import TrainerProcessError

    r = res[kind] = {}
    r["used_gb_before_service"] = round(used_gb(), 2)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        svc = C.service(a.shape, tmp, **{"training.trainer": kind, "training.micro_batch_tokens": a.micro_batch_tokens,
                                         **SETTINGS})
        try:
            r["service_s"] = round(time.perf_counter() - t0, 1)
            r["gpu_path"] = svc.inference.fast is not None
            r["used_gb_service"] = round(used_gb(), 2)
            svc.activity._last_activity = 0.0  # the user away (the trainer process reads it when it starts)
            eng = svc.engine
            examples = text_examples(svc.tokenizer)
            t0 = time.perf_counter()
            eng.evaluate(examples[:2], "live")
            r["first_call_s"] = round(time.perf_counter() - t0, 1)  # process: spawn, imports, bind, compile
            r["used_gb_ready"] = round(used_gb(), 2)
            zero = adapters.clone_adapter(svc.model, adapters.TRAIN)
            t0 = time.perf_counter()
            warm = 0
            while warm < a.warmup_steps and time.perf_counter() - t0 < 300:
                warm += eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 30).steps
            r["warmup"] = {"steps": warm, "seconds": round(time.perf_counter() - t0, 1)}
            r["used_gb_trained"] = round(used_gb(), 2)
            r["alone"] = rate(eng, examples, a.alone_s)
            r["used_gb_after_alone"] = round(used_gb(), 2)
            moved = adapters.clone_adapter(svc.model, adapters.TRAIN)
            r["candidate_moved_in_serving_process"] = sum(not torch.equal(moved[k], zero[k]) for k in zero)
            r["candidate_tensors"] = len(zero)
            print(f"[{kind}] ready in {r['first_call_s']} s, {r['alone']['steps_per_s']} steps/s alone, "
                  f"used {r['used_gb_service']} → {r['used_gb_ready']} → {r['used_gb_trained']} GB", flush=True)
            C.write(res, "gpu_trainer_checks.json")

            # 3. publish in the serving process, then served = PEFT
            t0 = time.perf_counter()
            v = svc.weights.publish({"bench": 1})
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            r["publish_ms"] = round(1e3 * (time.perf_counter() - t0), 2)
            live = adapters.clone_adapter(svc.model, adapters.LIVE)
            r["published_version"] = v
            r["live_is_trained"] = all(torch.equal(live[k], moved[k]) for k in moved) if v else None
            r["served_vs_peft_after_publish"] = served_vs_peft(svc)
            print(f"[{kind}] published v{v} in {r['publish_ms']} ms; served vs PEFT {r['served_vs_peft_after_publish']}",
                  flush=True)

            if kind == "process" and not a.skip_failures:
                # 4. a rollback in the middle of a round
                out = {}
                since = svc.weights.restores
                th = threading.Thread(target=lambda: out.update(r=eng.train_round(
                    examples, batch_size=8, deadline=time.monotonic() + 4.0)))
                th.start()
                time.sleep(1.5)
                t0 = time.perf_counter()
                svc.weights.rollback(0, "bench: during a round")
                rb = 1e3 * (time.perf_counter() - t0)
                th.join(60)
                after_round = svc.weights.publish({"bench": 2}, trained_since=since)
                live = adapters.clone_adapter(svc.model, adapters.LIVE)
                r["rollback_during_round"] = {
                    "rollback_ms": round(rb, 1), "round_steps": out["r"].steps if "r" in out else None,
                    "published_after": after_round, "live_version": svc.weights.version,
                    "live_exactly_v0": all(torch.equal(live[k], zero[k]) for k in zero),
                    "served_vs_peft": served_vs_peft(svc)}
                print(f"[process] rollback during a round: {r['rollback_during_round']}", flush=True)
                C.write(res, "gpu_trainer_checks.json")

                # 5. the trainer process killed
                pid = eng._proc.pid
                before_kill = used_gb()
                os.kill(pid, signal.SIGKILL)
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < 30:
                    try:
                        os.kill(pid, 0)
                    except OSError:
                        break
                    time.sleep(0.05)
                time.sleep(2.0)
                freed = before_kill - used_gb()
                try:
                    eng.evaluate(examples[:2], "live")
                    reported = "no error"
                except TrainerProcessError as e:
                    reported = str(e)
                t0 = time.perf_counter()
                eng.evaluate(examples[:2], "live")
                again = time.perf_counter() - t0
                steps = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 30).steps
                r["after_kill"] = {"freed_gb": round(freed, 2), "reported": reported, "ready_again_s": round(again, 1),
                                   "new_pid": eng._proc.pid, "steps_after": steps, "used_gb": round(used_gb(), 2)}
                print(f"[process] after SIGKILL: {r['after_kill']}", flush=True)
                C.write(res, "gpu_trainer_checks.json")
                r["lock_taken_mid_round"] = lock_taken_mid_round(svc, examples)
                print(f"[process] the model lock taken in the middle of a round: {r['lock_taken_mid_round']}", flush=True)
                C.write(res, "gpu_trainer_checks.json")
                # 6. the trainer process killed in the middle of a step
                r["killed_mid_step"] = killed_mid_step(svc, examples, zero)
                print(f"[process] killed in the middle of a step: {r['killed_mid_step']}", flush=True)
        finally:
            svc.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    time.sleep(2.0)
    r["used_gb_after_close"] = round(used_gb(), 2)
    C.write(res, "gpu_trainer_checks.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--alone-s", type=float, default=10.0)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--skip-thread", action="store_true")
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="training.micro_batch_tokens (0: automatic — "
                    "unsplit up to b2b2ffd, as in run ER's 0; at most 2048 tokens in a trainer process since)")
    ap.add_argument("--skip-failures", action="store_true", help="leave out checks 4 to 6 (a rollback during a "
                    "round, the process killed between calls, the lock taken mid-round, the process killed mid-step): "
                    "start, speed, memory and publish only")
    a = ap.parse_args()
    res = C.header() if torch.cuda.is_available() else {"device": "cpu", "command": "cpu check"}
    res.update(question='training.trainer = "process" on a GPU', shape=a.shape, micro_batch_tokens=a.micro_batch_tokens,
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    C.model_dir(a.shape)
    for kind in ("process",) + (() if a.skip_thread else ("thread",)):
        try:
            run_one(kind, a, res)
        except Exception as e:  # written, and the other kind still runs
            import traceback

            res.setdefault(kind, {})["error"] = traceback.format_exc()[-3000:]
            print(f"[{kind}] FAILED: {e!r}", flush=True)
            C.write(res, "gpu_trainer_checks.json")
    rows = []
    for kind in ("process", "thread"):
        r = res.get(kind) or {}
        if "alone" in r:
            rows.append([kind, r["first_call_s"], r["alone"]["steps_per_s"],
                         round(r["used_gb_ready"] - r["used_gb_service"], 2),
                         round(r["used_gb_after_alone"] - r["used_gb_service"], 2),
                         r.get("publish_ms"), r.get("served_vs_peft_after_publish", {}).get("rel_err")])
    print(f'training.trainer on a GPU, {a.shape} ({res["device"]}), micro_batch_tokens {a.micro_batch_tokens or "automatic"}, '
          f'alloc conf "{res["alloc_conf"]}"')
    C.table(rows, ["trainer", "first call s", "steps/s alone", "GB added ready", "GB added trained", "publish ms",
                   "served vs PEFT"])
    C.write(res, "gpu_trainer_checks.json")


if __name__ == "__main__":
    main()
