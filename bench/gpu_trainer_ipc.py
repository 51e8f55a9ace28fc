"""A prototype of the trainer process, its weights mapped from the serving process (CUDA IPC).

Runs DW–DZ (``gpu_trainer_process.py``) measured chat beside a trainer in a process of its own,
but that trainer was a second service with a copy of the model. The design that follows
(docs/BENCHMARKS.md, "Fourteenth session") has the serving process own every weight and the
trainer map them: the frozen base (no second copy) and both adapters, which the trainer trains
(candidate) and publishes (candidate → live) in place. Three questions before building it:

1. Does idletune's engine train as fast on mapped weights in another process (the layers
   compiled and replayed as CUDA graphs there) as in a thread of the serving process?
2. Publish across processes: the trainer copies candidate → live and tells the serving process,
   which re-merges its serving copies (``FastDecoder.refresh``). Time from the trainer's message
   to the merged weights on the device (target ≤ 5 ms at rank 8, 0.5B).
3. Are the served weights then right? The fast path's logits against the PEFT forward of the
   serving process's own model, whose live adapter the trainer wrote.

The trainer process builds the model on the meta device, attaches the two adapters as the service
does, and binds every parameter and buffer to the serving process's tensor of the same name
(``adapters.bind_tensors``, which ``training.trainer = "process"`` uses too, through its own
calls: ``training/remote.py``; this bench times the pieces apart).

Status: not yet seen working on a GPU. Its first run (EA, fourteenth session) did not finish
within 420 s, its output (piped through tail) lost. Run on the CPU afterwards: the binding left
the adapters' cached tensor lists holding the meta tensors (the engine would have trained
those, and the first publish failed), now made again after binding; and the bench waited 900 s
for a trainer process that had died, now noticed at once. Likely what happened; not shown.

Usage: python bench/gpu_trainer_ipc.py [OUT.json] [--shape qwen2.5-0.5b] [--alone-s 15] [--publishes 20]
"""
import argparse
import math
import tempfile
import threading
import time

import torch
import torch.multiprocessing as tmp_mp

import gpu_common as C
from gpu_training import fixed_batch


def _trainer_main(model_dir, tensors, go, stop, publish_now, out_q, steps_v, warmup_steps):
    """The trainer process: the model's structure on the meta device, its tensors the serving
    process's; idletune's engine with its layers compiled and graphed; publishes on request."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from idletune.config import Config
    from idletune.gpu.training import compile_layers, wanted
    from idletune.training.adapters import attach_lora, bind_tensors, copy_adapter, LIVE, TRAIN
    from idletune.training.engine import TrainingEngine
    from idletune.training.weightsets import LoraWeights

    t_start = time.perf_counter()
    torch.cuda.set_device(0)
    cfg = Config()
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16)
    model = attach_lora(base, cfg.training.lora, structure_only=True)
    bind_tensors(model, tensors)
    bound = len(tensors)
    left_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    tok = AutoTokenizer.from_pretrained(model_dir)
    eng = TrainingEngine(model, tok, cfg.training, weights=LoraWeights(model), idle_for=lambda: math.inf)
    how = wanted(cfg.training.compile, model, fast_path=True)
    compile_layers(model, graphs=how == "graphs")
    eng.graphs = how == "graphs"
    examples = fixed_batch(tok, chat=False)
    lo = torch.cuda.Stream(priority=0)
    with torch.cuda.stream(lo):
        done = 0
        while done < warmup_steps:
            done += eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 5).steps
    out_q.put(("ready", {"bound": bound, "left_meta": left_meta[:5], "compile": how,
                         "start_s": round(time.perf_counter() - t_start, 1)}))
    steps = 0
    with torch.cuda.stream(lo):
        while not stop.is_set():
            if publish_now.is_set():
                copy_adapter(model, TRAIN, LIVE)  # the live adapter: the serving process's tensors
                lo.synchronize()
                out_q.put(("published", time.monotonic()))
                publish_now.clear()
                continue
            if not go.is_set():
                time.sleep(0.0005)
                continue
            steps += eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 0.5).steps
            steps_v.value = steps
    out_q.put(("peak_gb", torch.cuda.max_memory_allocated() / 1e9))


def _get(q, proc, timeout: float):
    """The trainer process's next message; fails at once if that process has died."""
    import queue

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise SystemExit(f"the trainer process died (exit code {proc.exitcode})")
    raise SystemExit(f"no message from the trainer process in {timeout:.0f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--alone-s", type=float, default=15.0)
    ap.add_argument("--publishes", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=3)
    a = ap.parse_args()
    from idletune.training import adapters
    from idletune.training.adapters import LIVE

    res = C.header()
    res.update(question="the trainer in a process of its own on mapped weights", shape=a.shape)
    model_dir = C.model_dir(a.shape)
    ctx = tmp_mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        svc = C.service(a.shape, tmp)
        fast, eng = svc.inference.fast, svc.engine
        if fast is None:
            raise SystemExit("GPU path not installed")
        model = svc.model
        tensors = adapters.shared_tensors(model)  # every tensor by every name it has
        go, stop, publish_now = ctx.Event(), ctx.Event(), ctx.Event()
        out_q, steps_v = ctx.Queue(), ctx.Value("i", 0, lock=False)
        # the thread trainer (as shipped) warms up first: both train the same candidate tensors,
        # never at once
        examples = fixed_batch(svc.tokenizer, chat=False)
        eng.idle_for = lambda: math.inf  # the user away: the bench makes no requests
        done = 0
        while done < a.warmup_steps:
            done += eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 5).steps
        torch.cuda.synchronize()
        proc = ctx.Process(target=_trainer_main, args=(str(model_dir), tensors, go, stop, publish_now, out_q, steps_v,
                                                       a.warmup_steps), daemon=True)
        proc.start()
        kind, info = _get(out_q, proc, 900)
        assert kind == "ready", kind
        res["trainer_process"] = info
        print("trainer process:", info, flush=True)

        # 1. training alone: a thread of this process vs the trainer process (mapped weights)
        tstop, tsteps = threading.Event(), [0]

        def thread_trainer():
            while not tstop.is_set():
                tsteps[0] += eng.train_round(examples, batch_size=8, deadline=time.monotonic() + 0.5).steps
        alone = {}
        th = threading.Thread(target=thread_trainer, daemon=True)
        th.start()
        time.sleep(2.0)
        n0, t0 = tsteps[0], time.perf_counter()
        time.sleep(a.alone_s)
        alone["thread"] = (tsteps[0] - n0) / (time.perf_counter() - t0)
        tstop.set()
        th.join()
        go.set()
        time.sleep(2.0)
        n0, t0 = steps_v.value, time.perf_counter()
        time.sleep(a.alone_s)
        alone["process"] = (steps_v.value - n0) / (time.perf_counter() - t0)
        go.clear()
        time.sleep(1.0)
        res["training_alone_steps_per_s"] = alone
        print("training alone, steps a second:", {k: round(v, 2) for k, v in alone.items()}, flush=True)

        # 2. publish across processes: the trainer's message → serving copies re-merged
        merge_only, across = [], []
        dec = fast.decoder
        for i in range(a.publishes):
            go.set()
            time.sleep(0.3)  # a little training: the candidate moves
            go.clear()
            time.sleep(0.6)  # the round in progress ends
            publish_now.set()
            kind, t_sent = _get(out_q, proc, 60)
            assert kind == "published", kind
            t1 = time.perf_counter()
            with torch.cuda.stream(fast.stream):
                dec.refresh(full=False)
                fast.stream.synchronize()
            t2 = time.perf_counter()
            merge_only.append(t2 - t1)
            across.append(time.monotonic() - t_sent)
        res["publish_across_ms"] = {"p50": 1e3 * C.med(across), "max": 1e3 * max(across),
                                    "merge_only_p50": 1e3 * C.med(merge_only)}
        print("publish across processes, ms:", {k: round(v, 2) for k, v in res["publish_across_ms"].items()},
              flush=True)

        # 3. served = what the trainer published: fast path vs this process's PEFT forward
        prompt = torch.randint(100, len(svc.tokenizer) - 1, (64,)).tolist()
        with fast.session():
            got = dec.prefill(prompt).float()
        adapters.activate(model, LIVE)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        live_norm = float(sum(t.float().norm() ** 2 for n, t in adapters.adapter_tensors(model, LIVE).items()
                              if "lora_B" in n) ** 0.5)
        res["served_vs_peft_rel_err"] = float((got - ref).norm() / ref.norm())
        res["served_argmax_same"] = bool(got.argmax() == ref.argmax())
        res["live_lora_B_norm"] = live_norm
        print(f"served vs PEFT forward: relative error {res['served_vs_peft_rel_err']:.4f}, argmax same "
              f"{res['served_argmax_same']}; live adapter's B norm {live_norm:.4f} (0 before any publish)", flush=True)
        stop.set()
        go.set()
        try:
            while True:
                kind, v = out_q.get(timeout=30)
                if kind == "peak_gb":
                    res["trainer_process_peak_gb"] = v
                    break
        except Exception:
            pass
        proc.join(30)
        svc.close()
    C.write(res, "gpu_trainer_ipc.json")


if __name__ == "__main__":
    main()
