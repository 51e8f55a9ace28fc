"""The training engine in a process of its own (``training.trainer = "process"``, and "auto" on a
CUDA GPU), in every training mode.

Why: in a thread of the serving process, training's Python (its layer calls, autograd's thread,
the optimizer) takes the interpreter lock in turns with every request. On an H100, over HTTP,
a trainer process added −0.02 to +0.32 ms to the median time to first token where a thread
added +0.8 to +0.9 ms, and trained as fast; it costs a second CUDA context (about 0.8 GB)
(docs/BENCHMARKS.md, "Fourteenth session" and "Fifteenth session").

How:
- The serving process keeps the model and everything that uses it (inference, the
  WeightUpdater, snapshots, the scheduler). :class:`RemoteEngine` stands in for
  :class:`~idletune.training.engine.TrainingEngine` there: the same methods, each call sent to
  the trainer process over a pipe and its result (or the error's text) sent back.
- The trainer process (started with the service) builds the PEFT model's structure on the meta
  device and binds each of its tensors to the serving process's (shared memory on a CPU, CUDA
  IPC on a GPU: no second copy). It trains the candidate adapter (full fine-tuning: the
  candidate copy of the weights) in place; the serving process's WeightUpdater publishes it
  from there, as in one process. Full fine-tuning's float32 master copies and optimizer
  state live in the trainer process only; where the serving process writes the weights in
  training (a discard, a rollback: always under the model lock, and counted in shared memory,
  ``FullWeights.share_writes``), the trainer refreshes its master copies the next time it takes
  the model lock — also in the middle of a round.
- A switch of weight set (hybrid mode's switch to full fine-tuning and back, a rollback
  across modes) starts the trainer process again, at its next call, on the new set's tensors.
- The model lock is a lock of both processes: a training step, a generation on the CPU path, a
  publish and a rollback exclude each other as before. A trainer process that dies holding it
  has it released.
- Requests reach the trainer through the ActivityTracker's state in shared memory
  (:class:`~idletune.activity.SharedActivity`): it stops at its next layer boundary, as before.
- A trainer process that exits is reported (the round fails with the reason) and started again
  at the next call.
- Its ``idletune`` log records go through a queue to the serving process, which logs them with
  its own handlers and level (:func:`_log_here`): a spawned process has no logging set up.
- On a GPU its automatic micro-batch size takes at most ``RemoteEngine.auto_most_tokens``
  (2048 tokens, and at most about 7 GiB of activations: 1024 from about 7B parameters, e.g. Llama-3-8B;
  ``engine.process_most_tokens``): bounded memory, its layers compiled for it
  (``service.training_compile_args``).
"""
from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import threading
import time
from pathlib import Path

from ..config import TrainingConfig
from .engine import Preempted, TrainingEngine, process_most_tokens, read_metrics

log = logging.getLogger("idletune.trainer")
TRAINER_PROCESS_NAME = "idletune-trainer"
RETRY_START_S = 60.0  # after a trainer process failed to start, calls fail at once for this long
MAX_EXITS = 3  # ... and after it exited this many calls in a row (a crash at every call: no restart loop)


class TrainerProcessError(RuntimeError):
    """The trainer process failed a call, could not start, or exited."""


class RemoteEngine:
    """TrainingEngine's interface, for a TrainingEngine in a trainer process.

    Args:
        model: the serving process's PeftModel; its tensors are shared with the trainer process.
        tokenizer: the model's tokenizer (the trainer process loads its own from ``model_dir``).
        config: a validated TrainingConfig.
        model_dir: the model's folder (its config.json gives the trainer the model's structure).
        lock: the model lock, a lock of both processes: a :class:`ModelLock` (:meth:`make_lock`).
        activity: the serving process's ActivityTracker.
        metrics_path: where the trainer appends each step's metrics.
        weights: the WeightUpdater's weight set (LoRA or full): what the trainer process binds.
    """

    def __init__(self, model, tokenizer, config: TrainingConfig, *, model_dir, lock, activity,
                 metrics_path=None, weights=None):
        self.model, self.tokenizer, self.config, self.lock = model, tokenizer, config, lock
        self.ws = weights
        self.mode = getattr(weights, "kind", "lora")
        self.metrics_path = Path(metrics_path) if metrics_path else None
        device = next(model.parameters()).device  # the model's, for the whole process's life
        self._cuda = device.type == "cuda"
        lock.device = device if self._cuda else None
        self.lr_scale = 1.0
        self.max_wait_s: float | None = None
        self.graphs = False
        # set by the service: how the trainer process compiles its decoder layers
        # (gpu/training.py's compile_layers arguments), or None
        self.compile_layers: dict | None = None
        # the most tokens the automatic micro-batch size takes on a GPU (the service compiles
        # the layers for it: service.training_compile_args): 2048, 1024 from about 7B parameters
        self.auto_most_tokens = process_most_tokens(model)
        self._model_dir = str(model_dir)
        self._activity = activity
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None
        self._ready = False
        self._holding = None  # set by the trainer process while it holds the model lock
        self._calls = threading.Lock()  # one call at a time on the pipe
        self._latest: dict | None = None
        self._logs = None  # the queue of the trainer process's log records, and the thread logging them here
        self._pump: threading.Thread | None = None  # that thread, once its process is gone
        self._resets = 0  # reset_optimizer() calls so far; the trainer resets when it sees a new count
        self._closed = False
        self._failed: tuple[float, str] | None = None  # (when, why) the trainer process last failed to start
        self._exits = 0  # calls in a row in which the trainer process exited
        self._restart = False  # the weight set changed: the trainer process starts again on the new one

    @staticmethod
    def make_lock() -> "ModelLock":
        """A model lock both processes can take."""
        return ModelLock()

    # ---- the trainer process ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the trainer process (it gets ready in the background; the first call waits).
        Call before the model serves requests: on a CPU, sending the model's tensors moves
        them into shared memory."""
        with self._calls:
            if self._proc is None:
                self._start()

    def _start(self) -> None:
        import torch.multiprocessing  # noqa: F401  (registers how tensors are sent: shared, not copied)

        with self.lock:  # one weight set, whole: a rollback may switch sets meanwhile (set_weights)
            ws, self._restart = self.ws, False
            tensors, live = ws.trainer_tensors()
        if not self._cuda:
            # by name, not by open file descriptor: a model's hundreds of tensors would each keep one
            torch.multiprocessing.set_sharing_strategy("file_system")
            _check_shared_memory({**tensors, **{f"live:{n}": t for n, t in (live or {}).items()}})
        logs = self._ctx.Queue()  # one for each process: one killed mid-write leaves no later record stuck
        pump = threading.Thread(target=_log_here, args=(logs,), name="idletune-trainer-log", daemon=True)
        pump.start()
        self._logs = (logs, pump)
        here, there = self._ctx.Pipe()
        self._holding = self._ctx.RawValue("b", 0)
        writes = self._ctx.RawValue("q", 0)  # the serving process's writes of the weights in training
        ws.share_writes(writes)
        proc = self._ctx.Process(
            target=_trainer_main, name=TRAINER_PROCESS_NAME, daemon=True,
            args=(there, self._model_dir, self.config, tensors, live, self.lock.shared,
                  self._activity.shared(), self._holding, writes,
                  str(self.metrics_path) if self.metrics_path else None, self.compile_layers,
                  self.auto_most_tokens, logs, logging.getLogger("idletune").getEffectiveLevel()))
        proc.start()
        there.close()
        self._proc, self._conn, self._ready = proc, here, False
        log.info("trainer process started (pid %d, %s)", proc.pid,
                 "full fine-tuning" if live is not None else "LoRA")

    def _stop(self) -> None:
        """Ask the trainer process to stop (between calls), then make sure it has."""
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self._proc.join(10)
        self._lost()

    def _wait_ready(self) -> None:
        ok, value = self._receive()
        if not ok:
            self._lost()
            self._failed = (time.monotonic(), value)
            raise TrainerProcessError(value)
        self._failed = None
        self._ready = True
        self.graphs = bool(value.get("graphs"))

    def _receive(self):
        conn, proc = self._conn, self._proc
        try:
            return conn.recv()
        except (EOFError, OSError):
            proc.join(5)
            if self._proc is proc:
                self._lost()
            raise TrainerProcessError(self._exited(proc.exitcode)) from None

    def _exited(self, code) -> str:
        """Count an exit; after ``MAX_EXITS`` in a row, starts are held back as after a failed one."""
        self._exits += 1
        if self._exits >= MAX_EXITS:
            why = f"the trainer process exited {self._exits} times in a row (last exit code {code})"
            self._failed = (time.monotonic(), why)
            return f"{why}; it starts again in {RETRY_START_S:.0f} s"
        return f"the trainer process exited (exit code {code}); it starts again at the next call"

    def _lost(self) -> None:
        """The trainer process is gone, or is to be: stopped first (a call waiting on the pipe
        then reads its end, and it can no longer take or give up the model lock), then the lock
        released if it held it."""
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(10)
        if self._holding is not None and self._holding.value:
            self._holding.value = 0
            try:
                self.lock.shared.release()
            except ValueError:
                pass
        if self._conn is not None:
            self._conn.close()
        logs, self._logs = self._logs, None  # taken once: a background stop and close() may both be here
        if logs is not None:
            logs[0].put(None)  # after the process's last record: its thread logs them, then ends
            self._pump = logs[1]
        self._proc = self._conn = None
        if self._cuda:
            import torch

            # what only that process still used (a weight set left by a mode switch: the copy in
            # training, as large as the model) is freed now, not whenever torch next looks
            torch.cuda.ipc_collect()

    def _call(self, name: str, *args, **kwargs):
        with self._calls:
            if self._closed:
                raise TrainerProcessError("the trainer process was stopped (the service is closing)")
            if self._restart and self._proc is not None:
                self._stop()  # on the old weight set's tensors
            if self._proc is None:
                if self._failed and time.monotonic() - self._failed[0] < RETRY_START_S:
                    raise TrainerProcessError(f"{self._failed[1]} (not tried again for {RETRY_START_S:.0f} s)")
                self._start()
            if not self._ready:
                self._wait_ready()
            if self._cuda:
                import torch

                torch.cuda.current_stream().synchronize()  # what this thread queued outside the model lock, too
            state = {"lr_scale": self.lr_scale, "max_wait_s": self.max_wait_s, "resets": self._resets}
            try:
                self._conn.send((name, args, kwargs, state))
            except (OSError, ValueError):
                proc = self._proc
                self._lost()
                raise TrainerProcessError(self._exited(proc.exitcode)) from None
            ok, value = self._receive()
            self._exits = 0  # it answered
        if ok:
            result, self._latest = value
            return result
        if value == "Preempted":
            raise Preempted()
        raise TrainerProcessError(f"in the trainer process: {value}")

    def close(self) -> None:
        """Stop the trainer process: asked to, between calls; stopped at once in the middle of
        one (a round cut short at a stop, as with a thread). No call starts it again."""
        self._closed = True
        idle = self._calls.acquire(timeout=1.0)
        try:
            if self._proc is None:
                return
            if idle:
                self._stop()
            else:
                self._lost()
        finally:
            if idle:
                self._calls.release()
            if self._proc is None and self._pump is not None:
                self._pump.join(2.0)  # what the stopped process logged, logged before the service closes

    # ---- TrainingEngine's interface ----------------------------------------------------------------
    def train_round(self, examples, replay=(), *, batch_size=None, deadline=None):
        return self._call("train_round", examples, list(replay), batch_size=batch_size, deadline=deadline)

    def evaluate(self, examples, which: str, batch_size: int = 4) -> float:
        return self._call("evaluate", examples, which, batch_size)

    def example_losses(self, examples, which: str, batch_size: int = 4) -> list[float]:
        return self._call("example_losses", examples, which, batch_size)

    def plateaued(self) -> bool:
        return self._call("plateaued")

    def reset_optimizer(self) -> None:
        """Done before the trainer's next call (a rollback during a round must not wait for it)."""
        self._resets += 1

    def set_weights(self, ws) -> None:
        """Another weight set (a hybrid mode switch, a rollback across modes): the trainer process
        starts again on its tensors at the next call. Called under the model lock, maybe while a
        round is in flight: nothing here waits for the trainer process. The old one is stopped in
        the background once it is between calls: what it holds (in full fine-tuning the master
        copies, AdamW's state and the old copy in training, about 16 bytes a weight) is given back
        then, not only at the next round, which may not come for a long time."""
        self.ws, self.mode = ws, ws.kind
        self._restart = True
        if self._proc is not None:
            threading.Thread(target=self._stop_stale, name="idletune-trainer-restart", daemon=True).start()

    def _stop_stale(self) -> None:
        with self._calls:
            if self._restart and self._proc is not None and not self._closed:
                self._stop()

    def get_latest_metrics(self) -> dict | None:
        return self._latest

    def metrics_history(self, limit: int = 500) -> list[dict]:
        return read_metrics(self.metrics_path, limit)

    # saved from and loaded into this process's own weight set, which the trainer process shares
    # (a load is a counted write: FullWeights' master copies there follow)
    save_model = TrainingEngine.save_model
    load_model = TrainingEngine.load_model


def _check_shared_memory(tensors: dict, where: str = "/dev/shm") -> None:
    """On a CPU the model's tensors move into shared memory (``where``): refuse clearly where it
    cannot hold them (a container's default /dev/shm is 64 MB) rather than fail mid-copy."""
    import shutil

    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # no such folder here: the platform shares memory another way
    need = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values()
                if not t.is_shared()}.values())
    if need > free:
        raise TrainerProcessError(
            f'training.trainer = "process" on a CPU keeps the model in shared memory: {need / 2**20:.0f} MB, '
            f"and {where} has {free / 2**20:.0f} MB free (a container's default is 64 MB: docker run "
            '--shm-size=…); or use training.trainer = "thread"')


def _log_here(queue) -> None:
    """A trainer process's log records (its ``idletune`` loggers', sent through ``queue``),
    handled in the serving process by the loggers they were logged to: one log, in the server's
    format, with the server's handlers. Ends at None (put when the process is gone) or at a
    queue left unreadable by a process killed while writing to it."""
    while True:
        try:
            record = queue.get()
        except Exception:
            return
        if record is None:
            return
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def _log_there(queue, level: int) -> None:
    """In the trainer process: its ``idletune`` log records go to the serving process's log
    (:func:`_log_here`) at the level the serving process logs them, and nowhere else."""
    logger = logging.getLogger("idletune")
    logger.handlers[:] = [logging.handlers.QueueHandler(queue)]
    logger.setLevel(level)
    logger.propagate = False


class ModelLock:
    """The model lock of the serving process and its trainer process: a training step, a
    generation on the CPU path, a publish, a rollback exclude each other in both.

    On a GPU, what one process queued under the lock has run before the other works under it:
    two processes' CUDA contexts do not order each other's streams, so a rollback's writes could
    otherwise meet the tail of a step, or a step write what a snapshot's copy is still reading.
    The trainer process synchronises its device before it lets go (:class:`_HeldFlag`); this
    (serving) process its thread's current stream (:meth:`release`), into which every change
    of the live weights on the serving stream is joined (``GpuServing.changing``). Not the whole
    device here: a decoder may be capturing a CUDA graph in another thread meanwhile. This
    process holds the lock rarely: a publish, a discard, a rollback, a save, a generation on the
    Hugging Face path (never a fast-path decode step). Only :attr:`shared`, the lock itself,
    goes to the trainer process."""

    def __init__(self) -> None:
        self.shared = multiprocessing.get_context("spawn").Lock()
        self.device = None  # set on a GPU (RemoteEngine): its current stream synchronised before the lock is let go

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return self.shared.acquire(block, timeout)

    def release(self) -> None:
        try:
            if self.device is not None:
                import torch

                torch.cuda.current_stream(self.device).synchronize()
        finally:
            self.shared.release()  # even where the device failed: the lock is never left held

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _HeldFlag:
    """The model lock in the trainer process, flagging while it holds it (for :meth:`RemoteEngine._lost`).
    Once taken, ``on_acquire`` catches up with what the serving process changed meanwhile. On a
    GPU its work is done before it lets go (:class:`ModelLock`): the serving process's stream
    does not wait for this process's (another CUDA context), so a rollback's or a discard's
    writes could otherwise meet the tail of a step still running here. (Recording an
    interprocess CUDA event instead, for the serving process to wait on when it takes the lock,
    so that this process queues its next step meanwhile, trained no faster: runs FA, FB,
    docs/BENCHMARKS.md.)"""

    def __init__(self, lock, flag, device=None, on_acquire=None) -> None:
        self._lock, self._flag, self._device, self._on_acquire = lock, flag, device, on_acquire

    def acquire(self, *args, **kwargs) -> bool:
        got = self._lock.acquire(*args, **kwargs)
        if got:
            self._flag.value = 1
            if self._on_acquire is not None:
                try:
                    self._on_acquire()
                except BaseException:
                    self.release()
                    raise
        return got

    def release(self) -> None:
        try:
            if self._device is not None:
                import torch

                torch.cuda.synchronize(self._device)
        finally:
            self._flag.value = 0
            self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _trainer_main(conn, model_dir: str, config: TrainingConfig, tensors: dict, live: dict | None, lock,
                  activity_state, holding, writes, metrics_path: str | None, compile_layers: dict | None,
                  auto_most_tokens: int, logs, log_level: int) -> None:
    """The trainer process: the model's structure bound to the serving process's tensors, a
    TrainingEngine on it (full fine-tuning where ``live`` holds the live weights), and a loop
    answering :class:`RemoteEngine`'s calls until "stop" or until the serving process goes away."""
    import contextlib
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the serving process's to handle; it stops this one
    _log_there(logs, log_level)
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..activity import SharedActivity
        from ..models import load_tokenizer
        from .adapters import attach_lora, bind_tensors
        from .engine import TrainingEngine
        from .weightsets import FullWeights, LoraWeights

        torch.manual_seed(config.seed)
        first = next(iter(tensors.values()))
        if first.is_cuda:
            torch.cuda.set_device(first.device)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=first.dtype)
        model = attach_lora(skeleton, config.lora, structure_only=True)
        bind_tensors(model, tensors)
        model.eval()
        ws = LoraWeights(model) if live is None else FullWeights(model, live=live)
        seen = [writes.value]

        def catch_up() -> None:  # under the model lock, which every write of the serving process holds
            if writes.value != seen[0]:
                seen[0] = writes.value
                ws.written_elsewhere()
        activity = SharedActivity(activity_state)
        engine = TrainingEngine(model, load_tokenizer(model_dir), config,
                                lock=_HeldFlag(lock, holding, first.device if first.is_cuda else None, catch_up),
                                should_yield=activity.should_yield, idle_for=activity.idle_for,
                                metrics_path=metrics_path, weights=ws, is_stopping=activity.is_stopping)
        engine.auto_most_tokens = auto_most_tokens
        if compile_layers:
            from ..gpu.training import compile_layers as compile_them

            compile_them(model, **compile_layers)
            engine.graphs = bool(compile_layers.get("graphs"))
        stream = contextlib.nullcontext
        if first.is_cuda:
            low = torch.cuda.Stream(device=first.device, priority=0)  # lower number = higher priority
            stream = lambda: torch.cuda.stream(low)  # noqa: E731
        summary = (f"{len(tensors)} tensors shared with the serving process"
                   f"{' (full fine-tuning: the weights in training, and the live weights beside)' if live else ''}"
                   f", threads {torch.get_num_threads()}") + (
            f", decoder layers compiled{' and graphed' if engine.graphs else ''}" if compile_layers else "")
        log.info("trainer process ready: %s", summary)
        conn.send((True, {"graphs": engine.graphs}))
        resets = 0
    except Exception as e:  # the serving process reports it, and tries again at the next call
        conn.send((False, f"the trainer process could not start: {type(e).__name__}: {e}"[:900]
                   + ' (training.trainer = "thread" trains in a thread of the server instead)'))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the serving process is gone
        if msg[0] == "stop":
            return
        name, args, kwargs, state = msg
        engine.lr_scale, engine.max_wait_s = state["lr_scale"], state["max_wait_s"]
        try:
            if state["resets"] != resets:
                resets = state["resets"]
                engine.reset_optimizer()
            with stream():
                result = getattr(engine, name)(*args, **kwargs)
                if first.is_cuda:
                    torch.cuda.current_stream().synchronize()  # its writes done before the other process reads
            reply = (True, (result, engine.get_latest_metrics()))
        except Preempted:
            reply = (False, "Preempted")
        except Exception as e:
            reply = (False, f"{name}: {type(e).__name__}: {e}"[:1000])
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
