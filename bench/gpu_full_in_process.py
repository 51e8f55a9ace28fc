"""Full fine-tuning and hybrid mode in the trainer process, on a GPU, checked and timed.

Until the seventeenth session a trainer process trained LoRA only, and full fine-tuning kept the
trainer thread (whose Python shares the interpreter lock with chat). What a GPU run must check,
on idletune's own service (random-weight model):

1. ``mode = "full"``: the trainer process starts on both weight sets (the weights in training
   bound as its parameters, the live ones beside, by CUDA IPC), its float32 master copies and
   AdamW state its own. Time to ready, the GPU memory it adds, steps a second with the user
   away against the trainer thread (the same engine, examples and settings).
2. It trains the serving process's copy in training and never the live one; a publish in the
   serving process then serves it: the fast path's logits against the model's forward with the
   live weights.
3. A discarded round (the gate's rejection): the next round starts from the live weights (the
   trainer's master copies follow what the serving process wrote: ``FullWeights.writes``).
4. ``mode = "hybrid"``: a LoRA round, a publish, the switch to full fine-tuning (the trainer
   process starts again on the full weights: the time of that first full round), a publish;
   then a rollback across modes (to the LoRA version) in the middle of a full round: how long
   it takes, that the round is not published, and that the served logits are the LoRA
   version's again.

Usage: python bench/gpu_full_in_process.py [OUT.json] [--shape qwen2.5-0.5b] [--alone-s 10] [--skip-thread]
"""
import argparse
import tempfile
import threading
import time

import torch

import gpu_common as C
from gpu_trainer_checks import SETTINGS, rate, text_examples, used_gb

OUT = "gpu_full_in_process.json"


def served_vs_forward(svc) -> dict:
    """The next request's logits from the fast path against the model's own forward with the
    live weights (bf16 both)."""
    fast = svc.inference.fast
    if fast is None:
        return {"rel_err": None}
    prompt = torch.randint(100, len(svc.tokenizer) - 1, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    with fast.session():
        got = fast.decoder.prefill(prompt).float()
    with svc.engine.lock, torch.no_grad():
        svc.weights.ws.use("live")
        svc.model.eval()
        ref = svc.model(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()
    return {"rel_err": round(float((got - ref).norm() / ref.norm()), 5), "argmax_same": bool(got.argmax() == ref.argmax())}


def full_set(svc, which: str) -> dict:
    return {n: t.clone() for n, t in svc.weights.ws._set(which).items()}


def distance(a: dict, b: dict) -> float:
    """Relative distance of two weight sets (all tensors together)."""
    num = sum(float((a[n].float() - b[n].float()).norm()) ** 2 for n in a)
    den = sum(float(b[n].float().norm()) ** 2 for n in a)
    return (num / den) ** 0.5


def run_full(kind: str, a, res: dict) -> None:
    r = res[f"full_{kind}"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        svc = C.service(a.shape, tmp, **{"training.trainer": kind, "training.mode": "full", **SETTINGS})
        try:
            r["gpu_path"] = svc.inference.fast is not None
            r["used_gb_service"] = round(used_gb(), 2)
            svc.activity._last_activity = 0.0  # the user away
            eng = svc.engine
            examples = text_examples(svc.tokenizer)
            t0 = time.perf_counter()
            eng.evaluate(examples[:2], "live")
            r["first_call_s"] = round(time.perf_counter() - t0, 1)
            r["used_gb_ready"] = round(used_gb(), 2)
            live0 = full_set(svc, "live")
            t0, warm = time.perf_counter(), 0
            while warm < a.warmup_steps and time.perf_counter() - t0 < 300:
                warm += eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 3).steps  # the first step compiles
            r["warmup"] = {"steps": warm, "seconds": round(time.perf_counter() - t0, 1)}
            r["alone"] = rate(eng, examples, a.alone_s)
            r["used_gb_trained"] = round(used_gb(), 2)
            cand = full_set(svc, "candidate")
            r["candidate_moved"] = round(distance(cand, live0), 6)
            r["live_untouched"] = all(torch.equal(t, live0[n]) for n, t in full_set(svc, "live").items())
            print(f"[full/{kind}] ready in {r['first_call_s']} s, {r['alone']['steps_per_s']} steps/s alone, used "
                  f"{r['used_gb_service']} → {r['used_gb_ready']} → {r['used_gb_trained']} GB; candidate moved "
                  f"{r['candidate_moved']}, live untouched {r['live_untouched']}", flush=True)
            C.write(res, OUT)
            # 3. a discarded round: the next starts from the live weights
            svc.weights.discard_candidate()
            eng.reset_optimizer()
            r["after_discard_equals_live"] = all(torch.equal(t, live0[n]) for n, t in full_set(svc, "candidate").items())
            steps = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 2.0).steps
            r["round_after_discard"] = {"steps": steps, "distance_from_live": round(distance(full_set(svc, "candidate"), live0), 6)}
            # 2. publish, then served = forward
            t0 = time.perf_counter()
            v = svc.weights.publish({"bench": 1})
            torch.cuda.synchronize()
            r["publish_ms"] = round(1e3 * (time.perf_counter() - t0), 2)
            r["published_version"] = v
            r["served_vs_forward"] = served_vs_forward(svc)
            print(f"[full/{kind}] discard → {r['after_discard_equals_live']}, then {r['round_after_discard']}; "
                  f"published v{v} in {r['publish_ms']} ms; served vs forward {r['served_vs_forward']}", flush=True)
        finally:
            svc.close()
    torch.cuda.empty_cache()
    time.sleep(2.0)
    r["used_gb_after_close"] = round(used_gb(), 2)
    C.write(res, OUT)


def run_hybrid(a, res: dict) -> None:
    r = res["hybrid_process"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        svc = C.service(a.shape, tmp, **{"training.trainer": "process", "training.mode": "hybrid", **SETTINGS})
        try:
            svc.activity._last_activity = 0.0
            eng, w = svc.engine, svc.weights
            examples = text_examples(svc.tokenizer)
            t0 = time.perf_counter()
            steps = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 3).steps  # compiles
            r["lora_round"] = {"steps": steps, "seconds": round(time.perf_counter() - t0, 1), "pid": eng._proc.pid}
            r["v1"] = w.publish({"bench": "lora"})
            v1 = served_vs_forward(svc)
            t0 = time.perf_counter()
            w.switch_to_full("bench")
            r["switch_ms"] = round(1e3 * (time.perf_counter() - t0), 1)
            t0 = time.perf_counter()
            steps = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 3).steps  # starts, compiles
            r["first_full_round"] = {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
                                     "pid": eng._proc.pid, "mode": eng.mode}
            r["v2"] = w.publish({"bench": "full"})
            r["served_vs_forward_v2"] = served_vs_forward(svc)
            print(f"[hybrid] {r}", flush=True)
            C.write(res, OUT)
            # a rollback across modes in the middle of a full round
            out = {}
            since = w.restores
            th = threading.Thread(target=lambda: out.update(r=eng.train_round(
                examples, batch_size=8, deadline=time.monotonic() + 4.0)))
            th.start()
            time.sleep(1.5)
            t0 = time.perf_counter()
            w.rollback(1, "bench: during a full round")
            rb = 1e3 * (time.perf_counter() - t0)
            th.join(60)
            after = w.publish({"bench": 3}, trained_since=since)
            r["rollback_during_full_round"] = {
                "rollback_ms": round(rb, 1), "round_steps": out["r"].steps if "r" in out else None,
                "published_after": after, "live_version": w.version, "mode": w.mode,
                "served_vs_forward": served_vs_forward(svc), "served_as_v1": v1}
            t0 = time.perf_counter()
            steps = eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 3).steps
            r["lora_round_after"] = {"steps": steps, "seconds": round(time.perf_counter() - t0, 1), "pid": eng._proc.pid,
                                     "mode": eng.mode}
            print(f"[hybrid] rollback during a full round: {r['rollback_during_full_round']}; then {r['lora_round_after']}",
                  flush=True)
        finally:
            svc.close()
    C.write(res, OUT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--alone-s", type=float, default=10.0)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--skip-thread", action="store_true")
    ap.add_argument("--skip-hybrid", action="store_true")
    a = ap.parse_args()
    res = C.header()
    res.update(question="full fine-tuning and hybrid mode in the trainer process", shape=a.shape)
    C.model_dir(a.shape)
    runs = [("full_process", lambda: run_full("process", a, res))]
    if not a.skip_hybrid:
        runs.append(("hybrid_process", lambda: run_hybrid(a, res)))
    if not a.skip_thread:
        runs.append(("full_thread", lambda: run_full("thread", a, res)))
    for name, run in runs:
        try:
            run()
        except Exception as e:  # written, and the others still run
            import traceback

            res.setdefault(name, {})["error"] = traceback.format_exc()[-3000:]
            print(f"[{name}] FAILED: {e!r}", flush=True)
            C.write(res, OUT)
    print(f"full fine-tuning, {a.shape} ({res['device']}): trainer, ready s, steps/s alone, GB added ready/trained, "
          "publish ms, served rel err")
    for kind in ("process", "thread"):
        r = res.get(f"full_{kind}") or {}
        if "alone" in r:
            print(kind, r["first_call_s"], r["alone"]["steps_per_s"], round(r["used_gb_ready"] - r["used_gb_service"], 2),
                  round(r["used_gb_trained"] - r["used_gb_service"], 2), r.get("publish_ms"),
                  (r.get("served_vs_forward") or {}).get("rel_err"))


if __name__ == "__main__":
    main()
