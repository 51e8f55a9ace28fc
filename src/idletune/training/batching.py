"""BatchManager: what trains next, and how many examples go in a step.

- Rounds take pending examples priority first (corrections, then chat, then imports), but a
  quarter of each round's places go to the oldest lower-priority examples, so nothing starves.
  High-priority examples (corrections, answers rated up) train in rounds of their own: mixed
  with imported chunks of hundreds of tokens, a correction got a fraction of each round's
  steps (each step many times slower) and was not learned in three rounds — after which it
  counts as done (docs/ARCHITECTURE.md, "A training round"). They are few, and each has at
  most ``max_attempts`` rounds, so the rest waits a few rounds at most.
- A round the quality gate rejects is tried again in two halves (higher priority first), each
  a round of its own: one harmful example (a garbled import, a degenerate answer) no longer
  takes the whole round's examples down with it after ``max_attempts`` rejections; the others
  are accepted in a smaller round. Every round still counts as an attempt for its examples, so
  splitting adds at most a few rounds (16 → 8 → 4 within three attempts).
- Batch size adapts to idleness: ``batch_size`` while the user is around, growing to 16–32
  after long idle, always within a token budget.
- Each batch carries a few replayed examples (already trained, or the base model's own answers
  to generic prompts), so earlier lessons and general ability are kept.
"""
from __future__ import annotations

import random

from ..config import TrainingConfig
from ..examples import Priority, Status, TrainingExample
from .data import Encoded


class BatchManager:
    def __init__(self, config: TrainingConfig, *, round_size: int = 16, token_budget: int = 8192, seed: int = 0):
        self.config = config
        self.round_size = round_size
        self.token_budget = token_budget
        self._rng = random.Random(seed)
        self._retry: list[list[int]] = []  # ids of a rejected round's halves, to try as rounds of their own

    def batch_size(self, idle_seconds: float) -> int:
        """Small batches while the user is active; larger after long idle (capped at 32)."""
        base = self.config.batch_size
        if idle_seconds < 60:
            return base
        if idle_seconds < 600:
            return min(32, max(base, 16))
        return 32

    def select_round(self, queue, limit: int | None = None) -> list[TrainingExample]:
        """Pending examples for the next round: priority first, without starving the rest."""
        limit = limit or self.round_size
        top = queue.pending(limit)
        correcting = bool(top) and top[0].priority == Priority.HIGH
        while self._retry:  # the halves of a rejected round, as they still wait
            group = [e for e in (queue.get(i) for i in self._retry[0]) if e is not None and e.status == Status.PENDING]
            if group and correcting and group[0].priority < Priority.HIGH:
                break  # a correction that came meanwhile goes first; the half waits
            self._retry.pop(0)
            if group:
                return group
        if correcting:  # what the user taught, on its own
            return [e for e in top if e.priority == Priority.HIGH]
        if len(top) < limit or not top:
            return top
        reserved = max(1, limit // 4)
        lowest_taken = min(e.priority for e in top)
        starving = []
        for p in sorted(Priority):
            if p < lowest_taken or (p == lowest_taken and p != max(Priority)):
                starving += [e for e in queue.pending(reserved, priority=p) if e.id not in {t.id for t in top}]
        starving = starving[:reserved]
        return top[: limit - len(starving)] + starving

    def split_rejected(self, examples: list[TrainingExample]) -> bool:
        """After the gate rejected a round of these examples: its two halves (higher priority
        first) become the next rounds. False for a round of one (nothing to split)."""
        if len(examples) < 2:
            return False
        ordered = sorted(examples, key=lambda e: -e.priority)  # stable: oldest first within a priority
        half = (len(ordered) + 1) // 2
        self._retry[:0] = [[e.id for e in ordered[:half]], [e.id for e in ordered[half:]]]
        return True

    def replay(self, queue, probes: list[TrainingExample], n: int | None = None) -> list[TrainingExample]:
        """Examples to mix in: half already-trained examples, half retention probes."""
        n = self.config.replay_examples * 4 if n is None else n
        trained = queue.sample(Status.TRAINED, n // 2) if n else []
        pool = list(probes)
        self._rng.shuffle(pool)
        return trained + pool[: n - len(trained)]

    def compose(self, todo: list[Encoded], replay: list[Encoded], batch_size: int, step: int = 0) -> list[Encoded]:
        """One step's batch: unlearned examples first (rotating with ``step`` so each gets its
        turn), then ``replay_examples`` replayed ones."""
        n_replay = min(self.config.replay_examples, len(replay), max(0, batch_size - 1))
        k = max(1, batch_size - n_replay)
        start = (step * k) % len(todo) if len(todo) > k else 0
        batch = (todo[start:] + todo[:start])[:k]
        batch += self._rng.sample(replay, n_replay) if n_replay else []
        # keep within the token budget (padded length × batch)
        while len(batch) > 1 and max(len(e.input_ids) for e in batch) * len(batch) > self.token_budget:
            batch.pop()
        return batch
