"""Cross-entropy through the output layer without the (N, V) logits in memory.

The vocabulary projection of N positions makes (N, V) logits — 4096 positions × 151936 ids is
2.5 GB in float32, more than the rest of a LoRA step on a 0.5B model — and cross-entropy's
backward keeps another tensor of that size. The gradient for the hidden states is computed
during the forward pass, chunk by chunk: ``dL/dh = (softmax(h Wᵀ) − onehot) W``. Peak extra
memory is one chunk of logits; the FLOPs are the same as the unfused forward + backward.

Where the output layer trains (full fine-tuning), its gradient ``dL/dW = Σᵢ gᵢ (pᵢ − yᵢ)ᵀ hᵢ``
needs each position's upstream gradient gᵢ, known only in the backward pass: there the logits
are computed again, chunk by chunk (one more product per chunk, a third more of the output
layer's FLOPs), scaled by gᵢ and reduced into ``dL/dW``. Both passes call ``between_chunks``, so
on a GPU a request finds at most a chunk or two of the loss queued ahead of it: computed whole,
the trainable output layer's loss was about 15 ms of GPU work that every request arriving
during it waited through (docs/BENCHMARKS.md, run CY).

Used on every device (plain torch, with one Triton kernel on a GPU): on the CPU, a LoRA step on 4 × 512 text tokens of
the default model took 7.9 s instead of 10.3 s and 5.9 GB of peak memory instead of 6.6 GB
(the logits and their gradient are memory-bound work there too).

On a GPU with Triton, each chunk's softmax, loss and gradient are one kernel
(``_rows_kernel`` in :func:`_fused_rows`) that reads the bf16 logits twice and writes the gradient over them, in
place: the plain-torch chunk (float copy, logsumexp, subtract, exp, one-hot, cast back) moved
about 24 GB per 4096-position step at Qwen's 151936-id vocabulary, 9.5 of a 1.5B step's 74 ms of
kernel time (docs/BENCHMARKS.md, run AE).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MB in float32)
# With the fused kernel: bytes of logits per chunk, in their own dtype. 128 MB is about 0.5 ms of
# GPU work a chunk at Qwen's vocabulary (two products and the row kernel): a request that comes
# during the loss finds little of it queued ahead (``between_chunks``, docs/BENCHMARKS.md run BG).
FUSED_CHUNK_BYTES = 1 << 27
_fused_failed = False  # set when the kernel failed to compile or launch


def _rows(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, grad: bool):
    """``losses`` ← each row's loss; with ``grad`` returns softmax − one-hot (over the logits,
    in place, where the fused kernel runs)."""
    fused = _fused_rows() if logits.is_cuda else None
    if fused is not None:  # one kernel: the loss, and softmax − one-hot over the logits
        try:
            fused(logits, labels, losses, grad)
            return logits
        except Exception as e:  # Triton there but not working: plain torch from now on
            _give_up_fused(e)
    return _torch_rows(logits, labels, losses, grad)


def _chunks(n: int, weight: torch.Tensor, chunk: int | None) -> range:
    if not chunk:
        vocab = weight.shape[0]
        chunk = (_balanced(n, max(1, FUSED_CHUNK_BYTES // (vocab * weight.element_size())))
                 if weight.is_cuda and _fused_rows() is not None else max(1, CHUNK_ELEMENTS // vocab))
    return range(0, n, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None,
                between_chunks):
        # h (N, C), weight (V, C), labels (N,) -> per-position loss (N,) in float32
        n = h.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        labels = labels.contiguous()
        starts = _chunks(n, weight, chunk)
        with torch.autocast(h.device.type, enabled=False):
            hw = h.to(weight.dtype)
            for i in starts:
                part = slice(i, i + starts.step)
                probs = _rows(hw[part] @ weight.t(), labels[part], losses[part], grad_h is not None)  # (c, V)
                if grad_h is not None:
                    grad_h[part] = (probs @ weight).to(h.dtype)
                if between_chunks is not None and i + starts.step < n:
                    between_chunks()
        empty = torch.empty(0)
        ctx.save_for_backward(grad_h if grad_h is not None else empty,
                              *((hw, weight, labels) if weight.requires_grad else (empty,) * 3))
        ctx.starts, ctx.between_chunks = starts, between_chunks
        return losses

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, hw, weight, labels = ctx.saved_tensors
        gh = grad_h * grad_loss[:, None].to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:  # the output layer trains: its logits again, chunk by chunk
            gw = torch.zeros_like(weight)
            scratch = torch.empty(len(labels), dtype=torch.float32, device=hw.device)
            starts = ctx.starts
            with torch.autocast(hw.device.type, enabled=False):
                for i in starts:
                    part = slice(i, i + starts.step)
                    probs = _rows(hw[part] @ weight.t(), labels[part], scratch[part], True)
                    probs.mul_(grad_loss[part, None].to(probs.dtype))  # gᵢ (pᵢ − yᵢ)
                    gw.addmm_(probs.t(), hw[part])
                    if ctx.between_chunks is not None and i + starts.step < len(labels):
                        ctx.between_chunks()
        return gh, gw, None, None, None


def _torch_rows(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, grad: bool):
    """What the fused kernel computes, in plain torch: ``losses`` ← per-row loss; returns
    softmax − one-hot in the logits' dtype (with ``grad``)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)  # (c,)
    losses.copy_(lse - x.gather(1, labels[:, None])[:, 0])
    if not grad:
        return None
    probs = x.sub_(lse[:, None]).exp_()  # softmax, in place
    probs[torch.arange(len(labels), device=x.device), labels] -= 1.0
    return probs.to(logits.dtype)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None, between_chunks: Callable[[], None] | None = None) -> torch.Tensor:
    """Per-position cross-entropy of ``h @ weight.T`` against ``labels``: (N,) float32, with
    gradients for ``h`` and, where it requires grad, ``weight`` (in the backward pass). Every
    label must be a vocabulary id (0 ≤ label < V: no ignore index; callers pass target positions
    only). ``chunk``: positions per chunk (default: 256 MB of float32 logits; with the fused
    kernel, 128 MB in the weight's dtype). ``between_chunks``: called after each chunk's work is
    queued but the last, in the forward pass and (where the weight trains) the backward pass —
    the training engine's loss boundary (it may raise to stop the pass, or wait until the device
    has caught up)."""
    return _LinearCrossEntropy.apply(h, weight, labels, chunk, between_chunks)


def plain_head(head) -> torch.Tensor | None:
    """The weight of ``head`` if it is a plain, bias-free nn.Linear (else None): what
    :func:`linear_cross_entropy` can compute the loss through, frozen or trained."""
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    return None


def _balanced(n: int, most: int) -> int:
    """Rows per chunk: at most ``most``, in as few chunks as that allows, of near-equal size
    (a last chunk of a few rows would run the output product at a poor tile fill)."""
    chunks = -(-n // most) if n else 1
    return max(1, -(-n // chunks))


def _give_up_fused(error: Exception) -> None:
    """The fused kernel failed to compile or launch: log it once, use plain torch from now on."""
    import logging

    global _fused_failed
    logging.getLogger("idletune.gpu").warning("the fused loss kernel failed (%s: %s); using plain torch",
                                              type(error).__name__, str(error)[:300])
    _fused_failed = True
    _fused_rows.cache_clear()
    return None


@functools.cache
def _fused_rows():
    """The fused per-row kernel's launcher, or None without Triton (or after it failed)."""
    if _fused_failed:
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _rows_kernel(logits_ptr, labels_ptr, loss_ptr, V, BLOCK: tl.constexpr, GRAD: tl.constexpr):
        # One program per row: an online max / sum of exponentials over the vocabulary, the loss
        # (logsumexp − the label's logit) and, with GRAD, softmax − one-hot stored over the row.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * V
        label = tl.load(labels_ptr + row)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(loss_ptr + row, lse - tl.load(base + label).to(tl.float32))
        if GRAD:
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                p = tl.where(offs == label, p - 1.0, p)
                tl.store(base + offs, p.to(logits_ptr.dtype.element_ty), mask=offs < V)

    def launch(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, grad: bool) -> None:
        """``losses`` (c,) float32 ← per-row loss; with ``grad``, ``logits`` (c, V) contiguous ←
        softmax − one-hot, in their dtype."""
        rows, vocab = logits.shape
        if rows:
            _rows_kernel[(rows,)](logits, labels, losses, vocab, BLOCK=4096, GRAD=grad, num_warps=8)

    return launch
