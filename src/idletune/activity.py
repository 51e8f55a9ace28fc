"""ActivityTracker: who is using the model right now, and since when it has been idle.

Inference marks each request with :meth:`request`; the scheduler reads :meth:`idle_for` and the
training engine polls :meth:`should_yield` at every layer boundary, so a request that arrives
mid-step preempts training within about one layer's compute. A trainer in a process of its own
(``training.trainer = "process"``) reads the same state from shared memory
(:meth:`ActivityTracker.shared`, :class:`SharedActivity`).
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator


class ActivityTracker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_activity = time.monotonic()
        self._turn = False
        self._preempt = True
        self._no_turn = threading.Event()
        self._no_turn.set()
        self.preemptions = 0
        self._stopping = False
        self._shared = None  # [in flight, last activity, turn, preempt, stopping], once a trainer process reads them

    @property
    def preempt_training(self) -> bool:
        """Whether a request preempts training (``scheduler.pause_on_inference``)."""
        return self._preempt

    @preempt_training.setter
    def preempt_training(self, value: bool) -> None:
        with self._lock:
            self._preempt = bool(value)
            self._share()

    def stopping(self) -> None:
        """The service is closing: training yields from now on, as to a request that never ends
        (a round in progress stops at its next layer and is not published)."""
        with self._lock:
            self._stopping = True
            self._share()

    def is_stopping(self) -> bool:
        return self._stopping

    def shared(self):
        """This tracker's state in shared memory, kept up to date from this call on, for a
        trainer process (:class:`SharedActivity` reads it there)."""
        if self._shared is None:
            import multiprocessing

            with self._lock:
                self._shared = multiprocessing.get_context("spawn").RawArray("d", 5)
                self._share()
        return self._shared

    def _share(self) -> None:
        # called with self._lock held: two writers never interleave their stores
        s = self._shared
        if s is not None:  # each entry one aligned 8-byte store: a reader never sees half of one
            s[0], s[1], s[2], s[3], s[4] = (self._in_flight, self._last_activity, float(self._turn),
                                            float(self._preempt), float(self._stopping))

    @contextmanager
    def request(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            self._last_activity = time.monotonic()
            self._share()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_activity = time.monotonic()
                self._share()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def should_yield(self) -> bool:
        """True while any request is in flight (read without a lock: a plain int read is atomic),
        except during a training turn granted under sustained load, or when preemption is off
        (``scheduler.pause_on_inference = false``: a step then finishes before a request waiting
        for the model lock gets it); and once the service is stopping."""
        return self._stopping or (self._in_flight > 0 and not self._turn and self._preempt)

    @contextmanager
    def training_turn(self) -> Iterator[None]:
        """Training does not yield to requests inside this block (the scheduler's minimum
        training share), and requests that need the model lock wait for the block to end
        (:meth:`wait_for_training_turn`) instead of competing with each training step for it —
        a lock is not fair, and 16 waiting requests would otherwise starve the turn."""
        with self._lock:
            self._turn = True
            self._share()
        self._no_turn.clear()
        try:
            yield
        finally:
            with self._lock:
                self._turn = False
                self._share()
            self._no_turn.set()

    def wait_for_training_turn(self, timeout: float = 120.0) -> None:
        """Block while a training turn is running (returns at once otherwise); after ``timeout``
        a request goes on and takes its chance at the model lock between training steps."""
        self._no_turn.wait(timeout)

    def idle_for(self) -> float:
        """Seconds since the last request ended (0 while one is in flight)."""
        with self._lock:
            if self._in_flight:
                return 0.0
            return time.monotonic() - self._last_activity


class SharedActivity:
    """:meth:`ActivityTracker.should_yield` and :meth:`~ActivityTracker.idle_for` in a trainer
    process, read from the serving process's tracker (:meth:`ActivityTracker.shared`) without a
    lock. ``time.monotonic`` is one clock for every process of the machine."""

    def __init__(self, state) -> None:
        self._state = state
        self._parent = os.getppid()

    def should_yield(self) -> bool:
        """Also once the serving process is gone (this process then has another parent): a
        trainer process left behind stops at its next layer boundary, and exits at the pipe's end."""
        s = self._state
        return bool(s[4]) or (s[0] > 0 and not s[2] and bool(s[3])) or os.getppid() != self._parent

    def idle_for(self) -> float:
        s = self._state
        return 0.0 if s[0] > 0 else time.monotonic() - s[1]

    def is_stopping(self) -> bool:
        return bool(self._state[4])
