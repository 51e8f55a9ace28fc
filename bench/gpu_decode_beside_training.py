"""Is decoding slower in a serving process once training has run in it?

Runs EC–EJ found decoding 5–20 % slower a token in a serving process whose trainer is a thread
than in one whose trainer is a process of its own, with training off (both over HTTP and at the
engine level), and garbage collection was not why (EI). This measures one service, one decoder
instance: the time a token at batch 1 before any training step, after training has run in its
trainer (``--trainer thread``: in this process; ``process``: in its own), and after the CUDA
caching allocator's free blocks are given back.

Usage (a CUDA GPU; one process each):
    python bench/gpu_decode_beside_training.py out.json --trainer thread
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

import gpu_common as C


def per_token_ms(inf, n: int, new: int) -> dict:
    """Median time a token: (a ``new``-token request − a 1-token request) / (tokens − 1), n pairs."""
    from idletune.inference import GenerationParams

    msgs = [{"role": "user", "content": "x"}]
    per, gpu = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        inf.generate(msgs, GenerationParams(max_tokens=1))
        t1 = time.perf_counter()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        c = inf.generate(msgs, GenerationParams(max_tokens=new))
        e1.record()
        t2 = time.perf_counter()
        e1.synchronize()
        k = max(1, c.completion_tokens - 1)
        per.append(1e3 * ((t2 - t1) - (t1 - t0)) / k)
        gpu.append(e0.elapsed_time(e1) / c.completion_tokens)  # the request's span on the GPU, a token
    return {"ms_per_token": round(statistics.median(per), 4), "request_span_ms_per_token": round(statistics.median(gpu), 4),
            "tokens": c.completion_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--trainer", default="thread")
    ap.add_argument("--requests", type=int, default=15)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--training-compile", default="auto", help="training.compile (off: the training's layers not "
                    "compiled in this process)")
    ap.add_argument("--compile-after-capture", action="store_true", help="build with training.compile = off, "
                    "measure, then compile the training's layers as the service does (after the decoder's graphs "
                    "were captured), measure again, then train")
    ap.add_argument("--then-thread-engine", action="store_true", help="with --trainer process: after the first "
                    "measure, build a TrainingEngine on the serving process's own model (as a thread service does: "
                    "its forward hooks on the decoder layers), measure; drop its hooks, measure; and with "
                    "--training-compile not off, compile the layers here as well, measure — then stop (one decoder "
                    "instance throughout: which piece of a thread service slows decoding)")
    a = ap.parse_args()
    from gpu_trainer_checks import text_examples

    res = C.header()
    res.update(trainer=a.trainer, training_compile=a.training_compile, compile_after_capture=a.compile_after_capture)
    with tempfile.TemporaryDirectory() as tmp:
        svc = C.service(a.shape, tmp, **{"training.trainer": a.trainer,
                                         "training.compile": "off" if a.compile_after_capture else a.training_compile})
        try:
            inf, eng = svc.inference, svc.engine
            prompt = torch.randint(100, len(svc.tokenizer) - 1, (256,)).tolist()
            inf.encode_chat = lambda messages: list(prompt)  # exactly 256 prompt tokens
            per_token_ms(inf, 2, a.new)  # graphs captured
            res["before_training"] = per_token_ms(inf, a.requests, a.new)
            print("before training:", res["before_training"], flush=True)
            if a.then_thread_engine:
                from idletune.gpu.training import compile_layers
                from idletune.training.adapters import decoder_layers
                from idletune.training.engine import TrainingEngine

                thread_engine = TrainingEngine(svc.model, svc.tokenizer, svc.config.training,
                                               lock=threading.Lock(), weights=svc.weights.ws)
                res["after_engine_built"] = per_token_ms(inf, a.requests, a.new)
                print("a TrainingEngine built here:", res["after_engine_built"], flush=True)
                for layer in decoder_layers(svc.model):
                    layer._forward_hooks.clear()
                    layer._forward_hooks_with_kwargs.clear()
                res["after_hooks_dropped"] = per_token_ms(inf, a.requests, a.new)
                print("its hooks dropped:", res["after_hooks_dropped"], flush=True)
                if a.training_compile != "off":
                    compile_layers(svc.model, graphs=True)
                    res["after_compile_layers"] = per_token_ms(inf, a.requests, a.new)
                    print("layers compiled here:", res["after_compile_layers"], flush=True)
                del thread_engine
                C.write(res, "gpu_decode_beside_training.json")
                return
            if a.compile_after_capture:
                from idletune.config import Config
                from idletune.service import _compile_training

                cfg = Config.load(None, {"training.trainer": a.trainer})
                _compile_training(cfg, eng, fast_path=inf.fast is not None)
                res["after_compile_setup"] = per_token_ms(inf, a.requests, a.new)
                print("after compile_layers:", res["after_compile_setup"], flush=True)
            examples = text_examples(svc.tokenizer, n=8, length=512)
            t0, steps = time.perf_counter(), 0
            while steps < a.warmup_steps and time.perf_counter() - t0 < 300:
                steps += eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 30).steps
            res["training"] = {"steps": steps, "seconds": round(time.perf_counter() - t0, 1)}
            torch.cuda.synchronize()
            res["after_training"] = per_token_ms(inf, a.requests, a.new)
            print("after training:", res["training"], res["after_training"], flush=True)
            time.sleep(2.0)
            res["after_2s"] = per_token_ms(inf, a.requests, a.new)
            torch.cuda.empty_cache()
            res["after_empty_cache"] = per_token_ms(inf, a.requests, a.new)
            print("after 2 s / empty_cache:", res["after_2s"], res["after_empty_cache"], flush=True)
        finally:
            svc.close()
    C.write(res, a.out or "gpu_decode_beside_training.json")


if __name__ == "__main__":
    main()
