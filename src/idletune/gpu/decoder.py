"""FastDecoder: batch-1 generation for Llama-family models from merged, fused serving weights.

Why: Hugging Face's eager forward launches ~20 small kernels per layer from Python and an
unmerged PEFT adapter adds ~8 more, so on a GPU a 0.5B model decodes at ~40 tok/s, 1 % of what
its memory bandwidth allows. Here:

- **Merged serving weights.** q/k/v and gate/up are fused into one matrix each, holding
  ``W0 + scale·B·A`` of the *live* adapter (and o/down too when they carry an adapter). Serving
  a live adapter costs nothing per token; :meth:`refresh` recomputes the merged weights from the
  base weights after each publish (from ``W0``, never by adding deltas in place, so bf16 rounding
  never accumulates over versions).
- **Static KV cache** of ``max_len`` positions, and **one CUDA graph per attention-length bucket**
  (256, 512, … positions) for the decode step: a token costs one graph launch. The graph also
  takes the argmax and writes it back as the next input, so greedy decoding runs one step ahead
  of the host (no host sync on the critical path). The prompt (prefill) is a CUDA graph too,
  one per padded prompt length (64, 128, … 1024, then multiples of 512): run eagerly, a
  256-token prompt launched ~500 kernels from Python, 10 ms of host time that a training
  thread's share of the interpreter lock stretched further (docs/BENCHMARKS.md, section 1).
  The prompt's layer is compiled too, with the prompt's length as its one variable (one
  compilation for every length): at 0.5B the 256-token prompt's graph runs 326 kernels instead
  of 494, in 1.72 instead of 2.43 ms on an H100 (docs/BENCHMARKS.md, run CQ).
- **Few, short kernels per layer.** At batch 1 a small model's step is set by how many
  kernels it launches and how long each small one takes, not by bandwidth. A layer is three
  compiled pieces: (norm, fused q/k/v, rotary, cache write), attention, and (output product
  plus residual, norm, gate/up, SiLU·up, down product plus residual). The matrix-vector products
  are written as reductions that inductor fuses with the work around them (``tuned``, the
  default, tunes them by coordinate descent): a norm is a second accumulator in the loop of the
  product that follows it (each output row sums x² itself), gate and up are one loop with
  SiLU(g)·u as its epilogue, stored once, and each residual addition is the epilogue of the
  product that produces it — 232 kernels per 0.5B step instead of 281. Only attention depends
  on the attention length, and it is compiled with a dynamic length: every bucket reuses one
  compilation. Attention for one query is written as reductions too: a library attention kernel
  (cuDNN's, through SDPA) took 10 µs per layer at the 0.5B shape, a quarter of the step.
- **Programmatic dependent launch** (``pdl``, Hopper and newer): each kernel starts while the
  one before it finishes and loads what does not depend on it (its weights) before waiting,
  which hides most of the gap between ~10 small kernels per layer.

The same code runs eagerly on the CPU (no graphs), which is how its tests check it against the
Hugging Face model with the adapter applied.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger("idletune.gpu")

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def unsupported_reason(model) -> str | None:
    """None if :class:`FastDecoder` can serve ``model`` (a PeftModel or plain causal LM)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = lm.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model type {cfg.model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention"
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    attn = inner.layers[0].self_attn
    if hasattr(attn, "q_norm"):
        return "q/k norms"
    return None


def _itself(param: torch.Tensor) -> torch.Tensor:
    return param


def _linear_parts(mod, adapter: str, served: Callable[[torch.Tensor], torch.Tensor] = _itself):
    """(base weight, base bias, [(A, B, scale)]) of a possibly LoRA-wrapped linear module; the
    base tensors as ``served`` maps them, no adapter where the module's adapters are disabled
    (full fine-tuning: they are zero and skipped)."""
    base = getattr(mod, "base_layer", mod)
    deltas = []
    if hasattr(mod, "lora_A") and adapter in mod.lora_A and not getattr(mod, "disable_adapters", False):
        deltas.append((mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, float(mod.scaling[adapter])))
    return served(base.weight), None if base.bias is None else served(base.bias), deltas


class FastDecoder:
    """Merged serving weights, a static KV cache and CUDA-graph decode for one sequence at a time.

    Args:
        model: the PeftModel (or plain model) whose ``adapter`` is served.
        adapter: the PEFT adapter merged into the serving weights ("live").
        max_len: KV cache positions (prompt + generated).
        use_graphs: capture the decode step and the prompt in CUDA graphs (default: on CUDA).
        stream: the stream all serving work runs on (default: the current one).
        compile: compile the decode step's pieces with torch.compile (default: with graphs,
            unless IDLETUNE_COMPILE_DECODE=0); a failure falls back to eager and is kept in
            ``compile_error``.
        tuned: compile with inductor's coordinate-descent tuning, which tunes the reductions and
            also turns the remaining batch-1 library products (output, down) into fusable
            reductions; untuned, those two stay cuBLAS calls and their residual additions are
            kernels of their own (default: IDLETUNE_DECODE_TUNED, else on).
        attention: "reductions" (compiled, the default) or "sdpa" (one library kernel); default:
            IDLETUNE_DECODE_ATTENTION, else "reductions".
        pdl: compiled kernels use programmatic dependent launch where the GPU has it (Hopper and
            newer; default: on unless IDLETUNE_DECODE_PDL=0).
        pad_prompts: run each prompt padded to its bucket (:meth:`prefill_bucket`), the shape its
            CUDA graph holds (default: with graphs). Padding goes after the prompt: attention
            is causal, and the cache positions it fills are masked until decoding overwrites them.
        compile_prefill: compile the prompt's layer (default: with ``compile``, unless
            IDLETUNE_COMPILE_PREFILL=0); one compilation serves every prompt length. A failure
            falls back to the eager layer and is kept in ``compile_error``, as for ``compile``.
        served: maps each of the model's base parameters to the tensor that holds its live
            weights (default: the parameter itself; in full fine-tuning the weight set's live
            copy, ``FullWeights.served``, while the parameters hold the weights in training).
            Taken again by each :meth:`refresh` that rebuilds everything.
    """

    MIN_BUCKET = 256
    # prompt buckets: PREFILL_MIN_BUCKET doubling up to PREFILL_DOUBLING_UNTIL (64, 128, … 1024),
    # then multiples of PREFILL_STEP: at most a third of a long prompt's work is padding
    PREFILL_MIN_BUCKET, PREFILL_DOUBLING_UNTIL, PREFILL_STEP = 64, 1024, 512

    def __init__(self, model, adapter: str = "live", max_len: int = 4096, use_graphs: bool | None = None,
                 stream: torch.cuda.Stream | None = None, compile: bool | None = None,
                 tuned: bool | None = None, attention: str | None = None, pdl: bool | None = None,
                 pad_prompts: bool | None = None, compile_prefill: bool | None = None,
                 served: Callable[[torch.Tensor], torch.Tensor] | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"FastDecoder cannot serve this model: {reason}")
        self.model = model
        self.lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.adapter = adapter
        cfg = self.lm.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.hidden = cfg.hidden_size
        emb = self.lm.model.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        self.max_len = int(max_len)
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self.pad_prompts = self.use_graphs if pad_prompts is None else bool(pad_prompts)
        if self.use_graphs and not self.pad_prompts:
            raise ValueError("graphed prefill needs pad_prompts (a graph holds one prompt length)")
        self.stream = stream
        if compile is None:
            compile = self.use_graphs and os.environ.get("IDLETUNE_COMPILE_DECODE", "1") != "0"
        if compile_prefill is None:
            compile_prefill = compile and os.environ.get("IDLETUNE_COMPILE_PREFILL", "1") != "0"
        self.compile_error: str | None = None
        if tuned is None:
            tuned = os.environ.get("IDLETUNE_DECODE_TUNED", "1") != "0"
        self.tuned = bool(tuned)
        self.attention = attention or os.environ.get("IDLETUNE_DECODE_ATTENTION", "reductions")
        if self.attention not in ("reductions", "sdpa"):
            raise ValueError(f"attention must be reductions or sdpa, got {self.attention!r}")
        # eager pieces (the CPU, IDLETUNE_COMPILE_DECODE=0, a failed compile): library products,
        # the step's attention as batched products, which never materialise a (heads, L, D)
        # product, and the prompt's as one library kernel (SDPA)
        self._eager = {"pre": _decode_pre_eager, "post": _decode_post_eager,
                       "attend": _decode_attend_bmm if self.attention == "reductions" else _decode_sdpa,
                       "prefill": _prefill_layer}
        self.pdl = os.environ.get("IDLETUNE_DECODE_PDL", "1") != "0" if pdl is None else bool(pdl)
        self._pieces = dict(self._eager)
        opts = {"coordinate_descent_tuning": True} if self.tuned else {}
        if self.pdl and hasattr(torch._inductor.config.triton, "enable_pdl"):  # older torch: no PDL
            opts["triton.enable_pdl"] = True  # inductor emits it on Hopper and newer only
        if compile or compile_prefill:  # a compilation per model shape and option set
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if compile:  # fuses each layer's element-wise work; compiled on the first captured step
            self._pieces["pre"] = torch.compile(_decode_pre, dynamic=False, fullgraph=True, options=opts)
            self._pieces["post"] = torch.compile(_decode_post, dynamic=False, fullgraph=True, options=opts)
            if self.attention == "reductions":
                self._pieces["attend"] = torch.compile(_decode_attend, dynamic=True, fullgraph=True, options=opts)
        if compile_prefill:
            # one compilation for every prompt length: _prefill marks the length dynamic, and
            # nothing else is (left to dynamo, a second model's head counts became variables)
            self._pieces["prefill"] = torch.compile(_prefill_layer, dynamic=False, fullgraph=True, options=opts)
        self.version = None  # what refresh() last merged (set by the caller)
        n_layers = len(self.lm.model.layers)
        # static KV cache: (layers, k|v, kv heads, positions, head dim); k and v of a layer are
        # written together
        self.kv_cache = torch.zeros((n_layers, 2, self.n_kv, self.max_len, self.head_dim), dtype=self.dtype,
                                    device=self.device)
        with torch.no_grad():
            pos = torch.arange(self.max_len, device=self.device)
            dummy = torch.zeros(1, 1, self.hidden, dtype=self.dtype, device=self.device)
            cos, sin = self.lm.model.rotary_emb(dummy, pos[None])  # (1, L, D) each
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # (L, D)
        self.positions = pos
        # graph inputs/outputs: the prompt and its last position (prefill), the token to feed,
        # its position, the logits and the argmax
        self.prompt_buf = torch.zeros(self.max_len, dtype=torch.long, device=self.device)
        self.last_buf = torch.zeros(1, dtype=torch.long, device=self.device)
        self.ids_buf = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos_buf = torch.zeros(1, dtype=torch.long, device=self.device)
        self.logits_buf = torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=self.device)
        self._graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}  # ("step", L) / ("prefill", T)
        self._merge_graph = None
        self._pool = None
        self.layers: list[dict] = []
        self.refresh(served=served)

    # ---- weights ----------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, full: bool = True, served: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Re-merge the live adapter into the serving weights.

        ``full``: rebuild everything from the model — fused copies of q/k/v and gate/up, and
        fresh references to the other tensors (after a mode switch or a rollback may have
        replaced the base weights, or in full fine-tuning after a publish changed them all),
        taking the base tensors through ``served`` (see the class). Otherwise only the adapted
        matrices are recomputed, one ``W0 + scale·B·A`` matrix product each (what a LoRA
        publish needs: about a millisecond)."""
        if not full and self.layers:
            if not self.use_graphs:
                self._merge_adapted()
                return
            if self._merge_graph is None:  # ~100 small products: one graph launch instead
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._merge_adapted()
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with _own_cublas_workspace(), torch.cuda.graph(g, stream=side, capture_error_mode="thread_local"):
                    self._merge_adapted()
                self._merge_graph = g
            self._merge_graph.replay()
            return
        self._merge_graph = None
        self._served = sv = served or _itself
        self._model_ptrs = self._model_storage()  # what the decoder must never write into
        lm = self.lm
        old = self.layers
        layers, adapted = [], []
        for i, layer in enumerate(lm.model.layers):
            at, mlp = layer.self_attn, layer.mlp
            prev = old[i] if i < len(old) else {}
            qkv = [_linear_parts(m, self.adapter, sv) for m in (at.q_proj, at.k_proj, at.v_proj)]
            gu = [_linear_parts(m, self.adapter, sv) for m in (mlp.gate_proj, mlp.up_proj)]
            o, down = _linear_parts(at.o_proj, self.adapter, sv), _linear_parts(mlp.down_proj, self.adapter, sv)
            entry = {
                "ln1": sv(layer.input_layernorm.weight), "ln2": sv(layer.post_attention_layernorm.weight),
                "qkv": self._fused(prev.get("qkv"), qkv, adapted),
                "qkv_bias": self._fused_bias(prev.get("qkv_bias"), qkv),
                "gate_up": self._fused(prev.get("gate_up"), gu, adapted),
                "o": self._merged(prev.get("o"), o, adapted), "o_bias": o[1],
                "down": self._merged(prev.get("down"), down, adapted),
            }
            layers.append(entry)
        self.layers, self._adapted = layers, adapted
        self.embed = sv(lm.model.embed_tokens.weight)
        self.norm = sv(lm.model.norm.weight)
        head = lm.get_output_embeddings()
        self.lm_head = sv(getattr(head, "base_layer", head).weight)
        sig = _ptrs(layers) + [t.data_ptr() for t in (self.embed, self.norm, self.lm_head)]
        if sig != getattr(self, "_sig", sig):
            self._graphs.clear()  # a graph holds tensor addresses: recapture if any tensor moved
        self._sig = sig

    def _merge_adapted(self) -> None:
        for out, w, deltas in self._adapted:
            _merge_into(out, w, deltas)

    def _fused(self, out, parts, adapted: list) -> torch.Tensor:
        rows = sum(w.shape[0] for w, _, _ in parts)
        if out is None or out.shape[0] != rows:
            out = torch.empty(rows, parts[0][0].shape[1], dtype=self.dtype, device=self.device)
        r = 0
        for w, _, deltas in parts:
            _merge_into(out[r:r + w.shape[0]], w, deltas)
            if deltas:
                adapted.append((out[r:r + w.shape[0]], w, deltas))
            r += w.shape[0]
        return out

    def _fused_bias(self, out, parts) -> torch.Tensor | None:
        if all(b is None for _, b, _ in parts):
            return None
        bs = [b if b is not None else torch.zeros(w.shape[0], dtype=self.dtype, device=self.device) for w, b, _ in parts]
        cat = torch.cat([b.detach().to(self.dtype) for b in bs])
        if out is None or out.shape != cat.shape:
            return cat
        return out.copy_(cat)

    def _merged(self, out, part, adapted: list) -> torch.Tensor:
        w, _, deltas = part
        if not deltas:
            return w  # not adapted: served straight from the base weights
        # the previous entry may be a model tensor (served straight, unadapted, in another mode):
        # merge into a buffer of the decoder's own, never into the weights
        if out is None or out.shape != w.shape or out.data_ptr() in self._model_ptrs:
            out = torch.empty_like(w, dtype=self.dtype)
        _merge_into(out, w, deltas)
        adapted.append((out, w, deltas))
        return out

    def _model_storage(self) -> set[int]:
        """Addresses of the model's base weights, as the parameters show them and as served."""
        return {t.data_ptr() for n, p in self.lm.named_parameters() if "lora_" not in n for t in (p, self._served(p))}

    def serving_bytes(self) -> int:
        """Memory held by the serving copies (fused/merged matrices) and the KV cache."""
        base = self._model_storage()
        own = {t.data_ptr(): t for e in self.layers for t in e.values() if t is not None and t.data_ptr() not in base}
        total = sum(t.numel() * t.element_size() for t in own.values())
        return total + self.kv_cache.numel() * self.kv_cache.element_size()

    # ---- the model --------------------------------------------------------------------------
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.rms_norm(x, (self.hidden,), self.norm, self.eps), self.lm_head).float()

    def prefill_bucket(self, T: int) -> int:
        """The padded length a prompt of ``T`` tokens runs at (``T`` itself without padding)."""
        if not self.pad_prompts:
            return T
        b = self.PREFILL_MIN_BUCKET
        while b < T and b < self.PREFILL_DOUBLING_UNTIL:
            b *= 2
        if b < T:
            b = -(-T // self.PREFILL_STEP) * self.PREFILL_STEP
        return min(b, self.max_len)

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """Run the prompt (positions 0..T-1), fill the cache; returns the last position's logits (V,).
        Padded (:meth:`prefill_bucket`), the cache is also written past T, up to the bucket:
        those positions are masked until decoding overwrites them."""
        T = len(prompt)
        if not 0 < T <= self.max_len:
            raise ValueError(f"a prompt of {T} tokens (the cache holds {self.max_len})")
        host = torch.tensor(list(prompt) + [T - 1], dtype=torch.long, pin_memory=self.device.type == "cuda")
        self.prompt_buf[:T].copy_(host[:T], non_blocking=True)
        self.last_buf.copy_(host[T:], non_blocking=True)
        key = ("prefill", self.prefill_bucket(T))
        if self.use_graphs:
            (self._graphs.get(key) or self._capture(key)).replay()
        else:
            self._prefill(key[1])
        return self.logits_buf[0]

    def _prefill(self, T: int) -> None:
        """The prompt in ``prompt_buf[:T]`` (padded past ``last_buf``) through the model: the
        cache filled, the logits and argmax of position ``last_buf`` written, ``pos_buf`` set."""
        x = F.embedding(self.prompt_buf[:T], self.embed)
        cos, sin = self.cos[:, None], self.sin[:, None]  # (max_len, 1, D): the layer takes T of them
        layer = self._pieces["prefill"]
        for li, e in enumerate(self.layers):
            torch._dynamo.mark_dynamic(x, 0)  # compiled: the prompt's length only is a variable
            x = layer(x, self.kv_cache[li], self.positions, cos, sin, e["ln1"], e["qkv"], e["qkv_bias"],
                      e["o"], e["o_bias"], e["ln2"], e["gate_up"], e["down"], self.eps, self.n_heads, self.n_kv,
                      self.head_dim)
        logits = self._logits(x.index_select(0, self.last_buf))
        self.logits_buf.copy_(logits)
        self.ids_buf.copy_(logits.argmax(dim=-1))
        self.pos_buf.copy_(self.last_buf + 1)

    def _step(self, L: int) -> None:
        """Decode one token: feed ids_buf at pos_buf; write logits_buf; feed the argmax next."""
        pos = self.pos_buf
        x = F.embedding(self.ids_buf, self.embed)  # (1, C)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (1, 1, D), once per step
        mask = torch.where(self.positions[:L] <= pos, 0.0, float("-inf"))  # (L,)
        pre, attend, post = self._pieces["pre"], self._pieces["attend"], self._pieces["post"]
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        for li, e in enumerate(self.layers):
            cache = self.kv_cache[li]  # (2, Hkv, max_len, D)
            q = pre(x, cache, pos, cos, sin, e["ln1"], e["qkv"], e["qkv_bias"], self.eps, H, Hkv, D)
            o = attend(q.view(Hkv, H // Hkv, D), cache[0, :, :L], cache[1, :, :L], mask)  # (Hkv, G, D)
            x, _ = post(x, o.reshape(1, H * D), e["o"], e["o_bias"], e["ln2"], e["gate_up"], e["down"], self.eps)
        logits = self._logits(x)
        self.logits_buf.copy_(logits)
        self.ids_buf.copy_(logits.argmax(dim=-1))
        self.pos_buf.add_(1)

    def bucket(self, pos: int) -> int:
        """Attention length used for a step at position ``pos``: a power of two ≥ pos + 1."""
        L = self.MIN_BUCKET
        while L < pos + 1:
            L *= 2
        return min(L, self.max_len)

    @torch.no_grad()
    def step(self, pos: int) -> None:
        """Launch one decode step (the host's count of the position picks the graph)."""
        L = self.bucket(pos)
        if not self.use_graphs:
            self._step(L)
            return
        key = ("step", L)
        (self._graphs.get(key) or self._capture(key)).replay()

    def _capture(self, key: tuple[str, int]) -> torch.cuda.CUDAGraph:
        """Capture the decode step at attention length L (``("step", L)``) or the prefill of a
        padded prompt length T (``("prefill", T)``). Graphs share one memory pool: they never
        run at once (one sequence at a time), and each keeps its results in the buffers."""
        kind, n = key
        run = self._step if kind == "step" else self._prefill
        # Warm-up runs execute for real, on the current inputs: exactly what the replay that
        # follows will write again, so the cache stays right. Inputs are restored.
        ids, pos = self.ids_buf.clone(), self.pos_buf.clone()
        side = torch.cuda.Stream(priority=self.stream.priority if self.stream is not None else 0)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                try:
                    run(n)
                except torch.OutOfMemoryError:  # not the compiler's: the caller decides
                    raise
                except Exception as e:  # a compile failure: fall back to this kind's eager pieces
                    names = ("pre", "attend", "post") if kind == "step" else ("prefill",)
                    if all(self._pieces[k] is self._eager[k] for k in names):
                        raise
                    self.compile_error = f"{kind}: {type(e).__name__}: {e}"[:300]
                    log.warning("FastDecoder: compiling the %s failed, its eager pieces serve instead: %s",
                                "decode step" if kind == "step" else "prompt", self.compile_error)
                    self._pieces.update({k: self._eager[k] for k in names})
                    run(n)
                self.ids_buf.copy_(ids)
                self.pos_buf.copy_(pos)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with _own_cublas_workspace(), torch.cuda.graph(g, pool=self._pool, stream=side,
                                                        capture_error_mode="thread_local"):
            run(n)
        self._graphs[key] = g
        return g

    @torch.no_grad()
    def warm_up(self) -> float:
        """Compile the decode step and capture the first length bucket and the prefill graphs of
        prompts up to 1024 tokens now (seconds taken), so that the first request does not wait
        for them. Later buckets only capture a graph (the pieces do not depend on the length;
        attention compiles with a dynamic length)."""
        t = time.perf_counter()
        for _ in self.tokens([0] * 8, 3):  # cache contents past a request's length are masked
            pass
        if self.pad_prompts:  # the buckets of most chat turns' prompts (longer ones: at first use)
            b, buckets = self.PREFILL_MIN_BUCKET, set()
            while b <= self.PREFILL_DOUBLING_UNTIL:
                buckets.add(self.prefill_bucket(min(b, self.max_len)))
                b *= 2
            for b in sorted(buckets):
                self.prefill([0] * b)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return time.perf_counter() - t

    def graphs_captured(self) -> int:
        """How many CUDA graphs are held (none after a refresh that moved a tensor)."""
        return len(self._graphs)

    def fits(self, total_tokens: int) -> bool:
        return total_tokens <= self.max_len

    def tokens(self, prompt: list[int], max_new: int, pick: Callable[[torch.Tensor], int] | None = None) -> Iterator[int]:
        """Yield generated token ids. ``pick`` chooses from logits (V,) (sampling, penalties);
        without it decoding is greedy and runs one step ahead on the device: the next step is
        launched before the current token is read back, so the host never stalls the GPU."""
        if len(prompt) + max_new > self.max_len:
            raise ValueError(f"{len(prompt)} + {max_new} tokens exceed the cache ({self.max_len})")
        logits = self.prefill(prompt)
        pos = len(prompt)
        if pick is not None:
            nxt = pick(logits)
            for i in range(max_new):
                yield nxt
                if i == max_new - 1:
                    return
                self.ids_buf.fill_(nxt)
                self.step(pos)
                pos += 1
                nxt = pick(self.logits_buf[0])
            return
        pinned = self.device.type == "cuda"
        host = torch.zeros(2, dtype=torch.long, pin_memory=pinned)
        # token 0 is the prefill's argmax (already in ids_buf)
        host[0:1].copy_(self.ids_buf, non_blocking=pinned)
        ready = _event(self.device)
        for i in range(max_new):
            if i + 1 < max_new:
                self.step(pos)  # computes token i + 1 while the host reads token i
                pos += 1
            if ready is not None:
                ready.synchronize()
            tok = int(host[i % 2])
            if i + 1 < max_new:
                host[(i + 1) % 2:(i + 1) % 2 + 1].copy_(self.ids_buf, non_blocking=pinned)
                ready = _event(self.device)
            yield tok


def _pre_attention(x, ln1, qkv_w, qkv_b, cos, sin, eps: float, H: int, Hkv: int, D: int):
    """Norm, fused q/k/v projection and rotary embedding (q and k together) for x (T, C).
    Returns q (T, H, D) and k, v (Hkv, T, D) as the cache holds them."""
    T = x.shape[0]
    h = F.rms_norm(x, (x.shape[-1],), ln1, eps)
    qkv = _linear(h, qkv_w, qkv_b)  # (T, (H + 2 Hkv) D)
    qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
    qk = qk.view(T, H + Hkv, D)
    x1, x2 = qk.chunk(2, dim=-1)
    qk = qk * cos + torch.cat((-x2, x1), dim=-1) * sin
    q, k = qk.split([H, Hkv], dim=1)
    return q, k.transpose(0, 1), v.view(T, Hkv, D).transpose(0, 1)


def _prefill_layer(x, cache, pos, cos, sin, ln1, qkv_w, qkv_b, o_w, o_b, ln2, gu_w, down_w, eps: float,
                   H: int, Hkv: int, D: int):
    """One decoder layer on the prompt's x (T, C) at positions 0..T-1, its k and v written into
    ``cache`` (2, Hkv, max_len, D) at those positions; ``pos``, cos and sin are the whole tables,
    (max_len,) and (max_len, 1, D), so that only T varies from one prompt length to another.
    Compiled (the GPU default), inductor fuses the element-wise work around the library products
    and attention."""
    T = x.shape[0]
    cos, sin = cos.narrow(0, 0, T), sin.narrow(0, 0, T)
    q, k, v = _pre_attention(x, ln1, qkv_w, qkv_b, cos, sin, eps, H, Hkv, D)
    # an index, not a slice: copying into a slice asks whether it is contiguous (T == max_len),
    # which would fix T to a constant at that length
    cache.index_copy_(2, pos.narrow(0, 0, T), torch.stack((k, v)))
    a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True,
                                       enable_gqa=Hkv != H)  # (1, H, T, D)
    x = x + _linear(a[0].transpose(0, 1).reshape(T, H * D), o_w, o_b)
    g, u = F.linear(F.rms_norm(x, (x.shape[-1],), ln2, eps), gu_w).chunk(2, dim=-1)
    return x + F.linear(F.silu(g) * u, down_w)


def _decode_attend(q, k, v, mask):
    """One query position: q (Hkv, G, D) — the G query heads sharing each kv head — over k, v
    (Hkv, L, D) with the additive ``mask`` (L,). Written as reductions, which inductor fuses into
    a few small kernels (compiled only: run eagerly it would materialise (Hkv, G, L, D)).
    Returns (Hkv, G, D)."""
    s = (q.float()[:, :, None, :] * k.float()[:, None, :, :]).sum(-1) * (1.0 / math.sqrt(q.shape[-1])) + mask
    p = torch.softmax(s, dim=-1)  # (Hkv, G, L)
    return (p[:, :, :, None] * v.float()[:, None, :, :]).sum(2).to(q.dtype)


def _decode_attend_bmm(q, k, v, mask):
    """As :func:`_decode_attend`, as two batched products and a softmax (for eager pieces)."""
    s = torch.bmm(q, k.transpose(1, 2)).float() * (1.0 / math.sqrt(q.shape[-1])) + mask  # (Hkv, G, L)
    return torch.bmm(torch.softmax(s, dim=-1).to(v.dtype), v)


def _decode_sdpa(q, k, v, mask):
    """As :func:`_decode_attend`, with one library attention kernel (the G heads as G rows)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask.to(q.dtype).view(1, 1, 1, -1))[0]


def _norm_matvec(x, ln, w, eps: float):
    """``rms_norm(x, ln) @ w.T`` for one row x (1, C), in float32, written as reductions over C
    for inductor: the sum of squares is a second accumulator of the same loop as the dot
    products (each output row recomputes it from x in cache), so the norm costs no kernel."""
    xf = x.float()
    N, C = w.shape
    dot = ((xf * ln.float())[:, None, :] * w.float()[None]).sum(-1)  # (1, N)
    ss = (xf * xf)[:, None, :].expand(1, N, C).sum(-1)  # (1, N), equal entries
    return dot * torch.rsqrt(ss / C + eps)


def _rotary_and_cache(qkv, cache, pos, cos, sin, H: int, Hkv: int, D: int):
    """Rotary on q and k of one position's qkv (1, (H + 2 Hkv) D); k|v written into ``cache``.
    Returns q (1, H, D) in the cache's dtype."""
    qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=-1)
    qk = qk.view(1, H + Hkv, D)
    x1, x2 = qk.chunk(2, dim=-1)
    qk = (qk * cos + torch.cat((-x2, x1), dim=-1) * sin).to(cache.dtype)
    q, k = qk.split([H, Hkv], dim=1)
    cache.index_copy_(2, pos, torch.stack((k.transpose(0, 1), v.to(cache.dtype).view(1, Hkv, D).transpose(0, 1))))
    return q


def _decode_pre(x, cache, pos, cos, sin, ln1, qkv_w, qkv_b, eps: float, H: int, Hkv: int, D: int):
    """Decode step, first piece of a layer: norm and q/k/v as one reduction, rotary,
    cache write. x (1, C) is the residual stream; returns q (1, H, D)."""
    qkv = _norm_matvec(x, ln1, qkv_w, eps)
    if qkv_b is not None:
        qkv = qkv + qkv_b.float()
    return _rotary_and_cache(qkv, cache, pos, cos.float(), sin.float(), H, Hkv, D)


def _decode_pre_eager(x, cache, pos, cos, sin, ln1, qkv_w, qkv_b, eps: float, H: int, Hkv: int, D: int):
    """:func:`_decode_pre` with library products (eager: no (N, C) temporaries)."""
    qkv = _linear(F.rms_norm(x, (x.shape[-1],), ln1, eps), qkv_w, qkv_b).float()
    return _rotary_and_cache(qkv, cache, pos, cos.float(), sin.float(), H, Hkv, D)


def _decode_post(x, o, o_w, o_b, ln2, gu_w, down_w, eps: float):
    """Decode step, second piece: output product plus residual; norm, gate and up
    as one reduction (three accumulators) with SiLU(g)·u as its epilogue; down product plus
    residual. Returns the new residual stream (1, C) and SiLU(g)·u (1, I) — returned so that it
    is stored once rather than recomputed inside the down product's reduction."""
    x = x + _linear(o, o_w, o_b)
    xf = x.float()
    I, C = gu_w.shape[0] // 2, x.shape[-1]
    xl = (xf * ln2.float())[:, None, :]
    g = (xl * gu_w[:I].float()[None]).sum(-1)
    u = (xl * gu_w[I:].float()[None]).sum(-1)
    r = torch.rsqrt((xf * xf)[:, None, :].expand(1, I, C).sum(-1) / C + eps)
    a = (F.silu(g * r) * (u * r)).to(x.dtype)
    return x + F.linear(a, down_w), a


def _decode_post_eager(x, o, o_w, o_b, ln2, gu_w, down_w, eps: float):
    """:func:`_decode_post` with library products."""
    x = x + _linear(o, o_w, o_b)
    g, u = F.linear(F.rms_norm(x, (x.shape[-1],), ln2, eps), gu_w).float().chunk(2, dim=-1)
    a = (F.silu(g) * u).to(x.dtype)
    return x + F.linear(a, down_w), a


def _linear(x, w, b):
    """``F.linear`` with the bias added separately: a product with a bias is one fixed library
    call (addmm), a product plus an addition is what inductor can fuse."""
    y = F.linear(x, w)
    return y if b is None else y + b


@contextlib.contextmanager
def _own_cublas_workspace():
    """Around a graph capture: drop cuBLAS's cached workspaces before and after, so the captured
    library calls use a workspace allocated *during* the capture, from the graph's own pool.
    Otherwise the graph would keep the address of a cached workspace, and whoever clears the
    cache later — torch.compile's CUDA graph trees do at every recording, from the training
    thread — frees memory the graph still writes to (docs/BENCHMARKS.md, runs N and X).

    The clear is process-wide (a private torch call, the one graph trees make around their own
    recordings). It is safe while another thread trains: a dropped workspace goes back to the
    caching allocator's pool of the stream it was made for, so only later work on that same
    stream can reuse it, after the work already queued there."""
    torch._C._cuda_clearCublasWorkspaces()
    try:
        yield
    finally:
        torch._C._cuda_clearCublasWorkspaces()


def _event(device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    e = torch.cuda.Event()
    e.record()
    return e


@torch.no_grad()
def _merge_into(out: torch.Tensor, w: torch.Tensor, deltas) -> None:
    """out = w + Σ scale·B·A, from the base weights w (never in place: ``out`` is the decoder's own).

    One matrix product with the base as the addend: the product accumulates in float32 and the
    sum is rounded once to out's dtype, as a float32 merge would be (B and A are rounded to it
    first: a relative error of 2⁻⁹ in the delta, far below the rounding of the sum)."""
    if not deltas:
        out.copy_(w)
        return
    A, B, scale = deltas[0]
    torch.addmm(w.to(out.dtype), B.to(out.dtype), A.to(out.dtype), alpha=scale, out=out)
    for A, B, scale in deltas[1:]:
        out.addmm_(B.to(out.dtype), A.to(out.dtype), alpha=scale)


def _ptrs(layers: list[dict]) -> list[int]:
    return [t.data_ptr() if t is not None else 0 for e in layers for t in e.values()]
