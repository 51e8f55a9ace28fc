"""Issue 6, question 3, explained: where a training step's time goes — on the GPU (kernel time)
or on the host (the GPU waiting for Python to launch the next kernel) — for the plain PEFT loop
and idletune's engine, and what each engine option moves.

For each loop: wall ms per step, GPU kernel ms per step (torch.profiler, summed kernel
durations), kernels per step, and "GPU busy" = kernel time / wall time. A loop far below 100 %
busy is bound by the host, and no faster kernel will help it.

Engine variants: ``default`` (as shipped: on a GPU the decoder layers are compiled for
training and replayed as CUDA graphs); ``compiled`` (compiled layers without graphs);
``eager`` (``training.compile = "off"``); ``no_autocast`` and ``no_hooks`` (eager, without the
autocast context / without the per-layer preemption hooks); ``mb<N>[+u<K>]`` as in
gpu_training.py (micro-batches of at most N tokens, layers compiled in units).

``--varlen``: rounds whose batch size and length change (VARLEN: 8×512, 8×256, 8×384, 6×512,
8×448, 7×320, 4×512, 3×256, 2×384, 1×512, 8×512), for each of ``--varlen-variants`` (default:
as shipped; ``graphs_static``: without dynamic batch and length dimensions; ``graphs_dynamic``:
compiled with ``dynamic=True``): seconds of each round (the first compiles; a new shape
recompiles or records graphs), the compilations that ended during it, and the memory the
caching allocator holds after it (the graph pool's growth).

Usage: python bench/gpu_step_profile.py [OUT.json] [--shapes qwen2.5-0.5b,qwen2.5-1.5b]
       [--variants default,compiled,eager,no_autocast,no_hooks,graphs_dynamic] [--steps 8] [--varlen]
       [--varlen-variants default,graphs_dynamic]
"""
import argparse
import contextlib
import threading
import time

import torch
from torch.autograd import DeviceType

import gpu_common as C
import gpu_training as T


def profile(run_steps, steps: int) -> dict:
    """Time ``run_steps(steps)`` (wall) and profile it once more (kernel time, launches, top kernels)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    done = run_steps(steps)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / done
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        done = run_steps(steps)
        torch.cuda.synchronize()
    kern, names, cats, spans, cpu = 0.0, {}, {}, [], []
    n = 0
    for e in prof.events():
        if e.device_type == DeviceType.CPU:
            cpu.append((e.time_range.start, e.time_range.end, e.name[:60]))
        if e.device_type == DeviceType.CUDA:
            d = e.time_range.elapsed_us()
            kern += d
            n += 1
            names[e.name[:60]] = names.get(e.name[:60], 0.0) + d
            cats[category(e.name)] = cats.get(category(e.name), 0.0) + d
            spans.append((e.time_range.start, e.time_range.end, e.name[:50]))
    top = sorted(names.items(), key=lambda kv: -kv[1])[:24]
    # the host's side: operators by their own CPU time (where a host-bound step spends it)
    host = sorted(((e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()), key=lambda r: -r[1])[:20]
    return {"wall_ms": 1e3 * wall, "kernel_ms": kern / 1e3 / done, "kernels_per_step": n / done,
            "busy": kern / 1e3 / done / (1e3 * wall), "top": [(k, round(v / 1e3 / done, 2)) for k, v in top],
            "host_top": [(k[:70], round(t / 1e3 / done, 2), round(c / done, 1)) for k, t, c in host],
            "categories_ms": {k: round(v / 1e3 / done, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "gaps": gaps(spans, done, cpu)}


def category(name: str) -> str:
    """A kernel's family: matrix products, attention, inductor's fused kernels, the rest."""
    low = name.lower()
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "gemv", "splitk")):
        return "matmul"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if low.startswith("triton"):
        return "triton (fused)"
    if "foreach" in low or "multi_tensor" in low or "adam" in low:
        return "foreach/optimizer"
    if "reduce" in low or "norm" in low:
        return "reduction"
    return "elementwise/other"


def gaps(spans, done: int, cpu=()) -> dict:
    """Where the GPU sat idle between kernels: total ms per step, and the largest gaps with the
    kernels either side (a host-bound stretch shows as a run of gaps between the same kernels)
    and what the host ran meanwhile (the longest host operations inside the gap, in µs)."""
    spans.sort()
    idle, big, end = 0.0, [], None
    for i, (s, e, name) in enumerate(spans):
        if end is not None and s > end:
            g = s - end
            idle += g
            if g > 30:
                big.append((round(g), spans[i - 1][2], name, end, s))
        end = e if end is None else max(end, e)
    big.sort(key=lambda r: -r[0])
    largest = []
    for g, before, after, t0, t1 in big[:30]:
        inside = sorted(((ce - cs, cn) for cs, ce, cn in cpu if cs >= t0 and ce <= t1), reverse=True)[:6]
        largest.append((g, before, after, [(round(d), cn) for d, cn in inside]))
    return {"idle_ms_per_step": round(idle / 1e3 / done, 2), "over_30us_per_step": round(len(big) / done, 1),
            "largest": largest}


def plain(name, steps):
    pm, _, step = T.plain_peft_setup(name)

    def run(k):
        for _ in range(k):
            step()
        return k

    run(3)
    r = profile(run, steps)
    del pm, step, run
    torch.cuda.empty_cache()
    return r


def engine(name, variant, steps, tok):
    from idletune.training import adapters

    m = C.build(name, tok)
    pm = C.attach(m)
    base, tokens, per_unit, recompute, _ = T.parse_variant(variant)  # "mb1024+u4": micro-batches, layers per unit
    how = T.shipped_compile(pm, base if base in ("default", "compiled", "graphs", "graphs_dynamic", "graphs_static")
                            or tokens else "eager", per_unit, recompute)
    eng = T.make_engine(pm, tok, steps=steps)
    eng.graphs = how == "graphs"
    if tokens:
        eng.micro_batch_tokens = tokens
    if variant == "no_autocast":
        eng._autocast = contextlib.nullcontext
    if variant == "no_hooks":
        for layer in adapters.decoder_layers(pm):
            layer._forward_hooks.clear()
    examples = T.fixed_batch(tok, chat=False)

    def run(k):
        eng.config.max_steps = k
        return eng.train_round(examples).steps

    lo = torch.cuda.Stream(priority=0)
    with torch.cuda.stream(lo):
        run(3)  # warm-up: optimizer state, compiling
        r = profile(run, steps)
    del eng, pm, m
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return r


VARLEN = ((8, 512), (8, 256), (8, 384), (6, 512), (8, 448), (7, 320), (4, 512), (3, 256), (2, 384), (1, 512),
          (8, 512))


def varlen(name, tok, shapes=VARLEN, steps=4, variant="default"):
    """Round seconds on batches whose size and length change from round to round (as in the
    service, where examples are learned and leave the batch), with a given compile variant."""
    import idletune.training.engine as E
    from idletune.examples import TrainingExample
    from idletune.gpu.training import compilations
    from idletune.training.data import IGNORE, Encoded

    m = C.build(name, tok)
    pm = C.attach(m)
    how = T.shipped_compile(pm, variant)
    eng = T.make_engine(pm, tok, steps=steps)
    eng.graphs = how == "graphs"
    g = torch.Generator().manual_seed(0)
    out = []
    lo = torch.cuda.Stream(priority=0)
    for bs, L in shapes:
        items, examples = {}, []
        for i in range(bs):
            ids = torch.randint(100, len(tok) - 1, (L,), generator=g).tolist()
            ex = TrainingExample.from_text(f"varlen {L} {i}")
            ex.id = 1000 * L + i
            items[ex.id] = Encoded(ex.id, ids, [IGNORE] + ids[1:], "text")
            examples.append(ex)
        E.encode = lambda e, tokenizer, max_len, _items=items: _items.get(e.id)
        with torch.cuda.stream(lo):
            torch.cuda.synchronize()
            seen = compilations()
            t = time.perf_counter()
            r = eng.train_round(examples, batch_size=bs)
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        out.append({"batch": bs, "len": L, "padded": list(eng._shape([items[e.id] for e in examples])),
                    "seconds": sec, "steps": r.steps, "compilations": compilations() - seen,
                    "reserved_MB": torch.cuda.memory_reserved() / 2**20,
                    "ms_per_token_step": 1e3 * sec / r.steps / (bs * L)})
    del eng, pm, m
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--variants", default="default,compiled,eager,no_autocast,no_hooks")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--varlen", action="store_true")
    ap.add_argument("--varlen-variants", default="default", help="engine variants for --varlen (e.g. default,graphs_dynamic)")
    a = ap.parse_args()
    tok = C.load_tokenizer()
    res = C.header()
    rows = []
    variants = [v for v in a.variants.split(",") if v]  # none (--variants ''): the --varlen rounds alone
    for name in a.shapes.split(","):
        res[name] = {"plain": plain(name, a.steps)} if variants else {}
        for v in variants:
            try:
                res[name][v] = engine(name, v, a.steps, tok)
            except Exception as e:  # report and go on
                res[name][v] = {"error": f"{type(e).__name__}: {e}"[:400]}
        base = res[name]["plain"]["wall_ms"] if variants else None
        for v, r in res[name].items():
            if "error" in r:
                rows.append([name, v, "error", r["error"][:50], "", "", ""])
                continue
            rows.append([name, v, r["wall_ms"], r["kernel_ms"], round(r["kernels_per_step"]), f"{100 * r['busy']:.0f} %",
                         base / r["wall_ms"]])
        for v, r in res[name].items():
            print(name, v, "kernel families (ms/step):", r.get("categories_ms"))
            print(name, v, "GPU idle between kernels:", {k: x for k, x in r.get("gaps", {}).items() if k != "largest"})
            for row in r.get("gaps", {}).get("largest", [])[:15]:
                print("    gap", row)
            print(name, v, "top kernels (ms/step):", r.get("top"))
            print(name, v, "host self time (op, ms/step, calls/step):")
            for row in r.get("host_top", []):
                print("   ", row)
        if a.varlen:
            for v in a.varlen_variants.split(","):
                res[name][f"varlen_{v}"] = vl = varlen(name, tok, variant=v)
                print(name, v, "varlen rounds (batch×len → padded: s for", vl[0]["steps"], "steps, compilations, "
                      "reserved GB):", ", ".join(f"{x['batch']}×{x['len']} → {x['padded'][0]}×{x['padded'][1]}: "
                                                f"{x['seconds']:.1f} s, {x['compilations']}, {x['reserved_MB'] / 1024:.1f}"
                                                for x in vl))
    print(f"step anatomy, {T.BS}×{T.SEQ} tokens, rank 8, bf16 ({res['device']})")
    C.table(rows, ["shape", "loop", "wall ms/step", "kernel ms/step", "kernels/step", "GPU busy", "× plain"])
    C.write(res, "gpu_step_profile.json")


if __name__ == "__main__":
    main()
