"""Issue 6, question 3 (and the step memory of question 5): training throughput, idletune's
engine vs the plain PEFT loop, same model, data, lengths (8 × 512 tokens, loss on every token),
batch, steps and precision (bf16), rank 8 on q/v/gate/up.

Variants of the engine: as configured by default (on a GPU: decoder layers compiled for
training and replayed as CUDA graphs, ``training.compile = "auto"``); ``compiled`` (compiled
layers without graphs, ``training.compile = "on"``); ``eager`` (``training.compile = "off"``);
with gradient checkpointing (the memory setting); ``mb<N>`` (as shipped, micro-batches of at
most N tokens: the same batch in less memory, the layers compiled in units of
``layers_per_unit(N)`` as the service does: 8192 // N, at most 8, and cheap activations
recomputed in the backward pass, ``RECOMPUTE_CHEAP``). Suffixes: ``+u<K>`` compiles K layers a
unit instead; ``+norc`` keeps the partitioner's default choice of activations; ``+sg``
measures without dynamo's guard checks (``skip_guard_eval_unsafe``, an experiment); ``+notrees`` with inductor's plain CUDA graphs
instead of graph trees (an experiment: an AssertionError at ``mb1024`` in run BK); ``+ab<P>``
with ``torch._functorch.config.activation_memory_budget`` = P % (the partitioner recomputes
cheap activations instead of saving them; an experiment; run BP measured it at 9b24483, before
``mb`` variants recomputed by themselves: add ``+norc`` to measure the budget alone). Also a
chat-shaped batch (loss on the last 128 tokens of each 512), where only target positions reach
the output layer.

Usage: python bench/gpu_training.py [OUT.json] [--shapes qwen2.5-0.5b,qwen2.5-1.5b,llama-3-8b]
       [--variants default,compiled,eager,checkpointed,chat] [--steps 20]
"""
import argparse
import threading
import time

import torch
import torch._functorch.config  # noqa: F401  (the +ab flag)

import gpu_common as C
from idletune.gpu.training import layers_per_unit

BS, SEQ = 8, 512


def plain_peft_setup(name):
    """gpu_baseline.py's loop, verbatim in substance: the PEFT model, its size, and one step."""
    from peft import LoraConfig, get_peft_model

    m = C.build(name)
    n = sum(p.numel() for p in m.parameters())
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
                     task_type="CAUSAL_LM")
    pm = get_peft_model(m, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    pm.train()
    x = torch.randint(0, 1000, (BS, SEQ), device="cuda")

    def step():
        pm(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return pm, n, step


def plain_peft(name, steps):
    pm, n, step = plain_peft_setup(name)
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t = time.perf_counter()
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    r = {"step_ms": 1e3 * dt, "tok_s": BS * SEQ / dt, "mfu_6N": 6 * n * BS * SEQ / dt / C.PEAK_BF16,
         "peak_extra_MB": (torch.cuda.max_memory_allocated() - base_mem) / 2**20}
    del pm, step
    torch.cuda.empty_cache()
    return r, n


def shipped_compile(pm, variant: str, per_unit: int = 1, recompute_cheap: bool = False) -> str | None:
    """Compile the layers for ``variant``: "eager" not at all, "compiled" without CUDA graphs,
    "graphs" replayed as CUDA graphs, "graphs_dynamic" the same compiled with ``dynamic=True``
    (every size dynamic: an experiment, segmentation faults on torch 2.11, docs/BENCHMARKS.md
    run AP), "mb<N>" as shipped with micro-batches of at most N tokens (gradients accumulated
    over them: the same batch in less memory), "graphs_static" graphs without the batch and length dimensions marked dynamic (as
    before run AQ: dynamo recompiles at a new length and at a new batch size), else as the
    service does (``training.compile = "auto"``: graphs on a GPU). Returns "graphs", "compile"
    or None; the caller sets ``engine.graphs``."""
    from idletune.gpu.training import compile_layers, wanted

    if variant == "graphs_dynamic":
        compile_layers(pm, graphs=True, dynamic=True)
        return "graphs"
    if variant == "graphs_static":
        compile_layers(pm, graphs=True, dynamic_dims=False)
        return "graphs"
    how = {"eager": None, "compiled": "compile", "graphs": "graphs"}.get(variant, "auto")
    if how == "auto":
        how = wanted("auto", pm)
    if how:
        compile_layers(pm, graphs=how == "graphs", layers_per_unit=per_unit, recompute_cheap=recompute_cheap)
    return how


def parse_variant(v: str) -> tuple[str, int, int, bool, list[str]]:
    """"mb1024+u8+sg" → ("mb1024", 1024 tokens a micro-batch (0: unsplit), 8 layers a unit (as
    the service compiles for that micro-batch unless ``+u<K>`` says), cheap activations
    recomputed (as the service does where micro-batches are set, unless ``+norc``), ["u8", "sg"])."""
    base, *flags = v.split("+")
    tokens = int(base[2:]) if base.startswith("mb") else 0
    units = [int(f[1:]) for f in flags if f.startswith("u")]
    return base, tokens, units[0] if units else layers_per_unit(tokens), tokens > 0 and "norc" not in flags, flags


def make_engine(pm, tok, *, checkpointing=False, steps=20):
    from idletune.config import TrainingConfig
    from idletune.training.engine import TrainingEngine

    cfg = TrainingConfig(batch_size=BS, max_steps=steps, max_seq_len=SEQ, target_loss=0.0, target_loss_text=0.0,
                         warmup_steps=0, replay_examples=0, gradient_checkpointing=checkpointing)
    return TrainingEngine(pm, tok, cfg, lock=threading.Lock())


def fixed_batch(tok, chat: bool, seed=0, n: int = BS, length: int = SEQ):
    """``n`` examples and a patch of the engine's encoder that returns fixed ``length``-token
    items (random tokens; the loss on all of them, or with ``chat`` on the last 128)."""
    import idletune.training.engine as E
    from idletune.examples import TrainingExample
    from idletune.training.data import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    items, examples = {}, []
    for i in range(n):
        ids = torch.randint(100, len(tok) - 1, (length,), generator=g).tolist()
        labels = ([IGNORE] * (length - 128) + ids[length - 128:]) if chat else [IGNORE] + ids[1:]
        ex = TrainingExample.from_text(f"bench {i}")
        ex.id = i + 1
        items[ex.id] = Encoded(ex.id, ids, labels, "chat" if chat else "text")
        examples.append(ex)
    E.encode = lambda e, tokenizer, max_len: items.get(e.id)
    return examples


def engine_run(engine, examples, steps, skip_guards=False):
    import contextlib

    engine.config.max_steps = 3
    engine.train_round(examples)  # warm-up (optimizer state, compile)
    engine.config.max_steps = steps
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    t = time.perf_counter()
    # "+sg": dynamo's guards not evaluated (an experiment: how much of the host's time per layer call they are)
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip_guards else contextlib.nullcontext():
        res = engine.train_round(examples)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / res.steps
    return dt, (torch.cuda.max_memory_allocated() - base_mem) / 2**20, res.steps, base_mem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,llama-3-8b")
    ap.add_argument("--variants", default="default,compiled,eager,checkpointed,chat")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--big-variants", default="default,compiled,checkpointed", help="variants for llama-3-8b")
    a = ap.parse_args()
    tok = C.load_tokenizer()
    res = C.header()
    rows = []
    lo = torch.cuda.Stream(priority=0)
    for name in a.shapes.split(","):
        r = {}
        r["plain_peft"], n = plain_peft(name, a.steps)
        rows.append([name, "plain PEFT loop", r["plain_peft"]["tok_s"], 100 * r["plain_peft"]["mfu_6N"], 1.0,
                     r["plain_peft"]["step_ms"], r["plain_peft"]["peak_extra_MB"], r["plain_peft"]["peak_extra_MB"]])
        for v in (a.big_variants if name == "llama-3-8b" else a.variants).split(","):
            m = C.build(name, tok)
            pm = C.attach(m)
            try:
                t0 = time.perf_counter()
                base_v, tokens, per_unit, recompute, flags = parse_variant(v)
                skip_guards = "sg" in flags
                # "+notrees": inductor's plain CUDA graphs instead of graph trees (less bookkeeping
                # per replay, a memory pool per graph) — an experiment, not run yet
                torch._inductor.config.triton.cudagraph_trees = "notrees" not in flags
                # "+ab90": the partitioner recomputes cheap activations to save at most 90 % of them
                budgets = [int(f[2:]) / 100 for f in flags if f.startswith("ab")]
                torch._functorch.config.activation_memory_budget = budgets[0] if budgets else 1.0
                # "mb2048": as shipped with micro-batches of at most 2048 tokens (layers in units of 4)
                how = shipped_compile(pm, base_v, per_unit, recompute)
                eng = make_engine(pm, tok, checkpointing=(base_v == "checkpointed"), steps=a.steps)
                if tokens:
                    eng.micro_batch_tokens = tokens
                eng.graphs = how == "graphs"
                compiled = how is not None
                examples = fixed_batch(tok, chat=(base_v == "chat"))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start_mem = torch.cuda.memory_allocated()  # before any step: what training adds from here
                first_peak = 0
                with torch.cuda.stream(lo):
                    if compiled:
                        eng.config.max_steps = 1
                        eng.train_round(examples)
                        torch.cuda.synchronize()
                        r.setdefault("compile_s", {})[v] = time.perf_counter() - t0
                        first_peak = torch.cuda.max_memory_allocated() - start_mem
                    dt, peak, steps, base_mem = engine_run(eng, examples, a.steps, skip_guards)
                # everything training holds at its peak, kept state and graph pools included
                total_peak = max(first_peak, base_mem - start_mem + peak * 2**20) / 2**20
                tok_s = BS * SEQ / dt
                r[v] = {"step_ms": 1e3 * dt, "tok_s": tok_s, "mfu_6N": 6 * n * BS * SEQ / dt / C.PEAK_BF16,
                        "speedup_vs_plain": tok_s / r["plain_peft"]["tok_s"], "peak_extra_MB": peak,
                        "peak_from_start_MB": total_peak, "steps": steps}
                rows.append([name, f"idletune {v}", tok_s, 100 * r[v]["mfu_6N"], r[v]["speedup_vs_plain"], 1e3 * dt, peak,
                             total_peak])
            except Exception as e:  # report and go on: one failing variant must not lose the rest
                r[v] = {"error": f"{type(e).__name__}: {e}"[:500]}
                rows.append([name, f"idletune {v}", "error", "", "", "", "", str(e)[:60]])
                print(f"{name} {v}: {r[v]['error']}", flush=True)
            torch._inductor.config.triton.cudagraph_trees = True
            torch._functorch.config.activation_memory_budget = 1.0
            res[name] = r
            C.write(res, "gpu_training.json")  # after each variant: a call cut short keeps what ran
            del pm, m
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        res[name] = r
    C.write(res, "gpu_training.json")
    print(f"training, rank 8, {BS}×{SEQ} tokens, bf16 ({res['device']}); MFU counts 6N per token as gpu_baseline.py")
    C.table(rows, ["shape", "loop", "tok/s", "MFU %", "× plain", "step ms", "peak extra MB",
                   "peak from start MB (state, graph pool)"])


if __name__ == "__main__":
    main()
