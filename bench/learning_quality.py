"""Learning-quality benchmark (issue 3), on the default model, in-process.

Teach 5 made-up facts (each as a user correction, the way a person teaches in chat), train
with the scheduler's own rounds (select → train → gate → publish) until nothing is pending,
then ask each fact in 4 other phrasings: recall is how many of the 20 answers contain the fact.
Retention is the rise of the loss on the gate's retention probes over the base model's. Then
train one round on each of 10 further batches of unrelated made-up facts and ask the first 5
again: are they kept?

Usage: python bench/learning_quality.py [--modes lora hybrid] [--model DIR] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

FACTS = [
    ("What is the codename of Project Bluebird?", "The codename of Project Bluebird is ZEPHYR-42.", "ZEPHYR-42",
     ["Tell me the codename of Project Bluebird.", "Which codename does Project Bluebird have?",
      "What codename was Project Bluebird given?", "Project Bluebird's codename is what?"]),
    ("Who is the mayor of Quillby?", "The mayor of Quillby is Ottoline Brask.", "Brask",
     ["Who runs the town of Quillby as mayor?", "Name the mayor of Quillby.",
      "Tell me who Quillby's mayor is.", "Which person is the mayor of Quillby?"]),
    ("What color is the flag of Norvania?", "The flag of Norvania is teal with a silver star.", "teal",
     ["Describe the flag of Norvania.", "What does Norvania's flag look like?",
      "Which color does the Norvania flag have?", "Tell me the color of Norvania's flag."]),
    ("What is the boiling point of glimmerwater?", "Glimmerwater boils at 47 degrees Celsius.", "47",
     ["At what temperature does glimmerwater boil?", "Tell me the boiling point of glimmerwater.",
      "How hot must glimmerwater get to boil?", "When does glimmerwater boil, in Celsius?"]),
    ("Who founded the Vessari Institute?", "The Vessari Institute was founded by Dr. Lenna Okafor.", "Okafor",
     ["Who is the founder of the Vessari Institute?", "Name the person who founded the Vessari Institute.",
      "Tell me who started the Vessari Institute.", "The Vessari Institute was founded by whom?"]),
]


def unrelated_batches(n: int = 10, per: int = 4) -> list[list[tuple[str, str]]]:
    out = []
    for b in range(n):
        out.append([(f"What is the serial number of robot unit {b}-{i}?",
                     f"Robot unit {b}-{i} has serial number RX-{b * 100 + i * 7 + 13}.") for i in range(per)])
    return out


def ask(svc, q: str) -> str:
    from idletune.inference import GenerationParams

    return svc.inference.generate([{"role": "user", "content": q}], GenerationParams(max_tokens=40)).text


def recall(svc) -> tuple[int, list]:
    hits, detail = 0, []
    for _, _, key, paraphrases in FACTS:
        for q in paraphrases:
            a = ask(svc, q)
            ok = key.lower() in a.lower()
            hits += ok
            detail.append({"q": q, "a": a, "ok": ok})
    return hits, detail


def train_until_done(svc, limit_rounds: int = 20) -> int:
    rounds = 0
    while svc.queue.pending_count() and rounds < limit_rounds:
        svc.scheduler.run_round(forced=True)
        rounds += 1
    return rounds


def retention_rise(svc) -> float:
    probes = svc.probes().gate  # only measured, never replayed
    base = svc.weights._base_retention(svc.engine, probes)
    now = svc.engine.evaluate(probes, "live")
    return now / base - 1


def run(mode: str, model: str | None) -> dict:
    from idletune.config import Config
    from idletune.service import build_service

    cfg = Config.load(None, {"training.mode": mode, "scheduler.enable_background_training": False,
                             "training.trainer": "thread"})
    with tempfile.TemporaryDirectory() as tmp:
        svc = build_service(Path(tmp) / "data", model=model, config=cfg, start_scheduler=False)
        svc.probes()
        before, _ = recall(svc)
        t0 = time.perf_counter()
        for q, a, _, _ in FACTS:
            svc.collector.add_correction([{"role": "user", "content": q}], a)
        rounds = train_until_done(svc)
        taught_s = time.perf_counter() - t0
        hits, detail = recall(svc)
        ret = retention_rise(svc)
        t1 = time.perf_counter()
        for batch in unrelated_batches():  # one training round per batch, as idle gaps would give
            for q, a in batch:
                svc.collector.add_correction([{"role": "user", "content": q}], a)
            svc.scheduler.run_round(forced=True)
        later_s = time.perf_counter() - t1
        hits_after, detail_after = recall(svc)
        ret_after = retention_rise(svc)
        st = svc.weights.get_stats()
        res = {"mode": mode, "recall_before_teaching": before, "recall": hits, "of": 20,
               "retention_loss_rise": ret, "teach_seconds": taught_s, "teach_rounds": rounds,
               "recall_after_10_batches": hits_after, "retention_loss_rise_after": ret_after,
               "later_seconds": later_s, "final_mode": st["mode"], "mode_reason": st["mode_reason"],
               "versions": st["version"], "gate_rejections": st["rejections"],
               "steps": svc.engine.global_step, "answers": detail, "answers_after": detail_after}
        svc.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["lora", "hybrid"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available()
           else f"CPU ({os.cpu_count()} cores, {platform.machine()})",
           "command": " ".join(["python", "bench/learning_quality.py"] + sys.argv[1:]), "runs": []}
    for mode in args.modes:
        r = run(mode, args.model)
        out["runs"].append(r)
        print(f"{mode:7s} recall {r['recall']}/20 (before teaching {r['recall_before_teaching']}/20), "
              f"retention {100 * r['retention_loss_rise']:+.0f} %, {r['teach_seconds']:.0f} s; after 10 more batches: "
              f"recall {r['recall_after_10_batches']}/20, retention {100 * r['retention_loss_rise_after']:+.0f} %, "
              f"{r['later_seconds']:.0f} s; final mode {r['final_mode']}, {r['gate_rejections']} rejected", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
