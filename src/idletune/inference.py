"""InferenceEngine: chat completions from the live weights, token by token.

Generation holds the model lock for one request at a time; the training thread never holds it
while a request is in flight (it yields at the next layer boundary), so a request waits at most
about one layer's compute for training to get out of the way.

On a GPU, :func:`idletune.gpu.install` sets :attr:`InferenceEngine.fast`: requests are then
decoded from merged serving weights with a static KV cache and CUDA graphs, on a high-priority
stream, without the model lock (see ``gpu/serving.py``). Requests it cannot take (longer than
its cache, or in full fine-tuning mode) use the portable path below.
"""
from __future__ import annotations

import inspect
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from .activity import ActivityTracker


class PromptTooLong(ValueError):
    pass


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    """0 is greedy: small models ramble when sampled; pass a temperature to sample."""
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    version: int
    seconds: float


def skipped_ids(tokenizer) -> frozenset[int]:
    """The special tokens that decoding with ``skip_special_tokens=True`` drops (checked one by one
    among the tokenizer's special and added tokens)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    candidates = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    return frozenset(i for i in candidates if tokenizer.decode([i], skip_special_tokens=True) == "")


class Detokenizer:
    """Token ids in, the reply's new text out, at a cost a token that does not grow with the reply.

    Each token decodes only a short window, from one emitted piece back (where the text was whole)
    to the end — vLLM's and TGI's incremental detokenization — not the whole reply again; the
    piece before is decoded too and its text subtracted, so a tokenizer that drops a window's
    first space (SentencePiece's "▁") loses nothing. Skipped special tokens never enter the
    window, and a run of tokens that keeps ending in an incomplete UTF-8 sequence is let through
    (as U+FFFD, what decoding makes of invalid bytes) after ``MAX_PENDING`` tokens, since no
    character takes more than four bytes: the window stays short whatever the model emits
    (``bench/emit_cost.py``: about 0.006 ms a token at any length on the development CPU, where
    decoding the whole reply took 0.11 ms a token at 1024 tokens; docs/BENCHMARKS.md, section
    6). ``text`` is all the text emitted so far: the pieces, joined."""

    MAX_PENDING = 8

    def __init__(self, tokenizer, skip: frozenset[int] | None = None) -> None:
        self.tok = tokenizer
        self.skip = skipped_ids(tokenizer) if skip is None else skip
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: the last emitted piece; ids[read:]: not yet text
        self.text = ""

    def add(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        decode = self.tok.decode
        new = decode(self.ids[self.prefix:], skip_special_tokens=True)
        old = decode(self.ids[self.prefix:self.read], skip_special_tokens=True) if self.read > self.prefix else ""
        if len(self.ids) - self.read < self.MAX_PENDING and (len(new) <= len(old) or new.endswith("\ufffd")):
            return ""
        delta = new[len(old):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


class InferenceEngine:
    """Serves the model's *live* weights.

    Args:
        model: the (PEFT-wrapped) model shared with training.
        tokenizer: its tokenizer, with a chat template.
        weights: the WeightUpdater; ``weights.serving()`` is a context manager that selects the
            live weights and yields their version.
        lock: the model lock shared with training.
        activity: marks requests in flight so training yields.
    """

    def __init__(self, model, tokenizer, weights, lock: threading.Lock, activity: ActivityTracker,
                 max_prompt_tokens: int = 4096):
        self.model = model
        self.tokenizer = tokenizer
        self.weights = weights
        self.lock = lock
        self.activity = activity
        limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.max_prompt_tokens = min(max_prompt_tokens, limit)
        self.max_context = limit
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in eos + [tokenizer.eos_token_id] if i is not None}
        self._skip = skipped_ids(tokenizer)  # special tokens a reply's text leaves out
        self.device = next(model.parameters()).device
        self.fast = None
        """GPU path (:class:`idletune.gpu.GpuServing`), set by ``idletune.gpu.install``."""
        # transformers ≥ 5.24 names the KV cache argument and output ``cache`` (``past_key_values``
        # is deprecated there); earlier 5.x releases know only ``past_key_values``
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def count_prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.encode_chat(messages))

    def generate(self, messages: list[dict], params: GenerationParams,
                 on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None, marked: bool = False) -> Completion:
        """Generate a reply to ``messages``. ``on_text`` receives each new piece of text.
        ``marked``: the caller has already counted this request in flight (the HTTP server
        does, from when the request arrives: server/inflight.py); else it counts from here."""
        prompt = self.encode_chat(messages)
        if len(prompt) > self.max_prompt_tokens:
            raise PromptTooLong(f"the prompt is {len(prompt)} tokens; the limit is {self.max_prompt_tokens}")
        max_new = max(1, min(params.max_tokens, self.max_context - len(prompt)))
        gen = torch.Generator(device="cpu")
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        counts: dict[int, int] = {}
        greedy = params.temperature <= 0 and not (params.presence_penalty or params.frequency_penalty)
        pick = None if greedy else (lambda logits: self._pick(logits.float(), params, gen, counts))
        with nullcontext() if marked else self.activity.request():
            t0 = time.perf_counter()
            fast = self.fast
            if fast is not None and fast.usable(len(prompt) + max_new):
                with fast.session() as version:
                    tokens = fast.decoder.tokens(prompt, max_new, pick)
                    text, reason, n = self._emit(tokens, params, counts, on_text, cancelled)
            else:
                self.activity.wait_for_training_turn()  # under sustained load: training's short turn
                with self.lock, self.weights.serving() as version, torch.inference_mode():
                    tokens = self._hf_tokens(prompt, max_new, pick or (lambda logits: int(torch.argmax(logits))))
                    text, reason, n = self._emit(tokens, params, counts, on_text, cancelled)
            return Completion(text, reason, len(prompt), n, version, time.perf_counter() - t0)

    def _hf_tokens(self, prompt, max_new, pick):
        """Token by token through the (PEFT) model with Hugging Face's dynamic cache."""
        ids = torch.tensor([prompt], device=self.device)
        past = None
        for _ in range(max_new):
            res = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: past})
            past = getattr(res, self._cache_arg)
            nxt = pick(res.logits[0, -1].float())  # (V,) -> id
            yield nxt
            ids = torch.tensor([[nxt]], device=self.device)

    def _emit(self, tokens, params, counts, on_text, cancelled):
        """Consume token ids: stop ids and strings, streaming text out, counts for penalties.

        The text returned is exactly the text streamed: the pieces, up to the first stop string.
        A stop string is looked for only where the newest piece could complete one, and the last
        ``len(longest stop) - 1`` characters are held back until they cannot begin one."""
        n = 0  # tokens of the reply
        stream = Detokenizer(self.tokenizer, self._skip)
        stops = [s for s in params.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1  # chars held back for stop strings
        sent = 0  # characters of stream.text streamed out
        cut = -1  # where the first stop string begins
        reason = "length"
        try:
            while True:
                if cancelled is not None and cancelled():
                    reason = "cancelled"
                    break
                nxt = next(tokens, None)
                if nxt is None:
                    break
                if nxt in self.stop_ids:
                    reason = "stop"
                    break
                n += 1
                counts[nxt] = counts.get(nxt, 0) + 1
                piece = stream.add(nxt)
                if not piece:
                    continue  # no new text yet (an incomplete UTF-8 sequence, a skipped special token)
                text = stream.text
                if stops:
                    start = max(0, len(text) - len(piece) - hold)
                    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
                    if hits:
                        cut, reason = min(hits), "stop"
                end = cut if cut >= 0 else len(text) - hold
                if end > sent:
                    if on_text is not None:
                        on_text(text[sent:end])
                    sent = end
                if cut >= 0:
                    break
        finally:
            tokens.close()
        final = stream.text if cut < 0 else stream.text[:cut]
        if on_text is not None and len(final) > sent:
            on_text(final[sent:])  # what was held back for stop strings that never came
        return final, reason, n

    @staticmethod
    def _pick(logits: torch.Tensor, p: GenerationParams, gen: torch.Generator, counts: dict[int, int]) -> int:
        if counts and (p.presence_penalty or p.frequency_penalty):
            idx = torch.tensor(list(counts), device=logits.device)
            c = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.clone()
            logits[idx] -= p.presence_penalty + p.frequency_penalty * c
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, dim=-1) - sp < p.top_p
            probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))
