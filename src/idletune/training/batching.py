"""BatchManager: what trains next, and how many examples go in a step.

- Rounds take pending examples priority first (corrections, then chat, then imports), but a
  quarter of each round's places go to the oldest lower-priority examples, so nothing starves.
  High-priority examples (corrections and their rewordings, answers rated up) train in rounds
  of their own: mixed with imported chunks of hundreds of tokens, a correction was one example
  in a dozen, each step took seconds on a CPU, and three rounds (over three minutes) did not
  teach it (docs/BENCHMARKS.md, "A correction made after an import and chats"). After three
  such rounds in a row the next round is mixed again, so what cannot be learned quickly (a
  long answer rated up) does not hold everything else back.
- A round the quality gate rejects is tried again in two halves (higher priority first), each
  a round of its own, a round of one alone: one harmful example (a garbled import, a
  degenerate answer) no longer takes the round's other examples down with it after
  ``max_attempts`` rejections; they are accepted in a smaller round. Every decided round still
  counts as an attempt for its examples, so a round of 16 is split at most twice (16 → 8 → 4).
  A half stays first in line until a round of it is decided (a request's preemption is not a
  decision); a correction that comes meanwhile goes before it. The plan is kept in memory: after
  a restart the usual selection takes over.
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
        self._high_streak = 0  # decided rounds in a row of high-priority examples only

    def batch_size(self, idle_seconds: float) -> int:
        """Small batches while the user is active; larger after long idle (capped at 32)."""
        base = self.config.batch_size
        if idle_seconds < 60:
            return base
        if idle_seconds < 600:
            return min(32, max(base, 16))
        return 32

    def select_round(self, queue, limit: int | None = None) -> list[TrainingExample]:
        """Pending examples for the next round: a rejected round's waiting half, or high-priority
        examples on their own, or priority first without starving the rest (module docstring)."""
        limit = limit or self.round_size
        top = queue.pending(limit)
        correcting = bool(top) and top[0].priority == Priority.HIGH and self._high_streak < 3
        while self._retry:
            group = [e for e in (queue.get(i) for i in self._retry[0]) if e is not None and e.status == Status.PENDING]
            if not group:  # trained, rejected or withdrawn since
                self._retry.pop(0)
                continue
            if correcting and group[0].priority < Priority.HIGH:
                break  # a correction that came meanwhile goes first; the half waits
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

    def round_decided(self, examples: list[TrainingExample], accepted: bool,
                      again: list[TrainingExample] = ()) -> bool:
        """The gate decided a round of ``examples`` (accepted or rejected; not a round a request
        preempted or a rollback replaced): its half leaves the plan. Rejected, those that may
        still train (``again``) come back as two halves, higher priority first, or one alone.
        True if the round was split."""
        if self._retry and {e.id for e in examples} & set(self._retry[0]):
            self._retry.pop(0)
        high = bool(examples) and all(e.priority == Priority.HIGH for e in examples)
        self._high_streak = self._high_streak + 1 if high else 0
        if accepted or not again:
            return False
        ordered = sorted(again, key=lambda e: -e.priority)  # stable: oldest first within a priority
        if len(ordered) == 1:
            self._retry.insert(0, [ordered[0].id])  # alone, not back into a round of sixteen
            return False
        half = (len(ordered) + 1) // 2
        self._retry[:0] = [[e.id for e in ordered[:half]], [e.id for e in ordered[half:]]]
        return True

    def replay(self, queue, probes: list[TrainingExample]) -> list[TrainingExample]:
        """The round's pool of examples to mix in: a sample of already-trained ones (four per
        replayed place in a batch) and every rehearsal probe — the more varied the general
        text beside a lesson, the less the lesson moves the rest (training/probes.py)."""
        if not self.config.replay_examples:
            return []
        return queue.sample(Status.TRAINED, 4 * self.config.replay_examples) + list(probes)

    def compose(self, todo: list[Encoded], replay: list[Encoded], batch_size: int, step: int = 0) -> list[Encoded]:
        """One step's batch: unlearned examples first (rotating with ``step`` so each gets its
        turn), then ``replay_examples`` replayed ones: earlier lessons and probes, half each."""
        n_replay = min(self.config.replay_examples, len(replay), max(0, batch_size - 1))
        k = max(1, batch_size - n_replay)
        start = (step * k) % len(todo) if len(todo) > k else 0
        batch = (todo[start:] + todo[:start])[:k]
        rehearsed: list[Encoded] = []
        if n_replay:
            # half the places for earlier lessons, half for the probes (an odd place to each in
            # turn): a pool of forty probes drawn from evenly left an import's round rehearsing a
            # lesson in one step of eight, and the lessons taught just before were forgotten
            lessons = [r for r in replay if r.key is not None]  # probes have no queue id
            probes = [r for r in replay if r.key is None]
            want = (n_replay + (step % 2 == 0)) // 2
            n_lessons = min(len(lessons), max(want, n_replay - len(probes)))
            rehearsed = self._rng.sample(lessons, n_lessons) + self._rng.sample(probes, min(len(probes), n_replay - n_lessons))
        # keep within the token budget (padded length × batch): fewer new examples first, so a
        # large batch of long chunks keeps its rehearsal
        while len(batch) + len(rehearsed) > 1 and \
                max(len(e.input_ids) for e in batch + rehearsed) * (len(batch) + len(rehearsed)) > self.token_budget:
            (batch if len(batch) > 1 else rehearsed).pop()
        return batch + rehearsed
