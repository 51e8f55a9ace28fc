"""The GPU path of a running service: fast decoding on a high-priority stream, training on a
low-priority one, and merged serving weights kept in step with the published version.

:func:`install` is called once by the composition root; on a CPU, for a model the fast decoder
does not know, or with ``IDLETUNE_GPU_FASTPATH=0`` it changes nothing and the service keeps its
portable path (Hugging Face forward under the model lock). Every training mode is served: LoRA
(the live adapter merged into the serving copies) and full fine-tuning (the weight set's live
copy, while the parameters hold the weights in training), hybrid switching between them.

Concurrency on the GPU path: a request no longer waits for the model lock. The fast decoder
reads only its own serving copies and the live base tensors (the frozen base in LoRA, the live
copy in full fine-tuning), never the PEFT modules' state or the weights training writes, so
training (on the low-priority stream) and decoding (on the high-priority one) overlap on the
device; training still stops at its next layer boundary when a request
arrives (:class:`~idletune.activity.ActivityTracker`), and what it had already queued runs behind
the request's kernels. What the decoder reads changes only inside :meth:`GpuServing.changing`
(a publish, a rollback, a mode switch), which requests wait for: none sees a half-changed model.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from .decoder import FastDecoder, unsupported_reason

log = logging.getLogger("idletune.gpu")


class GpuServing:
    """A FastDecoder bound to a WeightUpdater's live version.

    Args:
        decoder: the FastDecoder (merged ``live`` adapter).
        weights: the WeightUpdater (its ``version``, weight set ``ws`` and ``base_id`` say what
            must be served).
        model_lock: the model lock; taken only to rebuild the serving copies.
        stream: the high-priority stream decoding runs on.
        train_stream: the stream training runs on: a change of the weights waits for its work
            (a rollback from another thread may follow a step whose kernels are still queued).
    """

    def __init__(self, decoder: FastDecoder, weights, model_lock: threading.Lock, stream: torch.cuda.Stream | None,
                 train_stream: torch.cuda.Stream | None = None):
        self.decoder, self.weights, self.model_lock, self.stream = decoder, weights, model_lock, stream
        self.train_stream = train_stream
        self.lock = threading.Lock()  # one KV cache: one sequence at a time
        self.refresh_seconds: list[float] = []
        decoder.version = weights.version
        self._key = self._served_key()

    def _served_key(self) -> tuple:
        # what, besides the version, the serving copies were built from: the weight set (a mode
        # switch makes a new one) and the base weights under LoRA adapters
        return self.weights.ws, self.weights.base_id  # the object, not its id (ids are reused)

    def usable(self, total_tokens: int) -> bool:
        return self.decoder.fits(total_tokens)

    def sync(self) -> None:
        """Re-merge the serving weights if the live weights changed without :meth:`changing`.
        Lock order: model lock, then this one."""
        if self._current():
            return
        with self.model_lock, self.lock:
            if not self._current():  # not rebuilt meanwhile
                self._after_training()
                self._refresh()

    def _current(self) -> bool:
        return self.decoder.version == self.weights.version and self._key == self._served_key()

    def _after_training(self) -> None:
        # the caller holds the model lock: training queues nothing new meanwhile
        if self.stream is not None and self.train_stream is not None:
            self.stream.wait_stream(self.train_stream)

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Around a change of the live weights or of the weight set (``WeightUpdater.live_change``;
        the caller holds the model lock). Requests wait meanwhile; the change runs on the serving
        stream, after the kernels of the request before it, and the serving copies are rebuilt
        before the next request starts. Work the caller queues next (training's) comes after."""
        with self.lock, self._on_stream():
            self._after_training()
            try:
                yield
            finally:
                self._refresh()
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def _refresh(self) -> None:
        import time

        t0 = time.perf_counter()
        # Only a LoRA adapter changed (a publish, a rollback on the same base): re-merge the
        # adapted matrices. The weight set or the base changed (a mode switch, a rollback across
        # bases, any publish of full fine-tuning, whose weights become the base): rebuild all.
        key, ws = self._served_key(), self.weights.ws
        full = key != self._key
        with self._on_stream():
            self.decoder.refresh(full=full, served=ws.served if full else None)
            self._key = key
            if self.decoder.graphs_captured() == 0 and self.decoder.use_graphs:
                self.decoder.warm_up()  # tensors moved (a mode switch): capture now, not in a request
            if self.stream is not None:
                self.stream.synchronize()
        self.decoder.version = self.weights.version
        self.refresh_seconds.append(time.perf_counter() - t0)

    @contextmanager
    def _on_stream(self):
        if self.stream is None:
            yield
            return
        # Work queued by other threads on their default stream comes first (and through it, a
        # training round's: train_round's callers wait for its stream when it returns).
        self.stream.wait_stream(torch.cuda.default_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    @contextmanager
    def session(self) -> Iterator[int]:
        """Hold the decoder for one request; yields the version being served."""
        self.sync()
        with self.lock, self._on_stream(), torch.inference_mode():
            yield self.decoder.version


def _on_stream(fn, stream: torch.cuda.Stream):
    """Run ``fn`` with ``stream`` current; the caller's stream waits for its work afterwards
    (a device-side wait: no host sync)."""
    def wrapped(*args, **kwargs):
        caller = torch.cuda.current_stream()
        stream.wait_stream(caller)
        try:
            with torch.cuda.stream(stream):
                return fn(*args, **kwargs)
        finally:
            caller.wait_stream(stream)
    wrapped.__wrapped__ = fn
    return wrapped


def attach(service, decoder: FastDecoder, stream: torch.cuda.Stream | None,
           train_stream: torch.cuda.Stream | None = None) -> GpuServing:
    """Serve ``service``'s requests from ``decoder`` (on ``stream``), kept in step with its live
    weights: every publish, rollback and mode switch rebuilds the serving copies at once."""
    fast = GpuServing(decoder, service.weights, service.engine.lock, stream, train_stream)
    service.weights.live_change = fast.changing
    service.inference.fast = fast
    return fast


def unavailable(model) -> str | None:
    """Why the GPU path would not serve ``model`` (None: it would, unless it then fails to start)."""
    if os.environ.get("IDLETUNE_GPU_FASTPATH", "1") == "0":
        return "disabled by IDLETUNE_GPU_FASTPATH=0"
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        return "no CUDA device"
    return unsupported_reason(model)


def install(service, *, max_len: int | None = None) -> str | None:
    """Switch ``service`` to the GPU path. Returns None when installed, else why not."""
    model = service.model
    reason = unavailable(model)
    if reason:
        return reason
    hi = torch.cuda.Stream(priority=-1)  # lower number = higher priority
    lo = torch.cuda.Stream(priority=0)
    inf = service.inference
    limit = max_len or min(inf.max_context, int(os.environ.get("IDLETUNE_KV_CACHE_TOKENS", "8192")))
    try:
        with torch.cuda.stream(hi):
            decoder = FastDecoder(model, "live", max_len=limit, stream=hi, served=service.weights.ws.served)
            log.info("GPU path: compiling the decode step (once per process)")
            warm = decoder.warm_up()
        hi.synchronize()
    except Exception as e:  # out of memory, a bad setting: serve through the portable path
        torch.cuda.empty_cache()
        return f"the fast decoder failed to start: {type(e).__name__}: {e}"[:400]
    engine = service.engine
    engine.train_round = _on_stream(engine.train_round, lo)
    engine.evaluate = _on_stream(engine.evaluate, lo)
    attach(service, decoder, hi, lo)
    # A request must not wait for the trainer thread to hand over the GIL: Python's default
    # switch interval (5 ms) would add up to that to a request's first token.
    sys.setswitchinterval(min(sys.getswitchinterval(), float(os.environ.get("IDLETUNE_SWITCH_INTERVAL", "0.0005"))))
    log.info("GPU path: fast decoder (KV cache %d tokens, serving copies %.0f MB, ready in %.1f s%s), "
             "training on a low-priority stream", limit, decoder.serving_bytes() / 2**20, warm,
             f"; compile failed, eager pieces: {decoder.compile_error}" if decoder.compile_error else "")
    return None
