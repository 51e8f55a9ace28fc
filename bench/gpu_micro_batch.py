"""Issue 6, question 5 (memory) on a card with little memory left: does the automatic micro-batch
size (``training.micro_batch_tokens = 0`` on a GPU) keep the largest batch the batch manager
makes (16 × 512 = 8192 tokens) within the card, where the batch in one part would not fit?

idletune's real service (random-weight model, GPU path installed, its KV cache and serving
copies allocated), then a ballast tensor that leaves ``--leave-gb`` GiB free, then a training
round of ``--steps`` steps on 16 × 512-token examples: first with the automatic size, again at
the size it took (compiled by then: its step time), then with ``--fixed`` tokens (default
8192: the batch unsplit). Reported for each: the size, the steps done, the seconds, the peak
memory the round added, the compiled units' sizes (layers), or the error. The ``--fixed`` round runs
in the units the automatic round made (they are kept once a compiled pass has run).

Usage: python bench/gpu_micro_batch.py [OUT.json] [--shape qwen2.5-1.5b] [--leave-gb 12] [--fixed 8192]
"""
import argparse
import tempfile
import time

import torch

import gpu_common as C
from gpu_training import fixed_batch


def units(model) -> list[int] | None:
    """The sizes of the compiled units (gpu/training.py), None where nothing was compiled."""
    from idletune.training.adapters import decoder_layers

    compilation = getattr(decoder_layers(model)[0].forward, "_idletune_compilation", None)
    return sorted(set(compilation.units)) if compilation else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--leave-gb", type=float, default=12.0)
    ap.add_argument("--fixed", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    res = C.header()
    tok = C.load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        svc = C.service(a.shape, tmp)
        eng = svc.engine
        examples = fixed_batch(tok, chat=False, n=16, length=512)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        ballast = torch.empty(max(0, int(free - a.leave_gb * 2**30)), dtype=torch.uint8, device="cuda")
        res["free_GB_before_ballast"] = free / 2**30
        res["free_GB"] = torch.cuda.mem_get_info()[0] / 2**30
        # "again": a second round at the size the automatic one took, compiled by then (its step time)
        for label, tokens in (("automatic", 0), ("automatic, again", None), (f"fixed {a.fixed}", a.fixed)):
            eng.micro_batch_tokens = eng.micro_batch_tokens if tokens is None else tokens
            eng.config.max_steps = a.steps
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            try:
                r = eng.train_round(examples, batch_size=16)
                torch.cuda.synchronize()
                res[label] = {"micro_batch_tokens": eng.micro_batch_tokens, "steps": r.steps,
                              "seconds": time.perf_counter() - t,
                              "peak_added_GB": (torch.cuda.max_memory_allocated() - base) / 2**30,
                              "layers_a_unit": units(svc.model)}
            except Exception as e:  # out of memory, reported as the answer
                res[label] = {"micro_batch_tokens": tokens, "error": f"{type(e).__name__}: {e}"[:300]}
                torch.cuda.empty_cache()
            print(label, res[label], flush=True)
        del ballast
    print(f"{a.shape}, 16 × 512-token batch, {res['free_GB']:.1f} GiB free ({res['device']})")
    rows = [[k, v.get("micro_batch_tokens"), v.get("steps", ""), v.get("seconds", ""), v.get("peak_added_GB", ""),
             v.get("layers_a_unit", ""), v.get("error", "")[:60]] for k, v in res.items() if isinstance(v, dict)]
    C.table(rows, ["micro-batches", "tokens", "steps", "seconds", "peak added GiB", "layers a unit", "error"])
    C.write(res, "gpu_micro_batch.json")


if __name__ == "__main__":
    main()
