"""Issue 6, question 6: batch-1 decode speed vs the memory-bandwidth limit.

idletune's GPU path (FastDecoder: merged fused weights, static KV cache, one CUDA graph per
step, greedy argmax on the device one step ahead of the host) with a live rank-8 adapter, for a
256-token prompt and 128 new tokens. The limit is copy bandwidth / model bytes (as gpu_baseline.py).

On ``--variant-shapes`` other settings (``--variants``) are timed too, round-robin with the
shipped default: ``untuned`` (no coordinate-descent tuning: matrix-vector products stay cuBLAS
calls), ``sdpa`` (attention as one library kernel instead of compiled reductions) and
``no_pdl`` (no programmatic dependent launch); the shipped default is tuned, with reductions and
programmatic dependent launch.

Usage: python bench/gpu_decode.py [OUT.json] [--shapes qwen2.5-0.5b,qwen2.5-1.5b,llama-3-8b] [--hf]
"""
import argparse
import time

import torch

import gpu_common as C


# variants timed beside the shipped default ("fast"): FastDecoder keyword arguments
VARIANTS = {
    "untuned": {"tuned": False},
    "sdpa": {"attention": "sdpa"},
    "no_pdl": {"pdl": False},
    # the same settings again: a second decoder reuses the first one's compiled kernels
    # (dynamo's cache), so the two differ only by the timing's own noise
    "repeat": {},
    "no_pdl_repeat": {"pdl": False},
    "eager_prefill": {"compile_prefill": False},  # the prompt's layers as library calls (in a graph)
}


def one_request(dec, prompt, new=128, stream=None):
    """(time to first token, per-token time) of one greedy request, in seconds; the clock starts
    once the device (or only ``stream``, where given) is idle."""
    (stream.synchronize if stream is not None else torch.cuda.synchronize)()
    t0 = time.perf_counter()
    it = dec.tokens(prompt, new)
    next(it)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in it)
    return t1 - t0, (time.perf_counter() - t1) / (n - 1)


def fast_latency(dec, prompt, new=128, reps=5):
    list(dec.tokens(prompt, new))  # captures the graphs this length needs
    runs = [one_request(dec, prompt, new) for _ in range(reps)]
    per_tok = C.med([p for _, p in runs])
    return {"ttft_ms": 1e3 * C.med([t for t, _ in runs]), "per_token_ms": 1e3 * per_tok, "tok_s": 1 / per_tok}


@torch.no_grad()
def logits_error(dec, pm, prompt, steps=8):
    """Largest |decoder − PEFT forward| of the prompt's last logits and the decode steps' logits,
    relative to the logits' spread (the same tokens fed to both; bf16 either way)."""
    from idletune.training import adapters

    adapters.activate(pm, "live")
    pm.eval()
    ids = prompt + [int(t) for t in torch.randint(100, 1000, (steps,))]
    ref = pm(input_ids=torch.tensor([ids], device="cuda")).logits[0].float()
    last = len(prompt) - 1
    worst = float((dec.prefill(prompt) - ref[last]).abs().max() / ref[last].std())
    for i, pos in enumerate(range(len(prompt), len(ids))):
        dec.ids_buf.fill_(ids[pos])
        dec.step(pos)
        worst = max(worst, float((dec.logits_buf[0] - ref[pos]).abs().max() / ref[pos].std()))
    return worst


def kernel_profile(dec, prompt, steps=16) -> dict:
    """Kernels of one decode step (replayed graph): count, summed GPU time, the top few."""
    from torch.autograd import DeviceType

    list(dec.tokens(prompt, 4))
    dec.prefill(prompt)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            dec.step(len(prompt) + i)
        torch.cuda.synchronize()
    names, n, total = {}, 0, 0.0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            d = e.time_range.elapsed_us()
            n += 1
            total += d
            k = e.name[:70]
            names[k] = (names.get(k, (0, 0.0))[0] + 1, names.get(k, (0, 0.0))[1] + d)
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:12]
    return {"kernels_per_step": n / steps, "kernel_us_per_step": total / steps,
            "top": [(k, c / steps, round(t / steps, 1)) for k, (c, t) in top]}


def prefill_profile(dec, sizes=(64, 256, 1024), reps=20) -> dict:
    """``prefill()`` timed with device events (median of ``reps``) at each prompt length: the
    prompt's graph, plus the host work of the call before the graph is launched (the GPU is idle
    when the first event fires: its two small copies and the launch, ~0.1 ms); and the kernels
    of one 256-token prompt (the two copies among them)."""
    from torch.autograd import DeviceType

    out = {}
    for T in sizes:
        prompt = torch.randint(100, 1000, (T,)).tolist()
        dec.prefill(prompt)  # captures this bucket's graph
        times = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dec.prefill(prompt)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        out[f"prefill_ms_{T}"] = C.med(times)
    prompt = torch.randint(100, 1000, (256,)).tolist()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dec.prefill(prompt)
        torch.cuda.synchronize()
    ks = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    out["prefill_kernels_256"] = len(ks)
    out["prefill_kernel_us_256"] = sum(e.time_range.elapsed_us() for e in ks)
    return out


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
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--variant-shapes", default="qwen2.5-0.5b", help="also time the decoder variants")
    ap.add_argument("--variants", default="no_pdl", help="of " + ", ".join(VARIANTS) + " ('' for none)")
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
            # build every decoder first (compile + capture), then time them round-robin, so that
            # a drift of the card's speed during the run touches every variant alike
            labels = [v for v in a.variants.split(",") if v] if name in a.variant_shapes.split(",") else []
            decs = {}
            for label in labels + ["fast"]:
                try:
                    t0 = time.perf_counter()
                    dec = FastDecoder(pm, "live", max_len=1024, stream=stream, **VARIANTS.get(label, {}))
                    list(dec.tokens(prompt, 128))  # compiles the pieces, captures this length's graphs
                    r[label] = {"first_use_s (compile + capture)": time.perf_counter() - t0,
                                "compile_error": dec.compile_error, "pdl": dec.pdl,
                                "logits_error_vs_peft": logits_error(dec, pm, prompt)}
                    decs[label] = dec
                except Exception as e:  # report and go on
                    if label == "fast":
                        raise
                    r[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    rows.append([f"{name} ({label})", "error", "", "", "", str(e)[:50]])
            times = {label: [] for label in decs}
            for _ in range(a.reps):
                for label, dec in decs.items():
                    times[label].append(one_request(dec, prompt))
            for label, dec in decs.items():
                v = r[label]
                v["ttft_ms"] = 1e3 * C.med([t for t, _ in times[label]])
                v["per_token_ms"] = 1e3 * C.med([p for _, p in times[label]])
                v["tok_s"] = 1e3 / v["per_token_ms"]
                if labels:
                    v["kernels"] = kernel_profile(dec, prompt)
                v["prefill"] = prefill_profile(dec)
                if label != "fast":
                    rows.append([f"{name} ({label})", v["tok_s"], r["bw_limit_tok_s"],
                                 100 * v["tok_s"] / r["bw_limit_tok_s"], v["ttft_ms"], "-"])
            dec = decs["fast"]
            del decs
        r["fast"]["share_of_limit"] = r["fast"]["tok_s"] / r["bw_limit_tok_s"]
        r["serving_copy_MB"] = dec.serving_bytes() / 2**20
        res[name] = r
        rows.append([name, r["fast"]["tok_s"], r["bw_limit_tok_s"], 100 * r["fast"]["share_of_limit"], r["fast"]["ttft_ms"],
                     r.get("hf_generate", {}).get("tok_s", "-")])
        del dec, pm, m
        torch.cuda.empty_cache()
    print(f"decode, batch 1, 256-token prompt, 128 new ({res['device']}, copy {bw:.2f} TB/s)")
    C.table(rows, ["shape", "tok/s", "limit tok/s", "% of limit", "TTFT ms", "HF generate tok/s"])
    for name in a.shapes.split(","):
        f = res[name]["fast"]
        print(f"{name}: first use {f['first_use_s (compile + capture)']:.1f} s (compile + capture), "
              f"compile error: {f['compile_error']}; logits vs PEFT forward: max |diff| = "
              f"{f['logits_error_vs_peft']:.3f} × their std (untuned: "
              f"{res[name].get('untuned', {}).get('logits_error_vs_peft', float('nan')):.3f})")
        for label, f in [("", f)] + [(" " + v, res[name][v]) for v in VARIANTS if v in res[name]]:
            if "prefill" in f:
                p = f["prefill"]
                print(f"{name}{label}: prompt graph {p['prefill_ms_64']:.2f} / {p['prefill_ms_256']:.2f} / "
                      f"{p['prefill_ms_1024']:.2f} ms at 64 / 256 / 1024 tokens; {p['prefill_kernels_256']} kernels, "
                      f"{p['prefill_kernel_us_256']:.0f} µs of kernel time at 256")
            if "kernels" not in f:
                continue
            k = f["kernels"]
            print(f"{name}{label}: {k['kernels_per_step']:.0f} kernels per step, {k['kernel_us_per_step']:.0f} µs of kernel time; top:")
            for row in k["top"]:
                print("   ", row)
    C.write(res, "gpu_decode.json")


if __name__ == "__main__":
    main()
