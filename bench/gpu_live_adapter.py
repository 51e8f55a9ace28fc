"""Issue 6, question 2: serving with a live adapter vs the bare base model.

Per-token decode time of idletune's GPU path with a live rank-8 adapter (merged) vs the same
path on the bare base model (no adapter), and how far the merged bf16 weights' logits are from
the unmerged PEFT forward (the adapter applied on the fly, what the portable path serves).

The bare and the live decoder are two instances, each with its own compiled kernels and CUDA
graphs, and two instances of one code can differ by a few per cent (run CD: 1.5B, 2.00 against
2.10 ms a token, each steady within 0.1 %). So the live decoder is also timed with its adapter
zeroed and re-merged in place (``refresh(full=False)``, as a publish does): the same kernels on
the same buffers, so ``live vs zeroed`` is what the adapter itself costs inside one decoder.

Usage: python bench/gpu_live_adapter.py [OUT.json] [--shapes qwen2.5-0.5b,qwen2.5-1.5b]
"""
import argparse

import torch

import gpu_common as C
from gpu_decode import fast_latency


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from idletune.gpu import FastDecoder
    from idletune.training import adapters

    tok = C.load_tokenizer()
    res = C.header()
    stream = torch.cuda.Stream(priority=-1)
    rows = []
    for name in a.shapes.split(","):
        base = C.build(name, tok)
        prompt = torch.randint(100, len(tok) - 1, (256,)).tolist()
        with torch.cuda.stream(stream):
            bare = FastDecoder(base, max_len=1024, stream=stream)
            bare_t = []
            for _ in range(a.rounds):
                bare_t.append(fast_latency(bare, prompt, reps=3)["per_token_ms"])
            bare_logits = bare.prefill(prompt).float().clone()
        with torch.no_grad():  # the noise floor: our bf16 path vs Hugging Face's, no adapter at all
            hf_bare = base(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        floor = float((bare_logits - hf_bare).norm() / hf_bare.norm())
        del bare
        pm = C.attach(base, live_scale=0.01)
        with torch.cuda.stream(stream):
            live = FastDecoder(pm, "live", max_len=1024, stream=stream)
            live_t = [fast_latency(live, prompt, reps=3)["per_token_ms"] for _ in range(a.rounds)]
            # merged bf16 serving weights vs PEFT's unmerged forward (both bf16), last prompt position
            got = live.prefill(prompt).float().clone()  # a copy: the buffer is reused
        adapters.activate(pm, adapters.LIVE)
        with torch.no_grad():
            ref = pm(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()
            with pm.disable_adapter():
                plain = pm(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        err = float((got - ref).norm() / ref.norm())
        effect = float((ref - plain).norm() / ref.norm())
        with torch.no_grad():  # the same decoder, its adapter zeroed: B = 0 makes every delta 0
            for k, t in adapters.adapter_tensors(pm, adapters.LIVE).items():
                if "lora_B" in k:
                    t.zero_()
        with torch.cuda.stream(stream):
            live.refresh(full=False)
            zero_t = [fast_latency(live, prompt, reps=3)["per_token_ms"] for _ in range(a.rounds)]
        r = {"bare_per_token_ms": C.med(bare_t), "live_per_token_ms": C.med(live_t),
             "live_zeroed_per_token_ms": C.med(zero_t),
             "bare_runs": bare_t, "live_runs": live_t, "live_zeroed_runs": zero_t,
             "overhead_pct": 100 * (C.med(live_t) / C.med(bare_t) - 1),
             "overhead_same_decoder_pct": 100 * (C.med(live_t) / C.med(zero_t) - 1),
             "merged_vs_unmerged_rel_err": err, "bare_fast_vs_hf_rel_err (bf16 noise floor)": floor, "adapter_effect_rel": effect,
             "argmax_same": bool(got.argmax() == ref.argmax())}
        res[name] = r
        rows.append([name, r["bare_per_token_ms"], r["live_per_token_ms"], r["overhead_pct"], r["live_zeroed_per_token_ms"],
                     r["overhead_same_decoder_pct"], err, floor, effect])
        del live, pm, base
        torch.cuda.empty_cache()
    print(f"live adapter vs bare base, GPU path ({res['device']})")
    C.table(rows, ["shape", "bare ms/tok", "live ms/tok", "vs bare %", "live zeroed ms/tok", "vs zeroed %",
                   "merged vs unmerged", "noise floor", "adapter effect"])
    C.write(res, "gpu_live_adapter.json")


if __name__ == "__main__":
    main()
