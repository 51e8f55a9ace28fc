"""Training-side GPU options: compiled decoder layers, optionally replayed as CUDA graphs.

On a GPU a LoRA step spends most of its time in element-wise work (norms, rotary, SiLU·up, the
adapters' dropout, casts and additions: measured 28 of 121 ms of kernels per step at the 1.5B
shape) and in launching ~6000 small kernels from Python. ``torch.compile`` fuses each layer's
element-wise work into a few Triton kernels: half the launches, a third less kernel time
(docs/BENCHMARKS.md). Only the layers' ``forward`` is compiled, so the preemption hooks around
each layer stay in eager Python and can still stop a step.

``graphs`` (the default on a GPU in LoRA mode with the GPU serving path, see :func:`wanted`):
each compiled layer's forward and backward are also captured as CUDA graphs
(``mode="reduce-overhead"``, torch's CUDA graph trees), so a layer costs one launch instead of
dozens and the host no longer limits the step. A graph holds one shape, so the engine pads
micro-batches to bucketed shapes (``engine.graph_shape``: rows to a power of two, lengths to a
multiple of 64 or a quarter of an octave; a new shape is recorded when the user is away, until
then a recorded larger one serves), marks each micro-batch as a new iteration (a step preempted
between layers leaves no half-used graph behind) and keeps the gradient buffers allocated (a
graph's output is overwritten by its next replay, so it must never become a ``.grad`` itself).

The compiled forward runs only for training passes (module in train mode, gradients on).
Evaluation and any inference through the Hugging Face forward stay eager, so a request never
waits for a compilation. Shapes: the batch and length dimensions of a layer's inputs are marked
dynamic before its first call (:func:`_mark_dynamic`), so one compilation serves every batch
size and length: left to itself, dynamo compiled for the first shape, then again (tens of
seconds at 1.5B, holding the interpreter lock much of it) at the first other length and at the
first other batch size (docs/BENCHMARKS.md, run AP). With graphs each new padded shape is still
recorded once (seconds); the engine's buckets bound how many there are.
"""
from __future__ import annotations

import gc
import logging

import torch

log = logging.getLogger("idletune.gpu")

_compilations = 0  # compilations (and, where torch reports them, graph recordings) ended so far
_gc_threshold: tuple | None = None


def compilations() -> int:
    """How many compilations have ended in this process (see :func:`_hold_full_collections`)."""
    return _compilations


def _hold_full_collections() -> None:
    """While torch compiles (or records CUDA graphs), no full garbage collection: a compilation
    makes so many objects that Python ran full collections in its middle, each a 64–110 ms
    pause of every thread, chat included (docs/BENCHMARKS.md, runs AK–AN). Young collections go
    on as usual (most of a compilation's garbage is short-lived); with graphs the engine runs
    the full collection once, after the round, and freezes what survives (``TrainingEngine``).
    Registered again if ``torch._dynamo.reset()`` dropped the callbacks."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # an older torch: collections stay as they are
        return
    if _gc_hold_start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_gc_hold_start)
        callback_handler.register_end_callback(_gc_hold_end)


def _gc_hold_start(*_args) -> None:
    # torch calls start and end for the outermost compilation only, and end in a finally
    global _gc_threshold
    _gc_threshold = gc.get_threshold()
    gc.set_threshold(_gc_threshold[0], _gc_threshold[1], 1 << 30)


def _gc_hold_end(*_args) -> None:
    global _compilations, _gc_threshold
    _compilations += 1
    if _gc_threshold is not None:
        gc.set_threshold(*_gc_threshold)
        _gc_threshold = None


def _mark_dynamic(args: tuple, kwargs: dict) -> None:
    """Mark the batch and sequence dimensions of a decoder layer's inputs as dynamic (hidden
    states (B, T, C); rotary cos/sin and position ids (B or 1, T, ...); cache positions (T,)).
    ``maybe_mark_dynamic``: a dimension of size 1 may still be specialised (a batch of one compiles
    once more), and nothing fails where torch cannot keep a dimension dynamic. Other tensor
    arguments keep dynamo's own handling (a recompilation where their sizes change)."""
    mark = torch._dynamo.maybe_mark_dynamic
    hidden = args[0] if args else kwargs.get("hidden_states")
    tensors = [hidden] + list(kwargs.get("position_embeddings") or ()) + [kwargs.get("position_ids")]
    for t in tensors:
        if torch.is_tensor(t) and t.dim() >= 2:
            mark(t, 0)
            mark(t, 1)
    if torch.is_tensor(kwargs.get("cache_position")):
        mark(kwargs["cache_position"], 0)


def compile_layers(model, graphs: bool = False, dynamic_dims: bool = True, **kwargs) -> int:
    """Compile every decoder layer's forward for training passes (with ``graphs``, replayed as
    CUDA graphs; with ``dynamic_dims``, one compilation for every batch size and length). Returns
    how many layers."""
    from ..training.adapters import decoder_layers

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    _hold_full_collections()
    if graphs:
        kwargs.setdefault("mode", "reduce-overhead")
        torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit = None  # shapes are bucketed
    layers = decoder_layers(model)
    for layer in layers:
        if _compiled(layer):
            continue
        eager = layer.forward
        compiled = torch.compile(eager, **kwargs)

        def forward(*args, _eager=eager, _compiled=compiled, _layer=layer, **kw):
            if _layer.training and torch.is_grad_enabled():
                if dynamic_dims:
                    _mark_dynamic(args, kw)
                return _compiled(*args, **kw)
            return _eager(*args, **kw)

        forward._idletune_compiled = True
        layer.forward = forward
    return len(layers)


def _compiled(layer) -> bool:
    return getattr(layer.forward, "_idletune_compiled", False)


def layers_compiled(model) -> bool:
    """Whether :func:`compile_layers` compiled this model's decoder layers."""
    from ..training.adapters import decoder_layers

    return any(_compiled(layer) for layer in decoder_layers(model))


def wanted(setting: str, model, fast_path: bool = True) -> str | None:
    """What ``training.compile`` ("auto", "graphs", "on", "off") asks for on this model:
    "graphs" (compiled layers replayed as CUDA graphs), "compile" (compiled layers) or None.

    "auto" means graphs on a CUDA device when Triton (torch.compile's GPU backend) is there and
    requests are served by the GPU fast path: a compilation runs inside a training step, under
    the model lock, which requests on the portable path (full/hybrid modes) would wait for.
    "graphs" needs CUDA; on another device it compiles without them. On CUDA, without Triton
    nothing is compiled (with a warning)."""
    if setting == "off":
        return None
    on_cuda = next(model.parameters()).device.type == "cuda"
    if setting == "on":
        return "compile"
    if setting == "auto" and not (on_cuda and fast_path):
        return None
    if on_cuda:  # torch.compile's GPU backend
        try:
            import triton  # noqa: F401
        except ImportError:
            log.warning("training.compile=%s: triton is not installed, training layers stay eager", setting)
            return None
    return "graphs" if on_cuda else "compile"
