"""Issue 6, question 5: memory.

Persistent training state of idletune's LoRA engine (candidate adapter, its optimizer state,
gradients left between steps, the live adapter) at rank 8, counted tensor by tensor after a
step; what the GPU serving path adds (fused/merged serving copies, KV cache). The peak extra
memory of a step is measured by gpu_training.py (same run). Full fine-tuning, for comparison: a
plain loop (bf16 weights, fused AdamW, 8 × 512 tokens), persistent state and peak.

Usage: python bench/gpu_memory.py [OUT.json] [--shapes qwen2.5-0.5b,qwen2.5-1.5b,llama-3-8b]
"""
import argparse
import tempfile
import threading

import torch

import gpu_common as C
from gpu_training import fixed_batch, make_engine

MB = 2**20


def nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def lora_state(name, tok):
    m = C.build(name, tok)
    pm = C.attach(m)
    eng = make_engine(pm, tok, steps=2)
    eng.train_round(fixed_batch(tok, chat=False))
    torch.cuda.synchronize()
    from idletune.training import adapters

    cand = list(adapters.adapter_tensors(pm, adapters.TRAIN).values())
    live = list(adapters.adapter_tensors(pm, adapters.LIVE).values())
    opt = eng._get_optimizer()
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    grads = [p.grad for p in pm.parameters() if p.grad is not None]
    r = {"candidate_MB": nbytes(cand) / MB, "optimizer_MB": nbytes(state) / MB, "grads_kept_MB": nbytes(grads) / MB,
         "live_MB": nbytes(live) / MB}
    r["persistent_training_state_MB"] = r["candidate_MB"] + r["optimizer_MB"] + r["grads_kept_MB"]
    r["with_live_adapter_MB"] = r["persistent_training_state_MB"] + r["live_MB"]
    from idletune.gpu import FastDecoder

    dec = FastDecoder(pm, "live", max_len=8192)
    r["serving_copies_and_8k_kv_cache_MB"] = dec.serving_bytes() / MB
    del dec, eng, pm, m, opt
    torch.cuda.empty_cache()
    return r


def full_ft(name):
    m = C.build(name)
    m.train()
    params = [p for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    x = torch.randint(0, 1000, (8, 512), device="cuda")
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(2):
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        r = {"weights_MB": weights / MB, "optimizer_MB": nbytes(state) / MB, "grads_MB (bf16, during a step)": nbytes(params) / MB,
             "peak_MB": torch.cuda.max_memory_allocated() / MB,
             "peak_extra_over_weights_MB": (torch.cuda.max_memory_allocated() - weights) / MB}
    except torch.OutOfMemoryError as e:
        r = {"weights_MB": weights / MB, "error": "out of memory: " + str(e).split("\n")[0][:200],
             "card_MB": torch.cuda.get_device_properties(0).total_memory / MB}
    del opt, m, params
    torch.cuda.empty_cache()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b,llama-3-8b")
    a = ap.parse_args()
    tok = C.load_tokenizer()
    res = C.header()
    rows = []
    for name in a.shapes.split(","):
        r = {"lora_rank8": lora_state(name, tok)}
        r["full_finetuning"] = full_ft(name)
        res[name] = r
        lo, fu = r["lora_rank8"], r["full_finetuning"]
        rows.append([name, lo["persistent_training_state_MB"], lo["with_live_adapter_MB"], lo["serving_copies_and_8k_kv_cache_MB"],
                     fu.get("optimizer_MB", "-"), fu.get("peak_MB", fu.get("error", "-")[:30])])
    print(f"memory ({res['device']})")
    C.table(rows, ["shape", "LoRA train state MB", "+ live adapter MB", "GPU serving copies + 8k KV MB",
                   "full FT optimizer MB", "full FT peak MB"])
    C.write(res, "gpu_memory.json")


if __name__ == "__main__":
    main()
