"""Issue 6 in full fine-tuning and hybrid mode: the GPU path serves every training mode.

On idletune's real service (random-weight model, GPU path installed, ``training.compile`` as
given: ``auto`` = graphed layers on a GPU):

- **What is served.** The fast decoder's logits for a 64-token prompt against the Hugging Face
  forward of the live weights, and of the weights in training: after the candidate is changed
  (perturbed, so that the two differ by far more than bf16 noise) the decoder must still serve
  the live weights; after ``publish`` the new ones; after a rollback, a mode switch (hybrid:
  LoRA → full → LoRA) the weights the WeightUpdater serves. Reported as relative errors.
- **What requests wait for.** The live change (``GpuServing.changing``): publish's copy into the
  live weights and the serving copies rebuilt, and at a mode switch the decode graphs captured
  again; timed on the host, the device synchronised.
- **Training.** Full fine-tuning steps of 8 × 512 tokens as the service runs them (graphed
  layers by default), ms a step and the losses; with ``--compare-eager`` the same steps from the
  same weights in a second service with ``training.compile = off``: both learn alike.
- **The usual way** (``--compare-plain``): a plain full fine-tuning loop on the same shape, batch
  and lengths, as one writes it without idletune: the Hugging Face forward with its full-vocabulary
  loss, ``backward``, clipping and ``torch.optim.AdamW``; once with bf16 weights stepped in bf16
  ("plain bf16": the least memory, but updates below half a weight's spacing are lost) and once
  with float32 weights under bf16 autocast (the Trainer's ``bf16=True`` recipe, "plain amp",
  which keeps every update, as idletune's float32 master copies do).

Usage: python bench/gpu_modes.py [OUT.json] [--shape qwen2.5-0.5b] [--steps 10] [--compare-eager] [--compare-plain]
"""
import argparse
import tempfile
import time

import torch

import gpu_common as C
from gpu_training import fixed_batch

PROMPT_SEED = 5


def logits_of(svc, which: str, prompt: list[int]) -> torch.Tensor:
    with svc.engine.lock, torch.no_grad():
        svc.weights.ws.use(which)
        svc.model.eval()
        out = svc.model(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        svc.weights.ws.use("candidate")  # as between training steps
    return out


def served_check(svc, prompt: list[int]) -> dict:
    """The decoder's logits against the live weights' and the candidate's (relative errors)."""
    fast = svc.inference.fast
    with fast.session() as version:
        got = fast.decoder.prefill(prompt).float().clone()
    live, cand = logits_of(svc, "live", prompt), logits_of(svc, "candidate", prompt)
    rel = lambda a, b: round(float((a - b).norm() / b.norm()), 4)  # noqa: E731
    return {"version": version, "mode": svc.weights.mode, "vs_live": rel(got, live), "vs_candidate": rel(got, cand),
            "argmax_as_live": bool(got.argmax() == live.argmax())}


@torch.no_grad()
def perturb(svc, scale: float = 0.05) -> None:
    """Change the weights in training by far more than a few steps would: served must not follow."""
    with svc.engine.lock:
        svc.weights.ws.use("candidate")
        g = torch.Generator(device="cuda").manual_seed(11)
        for p in svc.weights.ws.trainable():
            p.add_(torch.randn(p.shape, generator=g, device="cuda", dtype=p.dtype) * scale * (p.abs().mean() + 1e-2))


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t), out


def train(svc, examples, steps: int) -> dict:
    """A warm-up round (compiling, recording graphs), then ``steps`` steps timed."""
    eng = svc.engine
    eng.config.max_steps = 3
    warm_ms, _ = timed(lambda: eng.train_round(examples, batch_size=8))
    eng.config.max_steps = steps
    ms, r = timed(lambda: eng.train_round(examples, batch_size=8))
    losses = [round(m["loss"], 4) for m in eng.metrics_history(steps + 3)]
    return {"mode": eng.mode, "graphs": eng.graphs, "warm_up_round_ms": round(warm_ms), "steps": r.steps,
            "ms_per_step": round(ms / max(1, r.steps), 2), "losses": losses,
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


def plain_full(name: str, steps: int, amp: bool) -> dict:
    """The usual full fine-tuning loop, 8 × 512 tokens a step (see the module's docstring)."""
    from gpu_training import BS, SEQ

    m = C.build(name, dtype=torch.float32 if amp else torch.bfloat16)
    n = sum(p.numel() for p in m.parameters())
    params = list(m.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    m.train()
    x = torch.randint(0, 1000, (BS, SEQ), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = m(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    losses = []
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t = time.perf_counter()
        losses.append(step().detach())
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    r = {"ms_per_step": round(1e3 * dt, 2), "tok_s": round(BS * SEQ / dt), "mfu_6N": round(6 * n * BS * SEQ / dt / C.PEAK_BF16, 4),
         "weights_gb": round(base_mem / 1e9, 2), "peak_extra_gb": round((torch.cuda.max_memory_allocated() - base_mem) / 1e9, 2),
         "losses": [round(float(v), 4) for v in losses[3:8]]}
    del m, opt, params, step
    torch.cuda.empty_cache()
    return r


def live_change_ms(svc) -> float:
    return round(1e3 * svc.inference.fast.refresh_seconds[-1], 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--training-compile", default="auto")
    ap.add_argument("--compare-eager", action="store_true")
    ap.add_argument("--compare-plain", action="store_true", help="the usual full fine-tuning loop, bf16 and amp")
    a = ap.parse_args()
    res = C.header()
    base = {"training.compile": a.training_compile, "training.target_loss": 0.0, "training.target_loss_text": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        # ---- full fine-tuning from the start -------------------------------------------------
        svc = C.service(a.shape, f"{tmp}/full", **base, **{"training.mode": "full"})
        if svc.inference.fast is None:
            raise SystemExit("GPU path not installed")
        tok = svc.tokenizer
        prompt = torch.randint(100, len(tok) - 1, (64,), generator=torch.Generator().manual_seed(PROMPT_SEED)).tolist()
        examples = fixed_batch(tok, chat=False)
        full = {"served": {"start": served_check(svc, prompt)}}
        full["training"] = train(svc, examples, a.steps)
        perturb(svc)
        full["served"]["candidate_changed"] = served_check(svc, prompt)
        ws = svc.weights.ws
        copy = ws.publish
        copied = []
        ws.publish = lambda: copied.append(timed(copy)[0])
        pub_ms, _ = timed(lambda: svc.weights.publish({"bench": 1}))
        ws.publish = copy
        full["publish"] = {"whole_ms_with_snapshot": round(pub_ms), "live_copy_ms": round(copied[0], 2),
                           "serving_copies_rebuilt_ms": live_change_ms(svc)}
        full["served"]["published"] = served_check(svc, prompt)
        perturb(svc)
        svc.weights.rollback(0)
        full["served"]["rolled_back_to_0"] = served_check(svc, prompt)
        full["rollback_live_change_ms"] = live_change_ms(svc)
        res["full"] = full
        if a.compare_eager:
            svc.close()
            del svc, ws, copy
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()  # the eager run's own peak
            eager = C.service(a.shape, f"{tmp}/eager", **{**base, "training.compile": "off"}, **{"training.mode": "full"})
            res["full_eager"] = train(eager, examples, a.steps)
            eager.close()
            del eager
        else:
            svc.close()
            del svc, ws, copy
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

        # ---- hybrid: LoRA, the switch to full fine-tuning, and back ---------------------------
        svc = C.service(a.shape, f"{tmp}/hybrid", **base, **{"training.mode": "hybrid"})
        hy = {"served": {"start": served_check(svc, prompt)}}
        hy["lora_training"] = train(svc, examples, 3)
        perturb(svc, 1.0)
        svc.weights.publish()
        hy["served"]["lora_v1"] = served_check(svc, prompt)
        ms, _ = timed(lambda: svc.weights.switch_to_full("bench: forced"))
        hy["switch_to_full"] = {"whole_ms_with_base_snapshot": round(ms), "live_change_ms": live_change_ms(svc),
                                "decode_graphs": svc.inference.fast.decoder.graphs_captured()}
        hy["served"]["switched_to_full"] = served_check(svc, prompt)
        hy["full_training"] = train(svc, examples, a.steps)
        perturb(svc)
        hy["served"]["full_candidate_changed"] = served_check(svc, prompt)
        svc.weights.publish()
        hy["served"]["full_v2"] = served_check(svc, prompt)
        ms, _ = timed(lambda: svc.weights.switch_to_lora("bench: back"))
        hy["switch_to_lora"] = {"whole_ms": round(ms), "live_change_ms": live_change_ms(svc)}
        hy["served"]["back_to_lora"] = served_check(svc, prompt)
        svc.weights.rollback(1)
        hy["served"]["rolled_back_to_lora_v1"] = served_check(svc, prompt)
        res["hybrid"] = hy
        svc.close()
        del svc
    torch.cuda.empty_cache()
    if a.compare_plain:
        res["plain_full"] = {"bf16": plain_full(a.shape, a.steps, amp=False), "amp": plain_full(a.shape, a.steps, amp=True)}

    print(f"the GPU path in full and hybrid mode, {a.shape} ({res['device']})")
    rows = [[f"{k}/{stage}", c["mode"], c["version"], c["vs_live"], c["vs_candidate"], c["argmax_as_live"]]
            for k in ("full", "hybrid") for stage, c in res[k]["served"].items()]
    C.table(rows, ["stage", "mode", "version", "served vs live", "served vs candidate", "same argmax"])
    tr = [res["full"]["training"], res["hybrid"]["full_training"]] + ([res["full_eager"]] if "full_eager" in res else [])
    C.table([[("full", "hybrid→full", "full, eager")[i], t["graphs"], t["ms_per_step"], t["warm_up_round_ms"],
              t["peak_gb"], " ".join(map(str, t["losses"][-a.steps:][:5]))] for i, t in enumerate(tr)],
            ["training", "graphs", "ms/step", "warm-up round ms", "peak GB", "losses (first 5 timed)"])
    if "plain_full" in res:
        ours = res["full"]["training"]["ms_per_step"]
        C.table([[k, t["ms_per_step"], round(t["ms_per_step"] / ours, 2), t["mfu_6N"], t["weights_gb"], t["peak_extra_gb"],
                  " ".join(map(str, t["losses"]))] for k, t in res["plain_full"].items()],
                ["plain full loop", "ms/step", "idletune full (graphed) speed-up", "MFU (6N)", "weights GB",
                 "peak extra GB", "losses"])
    print("full publish:", res["full"]["publish"], "; hybrid switch to full:", res["hybrid"]["switch_to_full"],
          "; back to LoRA:", res["hybrid"]["switch_to_lora"])
    C.write(res, "gpu_modes.json")


if __name__ == "__main__":
    main()
