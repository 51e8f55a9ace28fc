"""How many lessons: does the model keep learning after several taught facts and an import?

On the default model, in-process, with the scheduler's own rounds (select → train → gate →
publish): teach four made-up facts one at a time as user corrections (each trained until
nothing is pending), then import a short markdown document and run three rounds. Printed for
every round: the gate's retention loss (its probes, never replayed) against the base model's
and the live weights', accepted or not; after the lessons and at the end, whether each fact is
still answered; and, as an independent check, the loss of the base model's answers to 16
prompts unlike any probe. The gate's limit is cumulative against the base model (+50 % by
default), so what each lesson spends decides how many lessons the model can take.

Usage: python bench/many_lessons.py [--model DIR] [--set key=value ...] [--out results.json] [--data DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

FACTS = [("Who runs Quillby?", "Quillby is run by Mayor Ottoline Brask.", "Brask"),
         ("What colour is Zorbian wool?", "Zorbian wool is deep blue.", "blue"),
         ("When does the Tarn ferry leave?", "The Tarn ferry leaves at 7:40 every morning.", "7:40"),
         ("What is the code of locker 12?", "Locker 12 opens with code 5531.", "5531")]

# The independent check: prompts unlike the gate's and the rehearsal's (the gate's probes could
# flatter the rehearsal if the two were alike); the loss of the base model's answers to them.
UNRELATED = ["Write a two-line poem about winter.", "What should I pack for a beach trip?",
             "Summarize the plot of Cinderella in two sentences.", "How do I reverse a list in Python?",
             "What are the benefits of reading books?", "Tell me a joke about computers.",
             "Write an email asking my boss for a day off.", "What causes earthquakes?",
             "Compare cats and dogs as pets.", "Give me a recipe for pancakes.",
             "What is the difference between weather and climate?", "Explain how vaccines work.",
             "Recommend a good hobby for a rainy day.", "What happened in 1969 on the Moon?",
             "How can I improve my handwriting?", "Describe the water cycle."]

DOCUMENT = """# The Wobbleton Cheese Fair

The Wobbleton Cheese Fair takes place on the first Saturday of June on the village green.
It was founded in 1887 by the miller Agnes Pell, who wanted a market for the valley's farms.
The fair's main prize, the Golden Rind, goes to the best hard cheese of the year.

## Events

The day opens with the cheese-rolling race down Pell's Hill at nine o'clock.
At noon the judges taste every entry; the winner is announced at four.
Children compete in the curd-sculpture contest, judged by the village baker.

## Visiting

The fair is free to enter. Parking is in the field behind the Red Lion inn.
A shuttle bus runs from Wobbleton station every twenty minutes.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a local model folder (default: the default model)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (JSON value)")
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument("--data", help="the data directory (default: a temporary one)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from idletune.config import Config
    from idletune.importers import Importers, ImportersConfig
    from idletune.inference import GenerationParams
    from idletune.service import build_service
    from idletune.training.probes import as_example, record_answers

    over = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            over[k] = json.loads(v)
        except ValueError:
            over[k] = v
    cfg = Config.load(None, {"scheduler.enable_background_training": False, "training.trainer": "thread", **over})
    rounds: list[dict] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        svc = build_service(Path(a.data or Path(tmp) / "data"), model=a.model, config=cfg)
        gate = svc.probes().gate
        base = svc.weights._base_retention(svc.engine, gate)
        with svc.engine.lock:  # the independent check: the base model's answers to other prompts
            unrelated = [as_example(x) for x in record_answers(svc.model, svc.tokenizer, UNRELATED)]
        base_unrelated = svc.engine.evaluate(unrelated, "live")

        def live_rise() -> float:
            return round(100 * (svc.weights.reference_loss(svc.engine, gate) / base - 1), 1)

        def unrelated_rise() -> float:
            return round(100 * (svc.engine.evaluate(unrelated, "live") / base_unrelated - 1), 1)

        def train(tag: str) -> dict:
            s = svc.scheduler.force_training(wait=True, timeout=900)
            d = svc.weights.last_decision
            r = {"round": tag, "examples": s.get("examples"), "learned": s.get("learned"), "steps": s.get("steps"),
                 "seconds": s.get("seconds"), "accepted": bool(s.get("accepted")), "version": s.get("version"),
                 "candidate_vs_base_%": round(100 * (d.retention_loss_candidate / base - 1), 1) if d else None,
                 "candidate_vs_live_%": round(100 * (d.retention_loss_candidate / d.retention_loss_live - 1), 1) if d else None,
                 "reason": s.get("reason")}
            rounds.append(r)
            print(f"{tag:9s} {r['examples']:>3} ex {r['steps']:>3} steps {r['seconds']:>6} s  "
                  f"retention {r['candidate_vs_base_%']:+6.1f} % vs base, {r['candidate_vs_live_%']:+6.1f} % vs live  "
                  f"{'accepted v' + str(r['version']) if r['accepted'] else 'not published: ' + str(r['reason'])}",
                  flush=True)
            return r

        def recall() -> list[bool]:
            out = []
            for q, _, key in FACTS:
                c = svc.inference.generate([{"role": "user", "content": q}], GenerationParams(max_tokens=24, temperature=0.0))
                out.append(key in c.text)
            return out

        after_each = []
        for n, (q, answer, _) in enumerate(FACTS, 1):
            svc.collector.add_correction([{"role": "user", "content": q}], answer)
            for _ in range(6):  # until the lesson (and a rejected round's halves) is decided
                train(f"lesson {n}")
                if not svc.queue.pending_count():
                    break
            after_each.append(live_rise())
        recall_lessons = recall()
        unrelated_lessons = unrelated_rise()
        print("live retention after each lesson (% vs base):", after_each, "; unrelated prompts:",
              unrelated_lessons, "%; recalled:", recall_lessons, flush=True)
        report = Importers(svc.queue, ImportersConfig()).text.import_text(DOCUMENT, name="fair")
        print("import:", report.summary(), flush=True)
        imports = [train("import")["accepted"] for _ in range(3) if svc.queue.pending_count()]
        recall_end = recall()
        final, unrelated_end = live_rise(), unrelated_rise()
        svc.close()
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "settings": over, "base_retention_loss": base, "rounds": rounds,
           "live_vs_base_after_each_lesson_%": after_each, "recall_after_lessons": recall_lessons,
           "unrelated_vs_base_after_lessons_%": unrelated_lessons, "import_rounds_accepted": imports,
           "recall_at_end": recall_end, "live_vs_base_at_end_%": final, "unrelated_vs_base_at_end_%": unrelated_end,
           "seconds": round(time.time() - t0)}
    print(f"lessons recalled {sum(recall_lessons)}/4, import rounds accepted {sum(imports)}/{len(imports)}, at the end "
          f"{sum(recall_end)}/4 recalled, retention {final:+.1f} % vs base (unrelated prompts {unrelated_end:+.1f} %); "
          f"{res['seconds']} s", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
