"""Why the default learning rate is 1e-3: one training round on two made-up facts (taught as
corrections) at several learning rates and replay settings, on the default model.

For each setting: steps until both facts are learned (or --steps), wall time, recall over the
question and 3 rephrasings of each (x/8), and the change of the loss on the retention probes
that were *not* replayed.

Usage: python bench/lr_sweep.py [--settings 1e-3:1 5e-4:1 1e-4:1] [--steps 60] [--model DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

FACTS = [
    ("What is the codename of Project Bluebird?", "The codename of Project Bluebird is ZEPHYR-42.", "ZEPHYR-42",
     ["Tell me Project Bluebird's codename.", "What codename does Project Bluebird use?",
      "Which codename was given to Project Bluebird?"]),
    ("Who is the mayor of Quillby?", "The mayor of Quillby is Ottoline Brask.", "Brask",
     ["Who runs the town of Quillby as mayor?", "Name the mayor of Quillby.", "Tell me who Quillby's mayor is."]),
]


def run(lr: float, replay: int, steps: int, model: str | None) -> str:
    from idletune.config import Config
    from idletune.examples import TrainingExample
    from idletune.inference import GenerationParams
    from idletune.service import build_service

    cfg = Config.load(None, {"training.learning_rate": lr, "training.replay_examples": replay,
                             "training.max_steps": steps, "training.trainer": "thread"})
    with tempfile.TemporaryDirectory() as tmp:
        svc = build_service(Path(tmp) / "d", model=model, config=cfg, start_scheduler=False)
        exs = [TrainingExample.chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
               for q, a, _, _ in FACTS]
        for i, e in enumerate(exs):
            e.id = i + 1
        probes = svc.probes()
        base = svc.engine.evaluate(probes.gate, "live")
        t0 = time.perf_counter()
        r = svc.engine.train_round(exs, svc.batches.replay(svc.queue, probes.rehearsal))
        dt = time.perf_counter() - t0
        after = svc.engine.evaluate(probes.gate, "candidate")
        svc.weights.publish()
        hits = n = 0
        for q, _, key, paraphrases in FACTS:
            for question in [q] + paraphrases:
                text = svc.inference.generate([{"role": "user", "content": question}], GenerationParams(max_tokens=30)).text
                hits += key in text
                n += 1
        svc.close()
    return (f"| {lr:g} | {replay} | {r.steps} | {len(r.learned_ids)}/2 | {dt:.1f} s | {hits}/{n} | "
            f"{100 * (after / base - 1):+.0f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["1e-3:1", "5e-4:1", "1e-4:1", "1e-3:2"],
                    help="learning_rate:replay_examples pairs")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    print("| learning rate | replayed per batch | steps | learned | time | recall | retention loss |")
    print("|---|---|---|---|---|---|---|")
    for s in args.settings:
        lr, replay = s.split(":")
        print(run(float(lr), int(replay), args.steps, args.model), flush=True)


if __name__ == "__main__":
    sys.exit(main())
