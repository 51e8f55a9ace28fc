"""Issue 6, question 6: batch-1 decode speed vs the memory-bandwidth limit.

idletune's GPU path (FastDecoder: merged fused weights, static KV cache, one CUDA graph per
step, greedy argmax on the device one step ahead of the host) with a live rank-8 adapter, for a
256-token prompt and 128 new tokens. The limit is copy bandwidth / model bytes (as gpu_baseline.py).

On ``--variant-shapes`` the decode step's other layouts are timed too (``cache_write`` fused
into the layer's compiled piece or a separate copy; attention as two products and a softmax
(bmm) or one fused kernel (sdpa)); the shipped default is "fused, bmm".

Usage: python bench/gpu_decode.py [OUT.json] [--shapes qwen2.5-0.5b,qwen2.5-1.5b,llama-3-8b] [--hf]
"""
import argparse
import time

import torch

import gpu_common as C


def fast_latency(dec, prompt, new=128, reps=5):
    list(dec.tokens(prompt, new))  # captures the graphs this length needs
    ttft, per_tok = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        it = dec.tokens(prompt, new)
        next(it)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in it)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        per_tok.append((t2 - t1) / (n - 1))
    return {"ttft_ms": 1e3 * C.med(ttft), "per_token_ms": 1e3 * C.med(per_tok), "tok_s": 1 / C.med(per_tok)}


def hf_latency(model, prompt, new=32):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize(); t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False); torch.cuda.synchronize()
        f = time.perf_counter() - t; t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False); torch.cuda.synchronize()
        total = time.perf_counter() - t
    pt = (total - f) / (new - 1)
    return {"ttft_ms": 1e3 * f, "per_token_ms": 1e3 * pt, "tok_s": 1 / pt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,llama-3-8b")
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face generate (plain, no adapter)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variant-shapes", default="qwen2.5-0.5b", help="also time the other decode-step layouts")
    a = ap.parse_args()
    from idletune.gpu import FastDecoder

    tok = C.load_tokenizer()
    res = C.header()
    res["copy_TBs"] = bw = C.copy_bw()
    stream = torch.cuda.Stream(priority=-1)
    rows = []
    for name in a.shapes.split(","):
        m = C.build(name, tok)
        n = sum(p.numel() for p in m.parameters())
        prompt = torch.randint(100, len(tok) - 1, (256,)).tolist()
        r = {"params_M": n / 1e6, "bw_limit_tok_s": bw * 1e12 / (2 * n)}
        if a.hf:
            r["hf_generate"] = hf_latency(m, prompt)
        pm = C.attach(m, live_scale=0.01)
        with torch.cuda.stream(stream):
            if name in a.variant_shapes.split(","):
                for cw, att in (("separate", "bmm"), ("fused", "sdpa"), ("separate", "sdpa")):
                    try:
                        dec = FastDecoder(pm, "live", max_len=1024, stream=stream, cache_write=cw, attention=att)
                        v = r[f"{cw}_{att}"] = fast_latency(dec, prompt, reps=a.reps)
                        v["compile_error"] = dec.compile_error
                        rows.append([f"{name} ({cw} cache write, {att})", v["tok_s"], r["bw_limit_tok_s"],
                                     100 * v["tok_s"] / r["bw_limit_tok_s"], v["ttft_ms"], "-"])
                        del dec
                    except Exception as e:  # report and go on
                        r[f"{cw}_{att}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                        rows.append([f"{name} ({cw}, {att})", "error", "", "", "", str(e)[:50]])
                    torch._dynamo.reset()
            t0 = time.perf_counter()
            dec = FastDecoder(pm, "live", max_len=1024, stream=stream)
            r["fast"] = fast_latency(dec, prompt, reps=a.reps)
            r["fast"]["first_use_s (compile + capture)"] = time.perf_counter() - t0
            r["fast"]["compile_error"] = dec.compile_error
        r["fast"]["share_of_limit"] = r["fast"]["tok_s"] / r["bw_limit_tok_s"]
        r["serving_copy_MB"] = dec.serving_bytes() / 2**20
        res[name] = r
        rows.append([name, r["fast"]["tok_s"], r["bw_limit_tok_s"], 100 * r["fast"]["share_of_limit"], r["fast"]["ttft_ms"],
                     r.get("hf_generate", {}).get("tok_s", "-")])
        del dec, pm, m
        torch.cuda.empty_cache()
    print(f"decode, batch 1, 256-token prompt, 128 new ({res['device']}, copy {bw:.2f} TB/s)")
    C.table(rows, ["shape", "tok/s", "limit tok/s", "% of limit", "TTFT ms", "HF generate tok/s"])
    C.write(res, "gpu_decode.json")


if __name__ == "__main__":
    main()
