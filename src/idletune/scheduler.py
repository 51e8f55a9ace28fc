"""TrainingScheduler: trains in the model's idle time, checks each update, publishes or discards.

A background thread wakes every ``check_interval_ms``. When background training is on, nothing
is in flight, the server has been idle for ``min_idle_time_ms``, other processes leave the CPU
free enough and examples are pending, it runs a round: the engine trains for at most
``max_idle_time_ms`` (yielding at once to any request), then the quality gate compares the
trained weights with the live ones; accepted → published as a new version, rejected → discarded
and the examples marked with the reason. A round cut short by a request is resumed later.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from .activity import ActivityTracker
from .config import SchedulerConfig
from .durable import remove_durably, write_atomic
from .examples import Status
from .training.engine import Preempted
from .training.probes import ProbeSet
from .training.screen import screen

log = logging.getLogger("idletune.scheduler")


class TrainingScheduler:
    def __init__(self, queue, engine, weights, batches, *, activity: ActivityTracker,
                 config: SchedulerConfig | None = None, probes: Callable[[], ProbeSet] = ProbeSet,
                 heldout_examples: int = 32, max_attempts: int = 3, training_mode: str = "lora",
                 paused_file: str | Path | None = None):
        self.queue, self.engine, self.weights, self.batches = queue, engine, weights, batches
        self.activity = activity
        self.config = config or SchedulerConfig()
        self.activity.preempt_training = self.config.pause_on_inference
        self.probes = probes
        self.heldout_examples = heldout_examples
        self.max_attempts = max_attempts
        self.training_mode = training_mode
        self.state = "stopped"
        self.training_count = 0
        self.rounds_rejected = 0
        self.screened_out = 0
        self.last_training_time: float | None = None
        self.last_round: dict | None = None
        self.last_error: str | None = None
        # A pause outlasts a restart: recorded by this file's presence (``pause``/``resume``).
        self.paused_file = Path(paused_file) if paused_file is not None else None
        self._paused = bool(self.paused_file and self.paused_file.exists())
        self._force = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._round_done = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._last_chance = time.monotonic()  # when training last could run (idle, or nothing to do)
        self.starved_rounds = 0

    # ---- control --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread and self._thread.is_alive():
            return
        self._stop.clear()
        self.state = "paused" if self._paused else "idle"
        self._thread = threading.Thread(target=self._run, name="idletune-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self.state = "stopped"

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop background training: no new round starts (one in progress finishes). The pause
        is kept in ``paused_file``, so it holds after a restart until :meth:`resume`."""
        self._paused = True
        self.state = "paused"
        self._record_pause()
        log.info("background training paused (no new round starts; resume to go on)")

    def resume(self) -> None:
        self._paused = False
        if self.state != "stopped" and not self._busy:  # a round in progress sets its own state
            self.state = "idle"
        self._record_pause()
        log.info("background training resumed")
        self._wake.set()

    def _record_pause(self) -> None:
        if self.paused_file is None:
            return
        try:  # durably: a pause made just before a power cut still holds after it
            if self._paused:
                write_atomic(self.paused_file, f"background training paused at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            else:
                remove_durably(self.paused_file)
        except OSError as e:  # the pause itself holds; only a restart would not know of it
            log.warning("could not %s %s (%s): after a restart background training will be %s",
                        "write" if self._paused else "remove", self.paused_file, e,
                        "running" if self._paused else "paused")

    def force_training(self, wait: bool = False, timeout: float = 600.0) -> dict:
        """Train on what is pending now, even if background training is off or paused.
        With ``wait``, block until the round is over and return its summary."""
        done_before = self._rounds_finished()
        self._force.set()
        self._wake.set()
        if not wait:
            return {"started": True, "pending": self.queue.pending_count()}
        deadline = time.monotonic() + timeout
        with self._round_done:
            while self._force.is_set() or self._busy:
                if not (self._thread and self._thread.is_alive()):  # nothing would run it: no silent wait
                    raise RuntimeError("the training scheduler is not running (start() it, or build the service "
                                       "with start_scheduler=True): nothing would train this round")
                if self._rounds_finished() > done_before and not self._force.is_set() and not self._busy:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("training did not finish in time")
                self._round_done.wait(min(left, 0.5))
        return self.last_round or {"trained": 0}

    def _rounds_finished(self) -> int:
        return self.training_count + self.rounds_rejected

    def update_config(self, **changes) -> SchedulerConfig:
        """Change scheduler settings at run time (validated; unknown names are refused)."""
        self.config = dataclasses.replace(self.config, **changes)
        self.activity.preempt_training = self.config.pause_on_inference
        self._wake.set()
        return self.config

    # ---- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.check_interval_ms / 1000)
            self._wake.clear()
            if self._stop.is_set():
                break
            forced = self._force.is_set()
            starved = not forced and self._starved()
            if not forced and not starved and not self._due():
                continue
            if self.activity.should_yield() and not starved:
                continue  # a request is being served; forced training waits for it too
            self._busy = True
            try:
                if starved:
                    finished = self._share_round()
                else:
                    finished = self.run_round(forced=forced)
            except Exception as e:  # keep serving; report the failure in the status
                if self._stop.is_set():  # stopped under it (a trainer process ends with the service)
                    log.info("training round cut short: the service is stopping")
                else:
                    log.exception("training round failed")
                    self.last_error = f"{type(e).__name__}: {e}"
                finished = True
            finally:
                self._busy = False
            if not finished and self._stop.is_set():
                log.info("training round cut short: the service is stopping (its examples stay pending)")
            if forced and (finished or self.queue.pending_count() == 0):
                self._force.clear()
            if finished or starved:  # a turn, even a cut one, is owed again only after another wait
                self._last_chance = time.monotonic()
            with self._round_done:
                self._round_done.notify_all()
            if self.state != "stopped":
                self.state = "paused" if self._paused else "idle"  # paused during the round: say so

    def _due(self) -> bool:
        c = self.config
        if self._paused or not c.enable_background_training:
            return False
        if self.activity.idle_for() * 1000 < c.min_idle_time_ms:
            return False
        if self.queue.pending_count() == 0:
            return False
        return self._cpu_free()

    def _starved(self) -> bool:
        """Examples have waited ``starved_after_ms`` without an idle gap to train in."""
        c = self.config
        now = time.monotonic()
        if (self._paused or not c.enable_background_training or c.min_training_share <= 0
                or self.activity.idle_for() * 1000 >= c.min_idle_time_ms or self.queue.pending_count() == 0):
            self._last_chance = now
            return False
        return now - self._last_chance >= c.starved_after_ms / 1000

    def _share_round(self) -> bool:
        """A round under sustained load: it takes the model between requests, trains for
        ``min_training_share`` of the time it waited, and is gated like any other round."""
        waited = time.monotonic() - self._last_chance
        budget_ms = max(1000, min(self.config.max_idle_time_ms, int(1000 * self.config.min_training_share * waited)))
        log.info("training starved for %.0f s under load: a %.1f s turn between requests", waited, budget_ms / 1000)
        self.starved_rounds += 1
        with self.activity.training_turn():
            return self.run_round(slice_ms=budget_ms)

    def _cpu_free(self) -> bool:
        try:
            import psutil

            others = psutil.cpu_percent(interval=None) - psutil.Process().cpu_percent(interval=None) / psutil.cpu_count()
            return others <= self.config.max_cpu_usage
        except Exception:
            return True

    def run_round(self, forced: bool = False, slice_ms: int | None = None) -> bool:
        """One round: select, train, gate, publish or discard. Returns False if preempted.

        Its evaluations (screening, the gate) wait for gaps between requests; under load that
        leaves none they give up after ``starved_after_ms`` (when a minimum training share is
        set), and the round ends preempted — what was trained stays in the candidate, and the
        scheduler's training turn takes over."""
        c = self.config
        self.engine.max_wait_s = c.starved_after_ms / 1000 if c.min_training_share > 0 else None
        try:
            return self._round(forced, slice_ms)
        except Preempted:
            self.activity.preemptions += 1
            self.state = "preempted"
            return False

    def _round(self, forced: bool, slice_ms: int | None) -> bool:
        # Noise, repetition and superseded corrections never train; each is marked with why.
        # Select again until something is left to train (or nothing is pending).
        probes = self.probes()
        reference = self.weights.reference_loss(self.engine, probes.gate) if probes.gate else None
        while True:
            examples = self.batches.select_round(self.queue)
            if not examples:
                return True
            examples, refused = screen(examples, self.engine, self.weights.gate, reference)
            for ex, reason in refused:
                self.queue.mark_rejected([ex.id], reason)
            self.screened_out += len(refused)
            if examples:
                break
        # Probes: some replayed (self-distillation), the others only measure forgetting: measuring
        # on what was replayed would hide it (training/probes.py).
        self.state = "training"
        replay = self.batches.replay(self.queue, probes.rehearsal)
        trained_since = self.weights.restores  # a rollback from here on replaces what this round trains
        bs = self.batches.batch_size(self.activity.idle_for())
        deadline = time.monotonic() + (slice_ms or self.config.max_idle_time_ms) / 1000
        result = self.engine.train_round(examples, replay, batch_size=bs, deadline=deadline)
        if result.preempted and self.activity.should_yield():
            self.activity.preemptions += 1
            self.state = "preempted"  # resumed in the next idle gap; the steps so far are kept
            return False
        if result.steps == 0:
            return False
        # Gate: retention probes and held-out examples, trained weights vs live weights.
        self.state = "evaluating"
        heldout = self.queue.sample(Status.HELD_OUT, self.heldout_examples) if self.heldout_examples else []
        decision = self.weights.evaluate(self.engine, probes.gate, heldout)
        ids = [e.id for e in examples]
        summary = {"examples": len(ids), "learned": len(result.learned_ids), "steps": result.steps,
                   "seconds": round(result.seconds, 2), "accepted": decision.accepted, "reason": decision.reason,
                   "time": time.time()}
        version = None
        # the user corrected or rated down an answer this round trained on, while it trained: its
        # weights would fight the correction
        withdrawn = self.queue.withdrawn_among(ids) if decision.accepted else []
        if decision.accepted and not withdrawn:
            metrics = dict(self.engine.get_latest_metrics() or {}, examples=len(ids), learned=len(result.learned_ids))
            version = self.weights.publish(metrics, trained_since=trained_since)
        rolled_back = decision.accepted and not withdrawn and version is None
        if withdrawn:
            # nothing published; the rest stay pending and train again (no attempt counted),
            # with the correction
            self.weights.discard_candidate(rejected=False)
            self.engine.reset_optimizer()
            summary.update(accepted=False, reason=f"{len(withdrawn)} of its examples withdrawn by the user while it "
                                                  "trained (corrected or rated down): nothing published; the rest "
                                                  "train again")
        elif rolled_back:
            # rolled back while this round trained or was judged: its weights are gone, and the
            # examples stay pending for a round on the weights rolled back to
            summary.update(accepted=False, reason="a rollback replaced the trained weights; nothing published")
        elif decision.accepted:
            summary["version"] = version
            self.engine.lr_scale = 1.0
            # Learned examples are done; the rest get another round, up to max_attempts. A round
            # cut short by its time slice is no attempt: a slow machine must not give up early.
            attempts = {} if result.preempted else self.queue.record_attempt(ids)
            learned = set(result.learned_ids)
            self.queue.mark_trained([i for i in ids if i in learned or attempts.get(i, 0) >= self.max_attempts])
            self.batches.round_decided(examples, accepted=True)
            self.training_count += 1
        else:
            self.weights.discard_candidate()
            self.engine.reset_optimizer()
            # Retry more gently (half the learning rate) before giving up on what the user taught,
            # and in two smaller rounds: one harmful example must not take the rest down with it.
            attempts = self.queue.record_attempt(ids)
            retry = [i for i in ids if attempts.get(i, 0) < self.max_attempts]
            self.queue.mark_rejected([i for i in ids if i not in retry],
                                     f"update rejected by the quality gate: {decision.reason}")
            self.engine.lr_scale = max(0.125, self.engine.lr_scale / 2)
            summary["retrying"] = len(retry)
            again = set(retry)
            if self.batches.round_decided(examples, accepted=False, again=[e for e in examples if e.id in again]):
                summary["split"] = True
            self.rounds_rejected += 1
        if not rolled_back and not withdrawn:
            self._maybe_switch_mode(decision)
        summary["mode"] = self.weights.mode
        self.last_training_time = time.time()
        self.last_round = summary
        log.info("training round: %s", _describe(summary))
        return True

    def _maybe_switch_mode(self, decision) -> None:
        """Hybrid: LoRA until its loss plateaus, then full fine-tuning from the merged weights;
        back to LoRA (on the merged weights) if the gate rejects full fine-tuning."""
        if self.training_mode != "hybrid":
            return
        if self.weights.mode == "lora" and decision.accepted and self.engine.plateaued():
            self.weights.switch_to_full(
                f"LoRA loss plateaued (EMA improved < {100 * self.engine.config.plateau_min_delta:g} % over "
                f"{self.engine.config.plateau_window} steps): adapter merged, full fine-tuning at "
                f"{self.engine.config.full_learning_rate_factor:g}× the learning rate")
        elif self.weights.mode == "full" and not decision.accepted:
            self.weights.switch_to_lora(f"full fine-tuning rejected by the gate ({decision.reason}); "
                                        "back to LoRA on the merged weights")

    # ---- status ---------------------------------------------------------------------------------
    def get_stats(self) -> dict:
        alive = bool(self._thread and self._thread.is_alive())
        return {
            "state": self.state,
            "is_scheduled": alive and self.config.enable_background_training and not self._paused,
            "is_training_active": self._busy,
            "paused": self._paused,
            "training_count": self.training_count,
            "rounds_rejected": self.rounds_rejected,
            "screened_out": self.screened_out,
            "time_since_last_training": (time.time() - self.last_training_time) if self.last_training_time else None,
            "last_round": self.last_round,
            "last_error": self.last_error,
            "preemptions": self.activity.preemptions,
            "starved_rounds": self.starved_rounds,
            "config": dataclasses.asdict(self.config),
        }


def _describe(summary: dict) -> str:
    """A round's summary as the server log says it: "4 examples (4 learned), 15 steps in 21.1 s
    (lora): accepted, version 1 (retention and held-out loss within limits)"."""
    s = summary
    n, steps = s["examples"], s["steps"]
    out = (f"{n} example{'' if n == 1 else 's'} ({s['learned']} learned), {steps} step{'' if steps == 1 else 's'} "
           f"in {s['seconds']:.1f} s ({s.get('mode', '?')}): ")
    if s.get("version") is not None:
        out += f"accepted, version {s['version']}"
    else:
        out += "not published"
        if "retrying" in s:
            out += f", {s['retrying']} to retry more gently" + (" in two smaller rounds" if s.get("split") else "")
    return out + f" ({s['reason']})"
