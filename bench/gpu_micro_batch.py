"""Issue 6, question 5 (memory) on a card with little memory left: does the automatic micro-batch
size (``training.micro_batch_tokens = 0`` on a GPU) keep the largest batch the batch manager
makes (16 × 512 = 8192 tokens) within the card, where the batch in one part would not fit?

idletune's real service (random-weight model, GPU path installed, its KV cache and serving
copies allocated), then a ballast tensor that leaves ``--leave-gb`` GiB free, then a training
round of ``--steps`` steps on 16 × 512-token examples: first with the automatic size, then with
``--fixed`` tokens (default 8192: the batch unsplit). Reported for each: the size, the steps
done, the peak memory the round added, or the error.

Usage: python bench/gpu_micro_batch.py [OUT.json] [--shape qwen2.5-1.5b] [--leave-gb 12] [--fixed 8192]
"""
import argparse
import tempfile
import time

import torch

import gpu_common as C
from gpu_training import fixed_batch


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
        for label, tokens in (("automatic", 0), (f"fixed {a.fixed}", a.fixed)):
            eng.micro_batch_tokens = tokens
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
                              "peak_added_GB": (torch.cuda.max_memory_allocated() - base) / 2**30}
            except Exception as e:  # out of memory, reported as the answer
                res[label] = {"micro_batch_tokens": tokens, "error": f"{type(e).__name__}: {e}"[:300]}
                torch.cuda.empty_cache()
            print(label, res[label], flush=True)
        del ballast
    print(f"{a.shape}, 16 × 512-token batch, {res['free_GB']:.1f} GiB free ({res['device']})")
    rows = [[k, v.get("micro_batch_tokens"), v.get("steps", ""), v.get("peak_added_GB", ""), v.get("error", "")[:60]]
            for k, v in res.items() if isinstance(v, dict)]
    C.table(rows, ["micro-batches", "tokens", "steps", "peak added GiB", "error"])
    C.write(res, "gpu_micro_batch.json")


if __name__ == "__main__":
    main()
