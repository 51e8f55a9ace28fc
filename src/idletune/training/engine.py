"""TrainingEngine: one training round, read top to bottom in :meth:`TrainingEngine.train_round`.

The engine trains the ``candidate`` adapter (LoRA) on the shared model. It holds the model lock one
optimizer step at a time and yields to inference at every layer boundary (and between the chunks
of the output layer's loss): when a request arrives mid-step, the forward or backward pass
raises :class:`Preempted`, the partial step is discarded and the round ends early (what was
already stepped stays in the ``candidate`` adapter).
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import TrainingConfig
from ..examples import TrainingExample
from . import adapters
from .adapters import LIVE
from .data import Encoded, collate, encode, target_token_losses

log = logging.getLogger("idletune.training")


# The most tokens the automatic micro-batch size (training.micro_batch_tokens = 0) takes on a GPU,
# by where training runs. With CUDA-graphed layers a step's peak stays allocated for the process's
# life (the graph pool): memory the card's other users never get back.
# - A trainer process (the GPU default): 2048 (fewer for large models: PROCESS_ACTIVATION_BYTES),
#   compiled as the setting 2048 is (units of 4
#   layers, cheap activations recomputed; service.training_compile_args). On one H100 (run ER, 8 ×
#   512 tokens) its steps took 1.90 / 3.79 GB at 0.5B / 1.5B against 4.32 / 8.52 GB unsplit, at
#   21.4 / 11.6 steps a second against 21.5 / 12.8; beside a backlog chat's added TTFT p99 was
#   +1.42 to +1.80 ms against +0.56 to +1.50 ms unsplit, LoRA and full fine-tuning, three machines
#   (runs EQ–EY; docs/BENCHMARKS.md, "Eighteenth session").
# - A trainer thread: as many as half the free memory holds, up to 16384. Capped at 2048 there,
#   chat's added TTFT p99 was 2.3–4.2 times the unsplit default's on one machine (runs DP–DS).
AUTO_MOST_TOKENS = {"process": 2048, "thread": 16384}
# A trainer process's parts also keep at most this much of activations (as estimated by
# activation_bytes_per_token, compiled layers, a plain output layer): its graph pool holds a
# step's peak for the process's life. That leaves 2048 tokens up to about 3.6 MB a token (the
# Qwen2.5-0.5B, 1.5B and 3B shapes) and takes 1024 above (about 7B parameters and more: Llama-3-8B,
# Mistral-7B, Qwen2.5-7B), where a large model's products keep the GPU busy in smaller parts. On
# one H100 (8 × 512 tokens): at Llama-3-8B 2048-token parts took 21.6 % of the plain PEFT loop's
# peak at 1.68× its speed, 1024-token parts 11.2 % at 1.55× (run FI); at Qwen2.5-3B 20.3 % at
# 1.96× against 10.6 % at 1.63× (run FP): there the smaller parts cost 17 % of the speed, at 8B
# 8 % (docs/BENCHMARKS.md, "Twenty-first session").
PROCESS_ACTIVATION_BYTES = 7 * 2**30


def activation_bytes_per_token(model, *, checkpointing: bool = False, compiled: bool = True,
                               head_logits: bool = False) -> int:
    """The GPU memory a training step keeps a token (bf16): 2 bytes × layers × (6 × hidden + 3 ×
    intermediate size) with compiled layers — within 10 % of what was measured at the
    Qwen2.5-0.5B, 1.5B and Llama-3-8B shapes (docs/BENCHMARKS.md, section 5); 1.5 times that for
    eager layers (measured 1.43 at 0.5B); with gradient checkpointing, each layer's input plus
    one layer's activations; and where the output layer is not a plain bias-free linear one
    (``head_logits``), the float32 logits the loss then builds and their gradient, 8 bytes × the
    vocabulary (a plain one, frozen or trained, computes the loss in chunks: gpu/loss.py)."""
    cfg = adapters.text_config(model)
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    layer = 6 * hidden + 3 * (getattr(cfg, "intermediate_size", None) or 4 * hidden)
    per_token = 2 * (layers * hidden + layer if checkpointing else layers * layer)
    if not compiled:
        per_token = per_token * 3 // 2
    return per_token + (8 * cfg.vocab_size if head_logits else 0)


def process_most_tokens(model) -> int:
    """The most tokens a trainer process's automatic micro-batch size takes for ``model`` on a
    GPU: ``AUTO_MOST_TOKENS["process"]``, or the largest power of two (at least 512) whose
    activations fit :data:`PROCESS_ACTIVATION_BYTES` where that is fewer, by the estimate for
    compiled layers and a plain output layer (the GPU path's; eager layers or whole-vocabulary
    logits keep more, and half the free memory still bounds the size at the first step)."""
    return _power_of_two_within(PROCESS_ACTIVATION_BYTES // activation_bytes_per_token(model), 512,
                                AUTO_MOST_TOKENS["process"])


def _power_of_two_within(fits: int, least: int, most: int) -> int:
    """The largest power of two not above ``fits``, within ``least``–``most``."""
    return max(least, min(most, 1 << max(int(fits).bit_length() - 1, 0)))


def gpu_micro_batch_tokens(model, free_bytes: float, *, checkpointing: bool = False, compiled: bool = True,
                           head_logits: bool = False, most: int = AUTO_MOST_TOKENS["thread"], least: int = 512) -> int:
    """The most tokens in one forward/backward on a GPU when ``training.micro_batch_tokens`` is 0:
    as many as fit in half of ``free_bytes`` (the other half stays for chat and anything else on
    the card), rounded down to a power of two, within ``least``–``most`` (:data:`AUTO_MOST_TOKENS`:
    where training runs; a trainer process's is :func:`process_most_tokens`), a token's memory
    estimated by :func:`activation_bytes_per_token`. A larger batch is split and its gradients
    accumulated: the same step, in bounded memory."""
    per_token = activation_bytes_per_token(model, checkpointing=checkpointing, compiled=compiled,
                                           head_logits=head_logits)
    return _power_of_two_within(max(free_bytes, 0) // 2 // per_token, least, most)


def graph_shape(rows: int, length: int) -> tuple[int, int]:
    """The padded (rows, length) a micro-batch takes with CUDA-graphed layers, which record one
    graph per shape (seconds each, and memory in the graph pool): rows up to a power of two, at
    least 2 (a batch of one would compile once more: a dimension of size 1 is specialised);
    lengths up to a multiple of 64 to 512 tokens, then of a quarter of the power of two below
    (640, 768, 896, 1024, 1280, …): under 64 tokens or 25 % of padding, and 8 lengths to 512,
    then 4 per doubling."""
    r = max(2, 1 << (rows - 1).bit_length())
    step = max(64, (1 << (max(length, 2) - 1).bit_length() - 1) // 4)
    return r, -(-length // step) * step


# On a GPU: most layers (or loss chunks) of training work queued ahead of a request (one compiled
# unit where a unit holds more; while the user is away, this many units: TrainingEngine._boundary)
QUEUED_LAYERS = 3
# In full fine-tuning while the user is active: each layer's backward pass also computes its
# weights' gradients (products over all the step's tokens), well over a LoRA layer's GPU work,
# and a request's prompt shares the SMs with all of it: one layer queued, not three (at 0.5B
# the TTFT added under a backlog was +0.94 / +0.78 ms (p50 / p99) against +1.95 / +2.69 ms, run
# DA) — and since run FM none: the host waits for each layer (or unit) before it queues the
# next. In a trainer process, the GPU default, that work runs in another CUDA context, beyond
# the serving stream's priority, and shares the GPU with the request's decoding: at 0.5B
# decoding kept ×0.983 of its speed against ×0.966 with one layer queued (TTFT p50 +0.12
# against +0.47 ms; ×0.982 against ×0.967 on a second machine), at 21–31 % fewer training steps
# while the user was active; with a trainer thread (the stream's priority in reach) decoding kept
# ×0.991–0.992 either way, the TTFT p50 +1.13 against +1.57 ms at 16 % fewer steps (runs
# FM–FO, docs/BENCHMARKS.md, "Twenty-first session"). While the user is away QUEUED_LAYERS
# holds: training's speed.
QUEUED_LAYERS_FULL_ACTIVE = 0
# The user counts as away after this long with no request. Until then, with CUDA-graphed layers,
# a new shape is not recorded while a recorded larger one can serve, and the output layer's loss
# is queued a chunk at a time like the layers.
AWAY_AFTER_S = 10.0
UNKNOWN_MEMORY_MICRO_BATCH = 4096  # tokens, where the GPU does not say how much memory is free


class Preempted(Exception):
    """A request arrived while a training step was running."""


@dataclass
class StepMetrics:
    step: int
    loss: float
    learning_rate: float
    grad_norm: float
    examples_processed: int
    tokens_per_second: float
    mode: str
    batch_size: int
    time: float = field(default_factory=time.time)


@dataclass
class RoundResult:
    example_ids: list[int]
    learned_ids: list[int]
    steps: int = 0
    preempted: bool = False
    skipped_nonfinite: int = 0
    final_losses: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Figures:
    """One step's figures (per-example loss sums and target counts, loss, gradient norm, finite),
    packed into one tensor. On a GPU they are copied into pinned host memory right after the
    step's kernels, behind an event: reading them waits for that step only, not for the steps
    queued after it (a plain ``.tolist()`` would wait for the whole stream)."""
    batch: list
    packed: torch.Tensor
    event: object
    lr: float
    started: float

    @classmethod
    def copy_to_host(cls, batch, sums, counts, loss, grad_norm, finite, lr, started) -> "_Figures":
        packed = torch.cat([sums.float(), counts.float(), loss.float().reshape(1), grad_norm.float().reshape(1),
                            finite.float().reshape(1)])
        event = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            packed = host
        return cls(batch, packed, event, lr, started)

    def read(self) -> tuple[list[float], list[int], float, float, bool]:
        if self.event is not None:
            self.event.synchronize()
        v = self.packed.tolist()
        n = len(self.batch)
        return v[:n], [int(c) for c in v[n:2 * n]], v[2 * n], v[2 * n + 1], bool(v[2 * n + 2])


class TrainingEngine:
    """Trains the model's ``candidate`` weights on batches of examples.

    Args:
        model: the PeftModel from :func:`adapters.attach_lora` (shared with inference).
        tokenizer: the model's tokenizer.
        config: a validated TrainingConfig.
        lock: the model lock shared with inference; held one step at a time.
        should_yield: polled at every layer boundary; True preempts the step.
        idle_for: seconds since the last request (the user is away after ``AWAY_AFTER_S``:
            see :meth:`_shape` and :meth:`_loss_boundary`); None: always away.
        metrics_path: JSONL file each step's metrics are appended to.
    """

    def __init__(self, model, tokenizer, config: TrainingConfig, *, lock: threading.Lock | None = None,
                 should_yield: Callable[[], bool] | None = None, idle_for: Callable[[], float] | None = None,
                 metrics_path: str | Path | None = None, batch_manager=None, weights=None,
                 is_stopping: Callable[[], bool] | None = None):
        from .batching import BatchManager
        from .weightsets import LoraWeights

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.lock = lock or threading.Lock()
        self.should_yield = should_yield or (lambda: False)
        self.idle_for = idle_for or (lambda: math.inf)
        self.is_stopping = is_stopping or (lambda: False)  # the service is closing: evaluations wait no more
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.batches = batch_manager or BatchManager(config)
        self.device = next(model.parameters()).device
        self.ws = weights or LoraWeights(model)  # which tensors train, and how live/candidate are kept apart
        self.mode = self.ws.kind
        self._ema: float | None = None
        self._ema_history: deque[float] = deque(maxlen=config.plateau_window + 1)
        self.global_step = 0
        self.lr_scale = 1.0  # lowered by the scheduler after a rejected round, reset on acceptance
        self.examples_processed = 0
        self._latest: StepMetrics | None = None
        self._booked_at = 0.0
        self._step_thread: int | None = None
        self._step_stream = None  # the CUDA stream of the step in progress
        # CUDA events of the current step, one per layer boundary (or loss chunk), each with the
        # layers of work it closes (1 while the user is away: _boundary)
        self._queued: deque[tuple[object, int]] = deque()
        # Tokens in one forward/backward: bounds a step's activation memory (about 2.6 MB per
        # token for the default model in float32 on a CPU). 0 on a GPU: sized to the memory
        # free at the first step (:func:`gpu_micro_batch_tokens`), at most auto_most_tokens
        # (a trainer process sets its own: process_most_tokens).
        self.micro_batch_tokens = config.micro_batch_tokens or (0 if self.device.type == "cuda" else 512)
        self.auto_most_tokens = AUTO_MOST_TOKENS["thread"]
        self.max_wait_s: float | None = None  # evaluation waits at most this long for a gap (None: forever)
        queue = os.environ.get("IDLETUNE_TRAIN_QUEUE_LAYERS")  # set: for every mode, user active or away
        self.queued_layers = int(queue or QUEUED_LAYERS)
        self.queued_layers_full_active = int(queue or QUEUED_LAYERS_FULL_ACTIVE)
        self._optimizer = None
        self._steps_copies = False  # the optimizer steps master copies, not the trainable tensors
        self._modules: list | None = None  # every module of the model, listed at the first step
        # Set when the decoder layers are replayed as CUDA graphs (gpu/training.py): batches are
        # padded to bucketed lengths, each micro-batch is a new graph iteration, and gradient
        # buffers stay allocated between steps.
        self.graphs = False
        self._graphed_steps, self._heap_frozen = 0, False
        self._recorded: set[tuple[int, int]] = set()  # shapes whose graphs a micro-batch completed
        self._compilations_settled = 0  # compilations ended in this process when the heap was last settled
        self._install_preemption_hooks()
        if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- the loop ---------------------------------------------------------------------------
    def train_round(self, examples: list[TrainingExample], replay: list[TrainingExample] = (), *,
                    batch_size: int | None = None, deadline: float | None = None) -> RoundResult:
        """Train until every example is learned (mean token loss below ``target_loss``, or
        ``target_loss_text`` for text) or
        ``max_steps``; replayed examples ride along in each batch so old lessons are kept."""
        cfg = self.config
        t0 = time.monotonic()
        items = [encode(e, self.tokenizer, cfg.max_seq_len) for e in examples]
        items = [it for it in items if it.num_target_tokens > 0]
        items.sort(key=lambda it: len(it.input_ids))  # buckets: batches of neighbours pad little
        rep = [encode(e, self.tokenizer, cfg.max_seq_len) for e in replay]
        loss_of = {it.key: math.inf for it in items}
        goal = {it.key: cfg.target_loss_text if it.kind == "text" else cfg.target_loss for it in items}
        result = RoundResult(example_ids=[e.id for e in examples], learned_ids=[])
        opt = self._get_optimizer()
        bs = batch_size or cfg.batch_size
        # A step's figures stay on the device; on a GPU they are read one step later, while the
        # next step runs, so the host never waits for the GPU (on a CPU there is nothing to gain).
        lag = 1 if self.device.type == "cuda" else 0
        pending: deque[_Figures] = deque()

        def book(f: _Figures) -> None:  # 4. which examples are learned, metrics
            sums, counts, loss, grad_norm, finite = f.read()
            if not finite:
                result.skipped_nonfinite += 1
            for it, s, c in zip(f.batch, sums, counts):
                if it.key in loss_of and c:
                    loss_of[it.key] = s / c
            self._track_plateau(loss)
            self.global_step += 1
            result.steps += 1
            self.examples_processed += len(f.batch)
            now = time.perf_counter()
            ntok = sum(len(it.input_ids) for it in f.batch)
            self._record(StepMetrics(step=self.global_step, loss=loss, learning_rate=f.lr, grad_norm=grad_norm,
                                     examples_processed=self.examples_processed,
                                     tokens_per_second=ntok / max(now - max(f.started, self._booked_at), 1e-9),
                                     mode=self.mode, batch_size=len(f.batch)))
            self._booked_at = now

        for step in range(cfg.max_steps):
            # 1. stop when everything is learned, a request is waiting, or the slice is over
            todo = [it for it in items if loss_of[it.key] > goal[it.key]]
            if not todo:
                break
            if self.should_yield() or (deadline is not None and time.monotonic() > deadline):
                result.preempted = True
                break
            # 2. set the learning rate: linear warmup, then linear decay over the round
            lr = self._lr(step)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            batch = self.batches.compose(todo, rep, bs, step)
            started = time.perf_counter()
            # 3. forward/backward over micro-batches, clip, step (skipped if anything is not
            #    finite) — or discard the partial step if a request preempts it
            try:
                with self.lock:
                    self._step_thread = threading.get_ident()  # only this thread's passes are preempted
                    self._step_stream = torch.cuda.current_stream() if self.device.type == "cuda" else None
                    try:
                        self._enter_training()
                        sums, counts = self._forward_backward(batch)
                        grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable(), cfg.max_grad_norm)
                        loss = sums.sum() / counts.sum().clamp(min=1)
                        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
                        self._optimizer_step(opt, finite)
                    finally:
                        self._zero_grad(opt)
                        self._step_thread = self._step_stream = None  # before the lock is released
                        self._queued.clear()
            except Preempted:
                result.preempted = True
                break
            pending.append(_Figures.copy_to_host(batch, sums, counts, loss, grad_norm, finite, lr, started))
            while len(pending) > lag:
                book(pending.popleft())
        while pending:
            book(pending.popleft())

        result.final_losses = {k: v for k, v in loss_of.items()}
        result.learned_ids = [k for k, v in loss_of.items() if v <= goal[k]]
        result.seconds = time.monotonic() - t0
        self._settle_heap(result.steps)
        return result

    def _settle_heap(self, steps: int) -> None:
        """After the first graphed steps (compiling, recording the graphs), and again after any
        round in which something was compiled (a new batch shape), move every object alive to
        the collector's permanent generation: the compiled code and the graph trees'
        bookkeeping are a heap that each full garbage collection would otherwise walk, holding
        the GIL — a 0.55 s pause of every thread, chat included (docs/BENCHMARKS.md, run X).
        One full collection first (that pause, once per compilation: 0.1 s after a new batch
        shape), so no garbage is frozen with them; it waits for a round that ends with no
        request in flight. During compilations full collections are held off (gpu/training.py)."""
        if not self.graphs:
            return
        from ..gpu import training as gpu_training

        self._graphed_steps += steps
        seen = gpu_training.compilations()
        due = self._graphed_steps >= 3 and (not self._heap_frozen or seen != self._compilations_settled)
        if due and not self.should_yield():  # a request waiting: at a later round's end
            gc.collect()
            gc.freeze()
            self._heap_frozen, self._compilations_settled = True, seen

    # ---- pieces of a step -------------------------------------------------------------------
    def _forward_backward(self, batch: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss summed per example, gradients accumulated over micro-batches; (B,), (B,)."""
        total_tokens = max(1, sum(it.num_target_tokens for it in batch))
        sums, counts = [], []
        for part in self._micro_batches(batch):
            rows, length = self._shape(part)
            micro = collate(part, self.tokenizer.pad_token_id, self.device, length=length, rows=rows)
            if self.graphs:  # a new iteration: what a preempted pass left in the graphs is dropped
                torch.compiler.cudagraph_mark_step_begin()
                if (rows, length) not in self._recorded:  # seconds of work, the interpreter lock mostly held
                    log.info("training: recording CUDA graphs for micro-batches of %d × %d tokens (user %s)",
                             rows, length, "away" if self.idle_for() >= AWAY_AFTER_S else "active")
            with self._autocast():
                # (rows,), (rows,): empty rows add 0
                s, c = target_token_losses(self.model, micro, self._loss_boundary)
            self._backward(s.sum() / total_tokens)
            if self.graphs:
                self._recorded.add((rows, length))
            sums.append(s.detach().float()[:len(part)])
            counts.append(c.detach()[:len(part)])
        return torch.cat(sums), torch.cat(counts)

    def _micro_batches(self, batch: list[Encoded]) -> list[list[Encoded]]:
        """At least ``gradient_accumulation_steps`` parts, and none over ``micro_batch_tokens``
        padded tokens (one example alone may be longer): a step's activation memory is bounded
        whatever the batch size, at the same gradients."""
        n_micro = max(1, min(self.config.gradient_accumulation_steps, len(batch)))
        size = math.ceil(len(batch) / n_micro)
        if not self.micro_batch_tokens:  # a GPU, set to automatic: once, when the serving side is set up
            self.micro_batch_tokens = self._free_memory_micro_batch()
            self._regroup_units()
        limit = self.micro_batch_tokens
        parts: list[list[Encoded]] = [[]]
        for it in batch:
            cur = parts[-1]
            if cur and (len(cur) >= size or math.prod(self._bucket(cur + [it])) > limit):
                parts.append(cur := [])
            cur.append(it)
        return parts

    def _free_memory_micro_batch(self) -> int:
        """The automatic micro-batch size on a GPU: from the memory free now (the decoder's KV
        cache and serving copies already taken, what torch's allocator holds unused counted as
        free), less the gradients and optimizer state the first step will add. Taken at the first
        step, and again after a switch of weight set (hybrid mode); a request in flight then
        makes it smaller for the process's life."""
        optimized = self.ws.optimized()  # float32 master copies made now, in the memory measured next
        try:
            free, _ = torch.cuda.mem_get_info(self.device)
        except RuntimeError as e:  # a device or driver that does not report it
            tokens = min(UNKNOWN_MEMORY_MICRO_BATCH, self.auto_most_tokens)
            log.warning("training: free GPU memory unknown (%s); micro-batches of at most %d tokens", e, tokens)
            return tokens
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        from ..gpu.loss import plain_head
        from ..gpu.training import layers_compiled

        trainable = self._trainable()
        free -= sum(p.numel() * p.element_size() for p in trainable)  # gradients
        for t, p in zip(optimized, trainable):
            # AdamW's two moments of what it steps; a float32 master copy's gradient too
            free -= (2 if t is p else 3) * t.numel() * t.element_size()
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        # the loss builds (N, V) logits unless the output layer is a plain one (data.py)
        tokens = gpu_micro_batch_tokens(lm, free, checkpointing=self.config.gradient_checkpointing,
                                        compiled=layers_compiled(self.model), most=self.auto_most_tokens,
                                        head_logits=head is None or plain_head(head) is None)
        log.info("training: micro-batches of at most %d tokens (%.1f GB free on the GPU)", tokens, free / 1e9)
        return tokens

    def _regroup_units(self) -> None:
        """Compiled layers (for the automatic size: one by one with a trainer thread, in units for
        ``auto_most_tokens`` in a trainer process) in units for the size just taken, by the rule
        for a size set (``layers_per_unit``), with the activations kept as compiled (every one
        with a trainer thread, the cheap ones recomputed in a trainer process); unless a compiled
        pass has run: a re-sizing after a switch of weight set keeps the units as they are
        (gpu/training.py: ``regroup_units``)."""
        from ..gpu.training import layers_per_unit, regroup_units

        tokens = self.micro_batch_tokens
        per_unit = layers_per_unit(tokens, self.config.max_seq_len)
        if regroup_units(self.model, per_unit):
            log.info("training: %d layers a unit for the automatic micro-batches of %d tokens", per_unit, tokens)

    def _bucket(self, part: list[Encoded]) -> tuple[int, int]:
        """(rows, length) of a micro-batch once padded: as it is, or bucketed with graphs (one
        graph per shape, so few shapes: :func:`graph_shape`). A lone example whose padded length
        is over half the token limit takes one row, not two (a batch of one compiles once more,
        but stays within the limit)."""
        longest = max(len(x.input_ids) for x in part)
        if not self.graphs:
            return len(part), longest
        rows, length = graph_shape(len(part), longest)
        if len(part) == 1 and 2 * length > max(self.micro_batch_tokens, length):
            rows = 1
        return rows, length

    def _shape(self, part: list[Encoded]) -> tuple[int, int]:
        """The shape a micro-batch runs at: its :meth:`_bucket`, or a recorded larger one.

        With graphs, a shape not recorded yet is recorded only when no request came for
        ``AWAY_AFTER_S``: a recording takes seconds (at 1.5B, 56 layer graphs in 3–4 s)
        with the interpreter lock mostly held, and requests are served slower meanwhile
        (docs/BENCHMARKS.md, runs AO, AP, AR–AU). Until then the smallest
        recorded shape that holds the micro-batch within the micro-batch token limit is used
        (empty rows and padding: more compute, the same gradients); only where none does is the
        new shape recorded now. The cost: a layer's work is that of the larger shape, never more
        than a micro-batch at the token limit, which a regular step's layers have too. Up to run
        DI a recorded shape more than 4 times the micro-batch's area was not used: through HTTP
        a 2 × 128-token micro-batch then started recording its graphs while the user was
        active four times (an attempt a request preempts is not kept: it starts again), and the slowest
        requests (10–25 ms) came in one run of consecutive requests, as a recording would make
        them; their times against the recordings' were not logged (docs/BENCHMARKS.md, run DI)."""
        rows, length = self._bucket(part)
        if not self.graphs or (rows, length) in self._recorded or self.idle_for() >= AWAY_AFTER_S:
            return rows, length
        most = max(self.micro_batch_tokens, rows * length)
        held = [(r, n) for r, n in self._recorded if r >= rows and n >= length and r * n <= most]
        return min(held, key=lambda s: (s[0] * s[1], s), default=(rows, length))

    def _backward(self, loss: torch.Tensor) -> None:
        """Add the gradients of ``loss`` into ``.grad``. With CUDA-graphed layers they are taken
        with ``autograd.grad`` and added here, on the training stream, before the next
        micro-batch replays the graphs that produced them: left to autograd's own accumulation,
        contributions were seen to be lost on a GPU (runs K and L; not in run M, cause not pinned
        down: bench/gpu_graphs_check.py, docs/BENCHMARKS.md). Every adapter tensor gets a gradient
        in LoRA; a tensor that got none would keep a zero gradient here, not None. The buffers
        are allocated once and kept between steps (a graph's output is overwritten by the
        graph's next replay, so it is never adopted as ``.grad``)."""
        if not self.graphs:
            loss.backward()
            return
        params = self._trainable()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        pairs = [(p.grad, g) for p, g in zip(params, grads) if g is not None]
        if pairs:
            torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])

    def _optimizer_step(self, opt, finite: torch.Tensor) -> None:
        """Step unless the loss or gradient norm is not finite. The fused (GPU) AdamW takes the
        verdict as a tensor and skips on the device; elsewhere it is read here."""
        self.ws.before_step()  # gradients into the master copies, where the weights have them
        if opt.defaults.get("fused"):
            opt.found_inf = (~finite).float()
            opt.step()
        elif bool(finite):
            opt.step()
        self.ws.after_step()  # the master copies rounded into the weights in training

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _lr(self, step: int) -> float:
        cfg = self.config
        peak = cfg.learning_rate * self.lr_scale * (cfg.full_learning_rate_factor if self.mode == "full" else 1.0)
        if step < cfg.warmup_steps:
            return peak * (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        return peak * max(0.1, 1.0 - (step - cfg.warmup_steps) / span)

    def _trainable(self) -> list[torch.nn.Parameter]:
        # Named explicitly, never read off requires_grad: PEFT's adapter switches move that flag.
        return self.ws.trainable()

    def _get_optimizer(self):
        if self._optimizer is None:
            with self.lock:  # master copies are made from the weights in training: not mid-rollback
                params = self.ws.optimized()  # the trainable tensors, or their float32 master copies
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            groups = [{"params": decay, "weight_decay": self.config.weight_decay}]
            if no_decay:
                groups.append({"params": no_decay, "weight_decay": 0.0})
            fused = self.device.type == "cuda"
            self._optimizer = torch.optim.AdamW(groups, lr=self.config.learning_rate, fused=fused or None)
            self._steps_copies = any(t is not p for t, p in zip(params, self._trainable()))
        return self._optimizer

    def _zero_grad(self, opt) -> None:
        """Gradients back to zero: with CUDA graphs kept allocated (``_backward``), else None;
        the trainable tensors' and, where the optimizer steps master copies, those too."""
        opt.zero_grad(set_to_none=not self.graphs)
        if self._steps_copies:
            params = self._trainable()
            if self.graphs:
                torch._foreach_zero_([p.grad for p in params if p.grad is not None])
            else:
                for p in params:
                    p.grad = None

    def reset_optimizer(self) -> None:
        """Forget optimizer state (after a rejected update or a rollback)."""
        self._optimizer = None

    def _enter_training(self) -> None:
        self.ws.use("candidate")
        # .train() walks the module tree (milliseconds each step): only when some module is not
        # in training mode. Every module is checked, not just the root: a wrapper (PeftModel)
        # starts in training mode around a model that from_pretrained put in eval mode.
        if self._modules is None:
            self._modules = list(self.model.modules())
        if not all(m.training for m in self._modules):
            self.model.train()

    def set_weights(self, ws) -> None:
        """Train another weight set (a hybrid mode switch or a rollback across modes)."""
        self.ws = ws
        self.mode = ws.kind
        self._modules = None  # listed again at the next step
        self._recorded.clear()  # other tensors train: graphs are recorded again
        if not self.config.micro_batch_tokens and self.device.type == "cuda":
            self.micro_batch_tokens = 0  # sized again at the next step, for this weight set's state
        self.reset_optimizer()
        self._ema, self._ema_history = None, deque(maxlen=self.config.plateau_window + 1)

    # ---- plateau (hybrid) ---------------------------------------------------------------------
    def _track_plateau(self, loss: float) -> None:
        if math.isfinite(loss):
            self._ema = loss if self._ema is None else 0.9 * self._ema + 0.1 * loss
            self._ema_history.append(self._ema)

    def plateaued(self) -> bool:
        """The loss EMA improved by less than ``plateau_min_delta`` (relative) over the last
        ``plateau_window`` steps."""
        h = self._ema_history
        if len(h) <= self.config.plateau_window or h[0] <= 0:
            return False
        return (h[0] - h[-1]) / h[0] < self.config.plateau_min_delta

    # ---- preemption at layer boundaries -------------------------------------------------------
    def _install_preemption_hooks(self) -> None:
        """At every decoder layer (with layers compiled in units, at every unit: its other
        layers pass their input on), in the forward and (through a gradient hook) in the
        backward pass of a training step: :meth:`_boundary` (the output layer's loss calls
        :meth:`_loss_boundary` between its chunks). Each boundary says how many layers of work
        it closes: in the forward pass its own unit's; in the backward pass the next unit's (the
        hook on a unit's output fires once the gradient reaches it, that is after the next
        unit's backward; past the last unit, the output layer's, counted as 1)."""
        layers = adapters.decoder_layers(self.model)
        index = {id(layer): i for i, layer in enumerate(layers)}

        def unit_at(i: int) -> int:
            # layers a training pass runs from layer i: a compiled unit's (gpu/training.py), else 1
            # (in evaluation every layer runs alone, but nothing is queued then)
            return getattr(layers[i].forward, "_idletune_layers", 1) if i < len(layers) else 1

        def fwd_hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if torch.is_tensor(hidden) and hidden is (args[0] if args else kwargs.get("hidden_states")):
                return None  # passed on as it came: a compiled unit's first layer did the work (gpu/training.py)
            i = index[id(module)]
            unit = unit_at(i)
            self._forward_boundary(unit)
            if torch.is_tensor(hidden) and hidden.requires_grad:
                after = unit_at(i + unit)

                def grad_hook(grad):
                    # Backward runs only in training steps, and on a GPU in autograd's device thread.
                    if self._step_thread is not None:
                        self._boundary(layers=after)
                    return grad
                hidden.register_hook(grad_hook)  # fires during backward through this layer (or unit)
            return None

        for layer in layers:
            layer.register_forward_hook(fwd_hook, with_kwargs=True)

    def _boundary(self, queue: bool = True, layers: int = 1) -> None:
        """Stop the pass if a request waits (:class:`Preempted`), and on a GPU (with ``queue``)
        keep at most ``queued_layers`` layers (or loss chunks) of this step's work queued on the
        device, so that a request finds little training work ahead of it (the host otherwise
        runs a whole step ahead); in full fine-tuning while the user is active,
        ``queued_layers_full_active`` (0: the host waits for the work just queued too). Otherwise
        the work just queued always stays queued, however large.

        ``layers``: how many layers the work this boundary closes holds (a compiled unit's
        count; 1 for a layer or a loss chunk). While the user is active (a request in the last
        ``AWAY_AFTER_S``) a unit counts as its layers, so with units of more layers than
        ``queued_layers`` one unit stays queued, not ``queued_layers`` units: at 0.5B in
        2048-token parts (units of 4), TTFT added under a backlog +1.24 ms at p50 and +2.32 at
        p99, against +1.80 and +2.50 (run BV, docs/BENCHMARKS.md). While the user is away every
        boundary counts one: the host runs further ahead, which at 0.5B made the step 41–42 ms
        against 44–48 ms (runs BW, BX)."""
        if self.should_yield():
            raise Preempted()
        if queue and self._step_stream is not None:
            active = self.idle_for() < AWAY_AFTER_S
            limit = self.queued_layers_full_active if active and self.mode == "full" else self.queued_layers
            ev = torch.cuda.Event()
            ev.record(self._step_stream)
            self._queued.append((ev, layers if active else 1))
            while self._queued and (len(self._queued) > 1 or limit == 0) and sum(n for _, n in self._queued) > limit:
                self._queued.popleft()[0].synchronize()  # waits in this thread only, without the GIL

    def _forward_boundary(self, layers: int = 1) -> None:
        """:meth:`_boundary` after a layer's (or unit's) forward: only in the training thread's
        own passes (a request's forward runs the layer hooks too)."""
        if self._step_thread == threading.get_ident():
            self._boundary(layers=layers)

    def _loss_boundary(self) -> None:
        """Between the chunks of the output layer's loss (about 0.5 ms of GPU work each at
        Qwen's vocabulary; the whole loss is a step's largest piece of work between two layer
        boundaries): stop if a request waits; and while the user is active (a request in the
        last ``AWAY_AFTER_S``) queue the loss a chunk at a time like the layers, so a request
        that comes during it finds at most ``queued_layers`` chunks ahead instead of the whole
        loss (the TTFT p99 under a backlog, docs/BENCHMARKS.md run BG; in full fine-tuning
        ``queued_layers_full_active``). While the user is away the loss is queued whole, as the
        host can then run ahead into the backward pass.
        Called in the training thread's forward pass and, where the output layer trains (full
        fine-tuning), in the backward pass, which on a GPU runs in autograd's device thread:
        only training steps and evaluation compute this loss, never a request."""
        if self._step_thread is not None:
            self._boundary(queue=self.idle_for() < AWAY_AFTER_S)

    # ---- evaluation ---------------------------------------------------------------------------
    def _sums(self, examples: list[TrainingExample], which: str, batch_size: int) -> list[tuple[float, int]]:
        """(summed token loss, target tokens) per example. Each batch runs under the model lock and
        yields to requests like a training step does: a request that arrives mid-forward
        preempts it at the next layer, and the batch is redone once the requests are served."""
        items = [encode(e, self.tokenizer, self.config.max_seq_len) for e in examples]
        out: list[tuple[float, int]] = []
        for i in range(0, len(items), batch_size):
            waited = time.monotonic()  # per batch: a preempted attempt counts toward max_wait_s
            while True:
                while self.should_yield():
                    self._give_up_after(waited)
                    time.sleep(0.005)
                try:
                    with self.lock, torch.no_grad():
                        self._step_thread = threading.get_ident()
                        try:
                            self.ws.use("live" if which == LIVE else "candidate")
                            self.model.eval()
                            b = collate(items[i:i + batch_size], self.tokenizer.pad_token_id, self.device)
                            with self._autocast():
                                s, c = target_token_losses(self.model, b, self._loss_boundary)
                        finally:
                            self._step_thread = None
                    break
                except Preempted:
                    self._give_up_after(waited)  # requests that keep coming back to back count too
                    continue
            out += [(float(x), int(n)) for x, n in zip(s, c)]
        return out

    def _give_up_after(self, waited: float) -> None:
        if self.is_stopping() or (self.max_wait_s is not None and time.monotonic() - waited > self.max_wait_s):
            raise Preempted()  # requests never stopped, or the service is closing: the scheduler decides what next

    def example_losses(self, examples: list[TrainingExample], which: str, batch_size: int = 4) -> list[float]:
        """Each example's mean token loss under the ``live`` or ``candidate`` weights (nan if it has no target)."""
        return [s / n if n else float("nan") for s, n in self._sums(examples, which, batch_size)]

    def evaluate(self, examples: list[TrainingExample], which: str, batch_size: int = 4) -> float:
        """Mean token loss of ``examples`` under the ``live`` or ``candidate`` weights."""
        sums = [(s, n) for s, n in self._sums(examples, which, batch_size) if n]
        if not sums:
            return float("nan")
        return sum(s for s, _ in sums) / max(1, sum(n for _, n in sums))

    # ---- metrics ------------------------------------------------------------------------------
    def _record(self, m: StepMetrics) -> None:
        self._latest = m
        if self.metrics_path is not None:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(m)) + "\n")

    def get_latest_metrics(self) -> dict | None:
        """step, loss, learning_rate, grad_norm, examples_processed, tokens_per_second, mode."""
        return asdict(self._latest) if self._latest else None

    def metrics_history(self, limit: int = 500) -> list[dict]:
        return read_metrics(self.metrics_path, limit)

    # ---- save / load --------------------------------------------------------------------------
    def save_model(self, path: str | Path) -> Path:
        """Save the trained weights: a LoRA adapter in PEFT's format, or (full fine-tuning) a
        Hugging Face safetensors folder."""
        path = Path(path)
        with self.lock:
            tensors = self.ws.clone("candidate")
        self.ws.write(tensors, path)
        return path

    def load_model(self, path: str | Path) -> None:
        """Load weights saved by :meth:`save_model` into the trained weights."""
        tensors = self.ws.read(Path(path))
        with self.lock:
            self.ws.load_candidate(tensors)
        self.reset_optimizer()


def read_metrics(path: Path | None, limit: int = 500) -> list[dict]:
    """The last ``limit`` steps' metrics from the JSONL file the engine appends to."""
    if path is None or not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[-limit:]:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return out
