"""Issue 6, question 4: publish latency — an accepted training step to new weights serving.

On idletune's real service (random-weight model, GPU path installed): the candidate adapter
gets new weights (as a training round leaves it), then ``WeightUpdater.publish`` runs. Timed:
(a) in memory: candidate → live copy and re-merging the serving weights, until the device is
done; (b) the whole publish, with the snapshot written to disk (fsynced). Also checks that the
next request is served from the new weights (logits of the fast path vs the PEFT forward).

Usage: python bench/gpu_publish.py [OUT.json] [--shape qwen2.5-0.5b] [--n 20]
"""
import argparse
import tempfile
import time

import torch

import gpu_common as C


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--n", type=int, default=20)
    a = ap.parse_args()
    from idletune.training import adapters
    from idletune.training.adapters import LIVE, TRAIN

    res = C.header()
    with tempfile.TemporaryDirectory() as tmp:
        svc = C.service(a.shape, tmp)
        fast = svc.inference.fast
        res["gpu_path"] = fast is not None
        if fast is None:
            raise SystemExit("GPU path not installed")
        g = torch.Generator(device="cuda").manual_seed(3)
        cand = adapters.adapter_tensors(svc.model, TRAIN)

        def train_like():
            with torch.no_grad():
                for t in cand.values():
                    t.copy_(torch.randn(t.shape, generator=g, device="cuda") * 0.01)
            torch.cuda.synchronize()

        mem, full = [], []
        for i in range(a.n):
            train_like()
            t0 = time.perf_counter()
            with svc.engine.lock:
                adapters.copy_adapter(svc.model, TRAIN, LIVE)
                svc.weights.version += 1  # what publish does in memory (the disk part is timed below)
            fast.sync()
            torch.cuda.synchronize()
            mem.append(time.perf_counter() - t0)
        for i in range(max(3, a.n // 4)):
            train_like()
            t0 = time.perf_counter()
            svc.weights.publish({"bench": i})
            torch.cuda.synchronize()
            full.append(time.perf_counter() - t0)
        # the next request is served from the new weights
        prompt = torch.randint(100, len(svc.tokenizer) - 1, (64,)).tolist()
        with fast.session():
            got = fast.decoder.prefill(prompt).float()
        adapters.activate(svc.model, LIVE)
        with torch.no_grad():
            ref = svc.model(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        n_params = sum(t.numel() for t in cand.values())
        res[a.shape] = {"adapter_params": n_params, "in_memory_ms_p50": 1e3 * C.med(mem),
                        "in_memory_ms_max": 1e3 * max(mem), "merge_only_ms_p50": 1e3 * C.med(fast.refresh_seconds),
                        "publish_with_snapshot_ms_p50": 1e3 * C.med(full),
                        "served_vs_peft_rel_err": float((got - ref).norm() / ref.norm()),
                        "served_argmax_same": bool(got.argmax() == ref.argmax())}
        svc.close()
    r = res[a.shape]
    print(f"publish latency, rank 8, {a.shape} ({res['device']})")
    C.table([[a.shape, r["in_memory_ms_p50"], r["in_memory_ms_max"], r["publish_with_snapshot_ms_p50"], r["served_vs_peft_rel_err"]]],
            ["shape", "in memory p50 ms", "in memory max ms", "with snapshot p50 ms", "served vs PEFT rel err"])
    C.write(res, "gpu_publish.json")


if __name__ == "__main__":
    main()
