"""Training-side GPU options: compiled decoder layers, optionally replayed as CUDA graphs.

On a GPU a LoRA step spends most of its time in element-wise work (norms, rotary, SiLU·up, the
adapters' dropout, casts and additions: measured 28 of 121 ms of kernels per step at the 1.5B
shape) and in launching ~6000 small kernels from Python. ``torch.compile`` fuses each layer's
element-wise work into a few Triton kernels: half the launches, a third less kernel time
(docs/BENCHMARKS.md). Only the layers' ``forward`` is compiled, so the preemption hooks around
each layer stay in eager Python and can still stop a step. With small micro-batches
(``training.micro_batch_tokens`` of 4096 tokens or fewer) several consecutive layers are
compiled as one unit (:func:`layers_per_unit`, :func:`_units`): fewer calls from Python per
step, a preemption boundary per unit. With the automatic size the layers are compiled one by
one, then regrouped into units at the first step, once the engine has sized its micro-batches
(:func:`regroup_units`).

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
import os
from dataclasses import dataclass

import torch
import torch._functorch.config

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


# Where training is asked to use little memory: what the compiler's partitioner may recompute in
# the backward pass instead of keeping from the forward. Its default already recomputes cheap
# operations (element-wise ones, views: its allowlist) except where it judges that slower; these
# lift those judgements, not the allowlist: random operations (dropout's masks) and products are
# never recomputed. At 1.5B in 2048-token parts the step's peak fell from 4.05 to 3.34 GB at
# about the same speed (docs/BENCHMARKS.md, run BP, through ``activation_memory_budget`` = 0.9,
# which for this layer keeps the same activations as these options: 62 against 74 kB a token,
# checked on the CPU). Lower budgets went further, but at 0.8 the partitioner drew dropout's
# random numbers afresh in the backward pass: other masks than the forward's, wrong gradients
# (a known torch bug, pytorch/pytorch#190758: the budget's knapsack can pick random operations;
# with the budget left at 1 it never runs, and the partitioner's ban on them holds).
RECOMPUTE_CHEAP = {"ban_recompute_used_far_apart": False, "ban_recompute_long_fusible_chains": False,
                   "ban_recompute_materialized_backward": False}


def compile_layers(model, graphs: bool = False, dynamic_dims: bool = True, layers_per_unit: int = 1,
                   recompute_cheap: bool = False, **kwargs) -> int:
    """Compile the decoder layers' forward for training passes (with ``graphs``, replayed as
    CUDA graphs; with ``dynamic_dims``, one compilation for every batch size and length), in
    units of ``layers_per_unit`` consecutive layers (see :func:`_units`); with
    ``recompute_cheap``, keeping fewer activations (:data:`RECOMPUTE_CHEAP`). Returns how many
    layers."""
    from ..training.adapters import decoder_layers

    compilation = _Compilation(graphs, dynamic_dims, recompute_cheap, dict(kwargs))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    _hold_full_collections()
    if graphs:
        kwargs.setdefault("mode", "reduce-overhead")
        torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit = None  # shapes are bucketed
    layers = decoder_layers(model)
    for unit in _model_units(model, layers, layers_per_unit):
        if not any(_compiled(layer) for layer in unit):
            _compile_unit(unit, dynamic_dims, recompute_cheap, kwargs, compilation)
    return len(layers)


@dataclass
class _Compilation:
    """What :func:`compile_layers` was called with, kept on each layer it compiled (for
    :func:`regroup_units`); ``ran``: a compiled training pass has run since."""
    graphs: bool
    dynamic_dims: bool
    recompute_cheap: bool
    kwargs: dict
    ran: bool = False


def regroup_units(model, layers_per_unit: int) -> bool:
    """Compile the decoder layers again in units of ``layers_per_unit`` layers, with the other
    options :func:`compile_layers` had (``recompute_cheap`` included: not turned on here), if
    that makes other units and no compiled training pass has run yet: until then nothing was
    compiled, only ``torch.compile``'s wrappers are replaced. For the automatic micro-batch
    size, known at the first step (``TrainingEngine._micro_batches``). Once a pass has run
    (compiled code, CUDA graphs) the units stay as they are: a later re-sizing (after a switch
    of weight set) does not regroup them, which would compile and record everything again.
    Returns whether it regrouped (False too where :func:`compile_layers` compiled nothing)."""
    from ..training.adapters import decoder_layers

    layers = decoder_layers(model)
    compilation = getattr(layers[0].forward, "_idletune_compilation", None) if layers else None
    if compilation is None or compilation.ran:
        return False
    now = [layer.forward._idletune_layers for layer in layers if hasattr(layer.forward, "_idletune_layers")]
    if [len(unit) for unit in _model_units(model, layers, layers_per_unit)] == now:
        return False
    for layer in layers:
        layer.forward = getattr(layer.forward, "_idletune_eager", layer.forward)
    compile_layers(model, compilation.graphs, compilation.dynamic_dims, layers_per_unit, compilation.recompute_cheap,
                   **compilation.kwargs)
    return True


# Layers are compiled in units of about UNIT_TOKENS tokens × layers: the work of one layer on the
# largest batch the batch manager makes (16 × 512 tokens), so a unit holds a request back no
# longer than one layer of such a batch does (see _units).
UNIT_TOKENS = int(os.environ.get("IDLETUNE_UNIT_TOKENS", 8192))  # an experiment's knob (docs/CONFIGURATION.md)
MOST_LAYERS_PER_UNIT = 8


def layers_per_unit(micro_batch_tokens: int, max_seq_len: int = 0) -> int:
    """Decoder layers per compiled unit for micro-batches of at most ``micro_batch_tokens``
    (``training.micro_batch_tokens``), or ``max_seq_len`` tokens where that is more (one example
    alone makes a part that long): ``UNIT_TOKENS`` // that, from 1 to
    ``MOST_LAYERS_PER_UNIT`` — 8 for 1024-token parts, 4 for 2048, 2 for 4096, 1 above that
    and for 0. The automatic size (``micro_batch_tokens`` 0) takes on a GPU as many tokens as
    half the free memory holds, up to the most where training runs (``AUTO_MOST_TOKENS``: 2048
    in a trainer process, 16384 with a trainer thread): the service compiles units for that
    most in a trainer process, layer by layer with a trainer thread, and the engine regroups
    them at its first step where the size it takes asks for others (:func:`regroup_units`)."""
    if micro_batch_tokens <= 0:
        return 1
    return max(1, min(MOST_LAYERS_PER_UNIT, UNIT_TOKENS // max(micro_batch_tokens, max_seq_len)))


# Models whose decoder loop passes every layer of one attention type (config.layer_types) the
# same arguments: the layers of a unit can all take its first layer's. Others (e.g. Gemma 3n,
# with inputs per layer) compile layer by layer.
SAME_ARGUMENTS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite",
                  "olmo2", "smollm3"}


def _model_units(model, layers: list, size: int) -> list[list]:
    """The units :func:`compile_layers` makes of ``model``'s decoder ``layers`` at ``size``
    layers a unit: by :func:`_units`, or layer by layer where the model type is not in
    :data:`SAME_ARGUMENTS`."""
    from ..training.adapters import text_config

    cfg = text_config(model)
    if size > 1 and getattr(cfg, "model_type", None) not in SAME_ARGUMENTS:
        log.info("training: layers compiled one by one (%s passes its layers different arguments)",
                 getattr(cfg, "model_type", None))
        size = 1
    return _units(layers, size, getattr(cfg, "layer_types", None))


def _units(layers: list, size: int, kinds: list | None = None) -> list[list]:
    """Consecutive layers in units of at most ``size``, never across a change of attention type
    (``kinds``: the config's ``layer_types``, e.g. full and sliding-window attention, which get
    other masks and, in Gemma 3, other rotary embeddings: a unit's layers all get its first
    layer's arguments).

    A compiled unit is one call from Python, one CUDA graph forward and one backward, and one
    preemption boundary, however many layers it holds. Each layer call costs the host about
    0.17 ms forward and more backward (dynamo's guards, AOTAutograd's wrappers, graph trees'
    checks: docs/BENCHMARKS.md, run BE), which small micro-batches do not hide. At 1.5B in
    2048-token parts, units of 4 layers ran the step in 80–82 ms against 80–91 ms for units of
    2 and the plain loop's 163 ms; in 1024-token parts, 96–109 ms (units of 4 or 8) against
    113–121 ms layer by layer (runs BK, BL, BO). While the user is active the engine's queue
    counts a unit as its layers, so a request finds at most ``queued_layers`` layers ahead of
    it, or one unit where a unit holds more (``TrainingEngine._boundary``, runs BS, BV)."""
    if size < 1:
        raise ValueError(f"layers_per_unit must be ≥ 1, got {size!r}")
    kinds = list(kinds) if kinds is not None and len(kinds) == len(layers) else [None] * len(layers)
    units: list[list] = []
    for i, layer in enumerate(layers):
        if units and len(units[-1]) < size and kinds[i - 1] == kinds[i]:
            units[-1].append(layer)
        else:
            units.append([layer])
    return units


def _hidden(args: tuple, kw: dict):
    return args[0] if args else kw["hidden_states"]


def _with_hidden(hidden, args: tuple, kw: dict) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kw
    return args, {**kw, "hidden_states": hidden}


def _compile_unit(unit: list, dynamic_dims: bool, recompute_cheap: bool, kwargs: dict,
                  compilation: _Compilation) -> None:
    """The unit's first layer runs the whole unit compiled in training passes; the others then
    return their input as it is (the work is done). Elsewhere (evaluation, inference, or
    gradients off) every layer runs its own eager forward, which stays reachable from the
    layer's new forward (``_idletune_eager``, for :func:`regroup_units`)."""
    first = unit[0]
    eagers = tuple(layer.forward for layer in unit)
    returned_tuple = [False]  # what the unit returned, as the others pass it on (a tensor in transformers 5)

    def run(*args, **kw):
        for eager in eagers:
            out = eager(*args, **kw)
            args, kw = _with_hidden(out[0] if isinstance(out, tuple) else out, args, kw)
        return out

    compiled = torch.compile(run if len(unit) > 1 else eagers[0], **kwargs)

    def recomputing(*args, **kw):
        # The partitioner runs when a call compiles (the first, or a recompilation), so the
        # options are set around every call (~25 µs on a slow CPU). They are process-wide
        # meanwhile; only training passes partition (chat's compiled graphs have no backward).
        with torch._functorch.config.patch(RECOMPUTE_CHEAP):
            return compiled(*args, **kw)
    call = recomputing if recompute_cheap else compiled

    def training() -> bool:
        return first.training and torch.is_grad_enabled()

    def forward(*args, **kw):
        if training():
            compilation.ran = True
            if dynamic_dims:
                _mark_dynamic(args, kw)
            out = call(*args, **kw)
            returned_tuple[0] = isinstance(out, tuple)
            return out
        return eagers[0](*args, **kw)

    first.forward = forward
    for layer, eager in zip(unit[1:], eagers[1:]):
        def passed_on(*args, _eager=eager, **kw):
            if not training():
                return _eager(*args, **kw)
            hidden = _hidden(args, kw)
            return (hidden,) if returned_tuple[0] else hidden

        layer.forward = passed_on
    for layer, eager in zip(unit, eagers):
        layer.forward._idletune_compiled, layer.forward._idletune_eager = True, eager
        layer.forward._idletune_compilation = compilation
    forward._idletune_layers = len(unit)  # what a training pass runs from here (the engine's queue counts it)


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
    the model lock, which requests on the portable path would wait for.
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
