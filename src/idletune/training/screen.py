"""Screening: examples that must never train are caught before a round, each with its reason.

- Noise: an example whose mean token loss under the live weights is more than
  ``gate.max_example_loss_margin`` above the model's loss on natural text (the retention probes).
  On the default model random tokens score 14+ nats, natural text in English, other languages or
  code 1.5–6.5, the probes about 1.
- Repetition: a long target that compresses to less than ``gate.min_compression_ratio`` of its
  size (one phrase repeated; natural text stays above 0.3).
- A looping answer: one of the model's own answers (a chat pair it generated) in which one line
  or sentence makes up half the text, three times or more ("Boil an egg:" seven times in 60
  tokens) — too short for the compression check, and training on it would teach the loop.
- Contradiction: several corrections of the same question in one round; the newest is kept.
"""
from __future__ import annotations

import re
import zlib
from collections import Counter

from ..collect import context_key
from ..config import GateConfig
from ..examples import Source, TrainingExample


def screen(examples: list[TrainingExample], engine, gate: GateConfig, reference_loss: float | None = None
           ) -> tuple[list[TrainingExample], list[tuple[TrainingExample, str]]]:
    """Split ``examples`` into those to train and those rejected, with the reason.
    ``reference_loss``: the live model's loss on natural text (None: no noise check)."""
    rejected: list[tuple[TrainingExample, str]] = []
    keep: list[TrainingExample] = []
    for ex in examples:
        loop = _loop(ex.target) if ex.kind == "chat" and ex.source == Source.CHAT else None
        if loop:
            rejected.append((ex, f"the model's answer loops ({loop[0][:40]!r} {loop[1]} times): training on it "
                                 "would teach the loop"))
            continue
        data = ex.target.encode("utf-8")
        if len(data) >= 200:
            ratio = len(zlib.compress(data)) / len(data)
            if ratio < gate.min_compression_ratio:
                rejected.append((ex, f"repetitive text (compresses to {100 * ratio:.0f} % of its size; "
                                     f"limit {100 * gate.min_compression_ratio:.0f} %)"))
                continue
        keep.append(ex)
    # Corrections of the same question: the newest one stands.
    newest: dict[str, TrainingExample] = {}
    for ex in keep:
        if ex.kind == "chat" and ex.source == Source.CORRECTION:
            key = context_key(ex.messages[:-1])
            if key not in newest or (ex.id or 0) > (newest[key].id or 0):
                newest[key] = ex
    superseded = [ex for ex in keep if ex.kind == "chat" and ex.source == Source.CORRECTION
                  and newest[context_key(ex.messages[:-1])] is not ex]
    for ex in superseded:
        rejected.append((ex, f"superseded by a later correction of the same question (example "
                             f"{newest[context_key(ex.messages[:-1])].id})"))
    keep = [ex for ex in keep if ex not in superseded]
    if keep and gate.max_example_loss_margin > 0 and reference_loss is not None:
        limit = reference_loss + gate.max_example_loss_margin
        losses = engine.example_losses(keep, "live")
        # A chat pair whose question is token soup is garbage too, however plain the answer.
        asks = [(i, TrainingExample.from_text(ex.messages[-2]["content"])) for i, ex in enumerate(keep)
                if ex.kind == "chat" and ex.messages[-2]["role"] == "user"]
        ask_loss = dict(zip((i for i, _ in asks), engine.example_losses([a for _, a in asks], "live"))) if asks else {}
        still = []
        for i, (ex, loss) in enumerate(zip(keep, losses)):
            what = "" if not loss > limit else "it"
            if not what and ask_loss.get(i, 0) > limit:
                what, loss = "its question", ask_loss[i]
            if what:
                rejected.append((ex, f"looks like noise: {what} scores loss {loss:.1f} under the live model, more "
                                     f"than {gate.max_example_loss_margin:g} above its {reference_loss:.1f} on natural text"))
            else:
                still.append(ex)
        keep = still
    return keep, rejected


def _loop(text: str) -> tuple[str, int] | None:
    """The line or sentence that makes up half of ``text``, three times or more (None: none)."""
    parts = [p.strip() for p in re.split(r"\n+|(?<=[.!?:])\s+", text) if len(p.strip()) >= 3]
    if not parts:
        return None
    part, n = Counter(parts).most_common(1)[0]
    return (part, n) if n >= 3 and n * len(part) >= 0.5 * len(text.strip()) else None
