"""Retention probes: the base model's own answers to generic prompts, recorded once.

Their loss under new weights measures forgetting without any dataset; replaying them
(self-distillation) keeps the model's general behaviour while it learns new facts.

An answer cut off at ``max_new_tokens`` is recorded as such (``complete: false``) and trains and
measures without an end-of-turn token: the base model wanted to go on there (about 10 nats
on that one token, a third of the probes' whole loss), and replaying it taught the model to
stop in the middle of its answers (docs/BENCHMARKS.md, "How many lessons").
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..examples import TrainingExample

FORMAT = 2  # 1 (unmarked): cut-off answers ended with an end-of-turn token; re-recorded

PROMPTS = [
    "What is the capital of France?",
    "Explain what a computer program is in one sentence.",
    "Give me three tips for staying healthy.",
    "What is 12 plus 30?",
    "Write a short sentence about the ocean.",
    "What does a thermometer measure?",
    "Name three primary colors.",
    "How many days are in a week?",
    "What is photosynthesis?",
    "Translate 'thank you' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a friendly dog.",
    "Why do we need sleep?",
    "What is the largest planet in our solar system?",
    "Describe a cat in one sentence.",
    "What is the opposite of 'hot'?",
    "How do you make a cup of tea?",
    "What is gravity?",
    "List two fruits that are red.",
    "Who wrote 'Romeo and Juliet'?",
    "What is the square root of 81?",
    "Give a synonym for 'happy'.",
    "What language is spoken in Brazil?",
    "Why is the sky blue?",
]

# Replayed only, never measured: the more varied the general text rehearsed beside a lesson, the
# less the lesson moves the rest (with these, taught facts cost the gate's probes several times
# less: docs/BENCHMARKS.md, "How many lessons"). Unlike the gate's prompts in topic and form, so
# the gate does not measure what was rehearsed in other words.
REHEARSAL_PROMPTS = [
    "Write a limerick about a clumsy giraffe.", "Retell the story of the tortoise and the hare in three sentences.",
    "What should a beginner know before running a marathon?", "Explain how a magnet works.",
    "How do I wash a wool sweater?", "Why is it good to learn a second language?",
    "How can I keep my houseplants alive?", "Describe how bread rises.",
    "Write a short note thanking a neighbour for their help.", "What is the difference between a lake and a sea?",
    "Tell me a short story about a brave mouse.", "How do I start learning to play the guitar?",
    "Why do birds migrate?", "List some ways to save energy at home.", "What makes a good friend?",
    "Explain what a budget is and why it helps.", "How does a refrigerator keep food cold?",
    "Write a slogan for a bicycle shop.", "What should I do if I get lost in a forest?",
    "Give me advice for my first day at a new job.", "Describe a busy market in the morning.",
    "How do bees make honey?", "Explain the rules of tic-tac-toe.", "Why is exercise good for the heart?",
    "Write a birthday message for a grandmother.", "What is a balanced lunch?", "Explain recycling to a child.",
    "How can I fall asleep faster?", "Why do cats purr?", "Write a short review of a favourite song.",
    "How do I plant a tomato seed?", "What is the purpose of a library?",
    "Give three ideas for a school science project.", "How does the moon affect the tides?",
    "Describe how to tie a shoelace.", "What are the main parts of a flower?",
    "Why should we drink water every day?", "How do the gears on a bicycle help a rider?",
    "What is a good way to study for an exam?", "Write a friendly welcome message for a new club member.",
]


@dataclass
class ProbeSet:
    """The base model's answers: ``gate`` only measured (forgetting), ``rehearsal`` only replayed
    (self-distillation) — measuring on what was replayed would hide the forgetting."""
    gate: list[TrainingExample] = field(default_factory=list)
    rehearsal: list[TrainingExample] = field(default_factory=list)


def record_probes(model, tokenizer, n: int, max_new_tokens: int = 48, rehearsal: int = 0,
                  lock=None) -> list[dict]:
    """Greedy answers of the *base* model (adapters disabled) to the first ``n`` prompts and the
    first ``rehearsal`` rehearsal prompts (those marked ``rehearsal``). With ``lock`` (the model
    lock), sixteen prompts at a time under it: on two CPU cores a request waits at most 4.9 s for
    one such batch, not 12.4 s for all 64 at once (which take 19.6 s in all this way, 29.2 s in
    batches of eight)."""
    size, guard = (16, lock) if lock is not None else (max(1, n + rehearsal), contextlib.nullcontext())

    def answers(prompts: list[str]) -> list[dict]:
        out = []
        for i in range(0, len(prompts), size):
            with guard:
                out += record_answers(model, tokenizer, prompts[i:i + size], max_new_tokens)
        return out
    return answers(PROMPTS[:n]) + [dict(a, rehearsal=True) for a in answers(REHEARSAL_PROMPTS[:rehearsal])]


def record_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[dict]:
    """The base model's greedy answers to ``prompts`` ({"prompt", "answer", "complete"}; empty
    answers left out)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    # Padded here (on the left, for generation), not by the tokenizer: a fast tokenizer keeps its
    # padding setting on the one object every thread uses, and a request's or an import's call
    # meanwhile turned it off mid-batch ("expected sequence of length 37 at dim 1 (got 40)").
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    enc = {"input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=device),
           "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)}
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else torch.no_grad()
    with ctx, torch.inference_mode():
        model.eval()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    generated = out[:, enc["input_ids"].shape[1]:]
    answers = tokenizer.batch_decode(generated, skip_special_tokens=True)
    stops = _stop_ids(model, tokenizer)
    complete = [bool(stops & set(row.tolist())) for row in generated]
    return [{"prompt": p, "answer": a.strip(), "complete": c}
            for p, a, c in zip(prompts, answers, complete) if a.strip()]


def _stop_ids(model, tokenizer) -> set[int]:
    """The ids that end a generation: the tokenizer's end of sequence and the model's own."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def load_or_record(path: Path, model, tokenizer, n: int, model_id: str, rehearsal: int = 0, *,
                   lock=None, from_base: bool = True, problems: list | None = None) -> ProbeSet:
    """Probes from ``path``, recorded first if missing, made for another model or another count.
    Of the first ``n`` prompts every second one is replayed, the others measured; the rehearsal
    prompts are replayed. ``from_base``: the model with its adapters disabled is the original
    base model (not so in full fine-tuning, or on an adapter's merged base): if not, probes kept
    from an earlier version are brought up to this one's form, not recorded again from trained
    weights (what could not be done is added to ``problems``)."""
    data = None
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
    wanted = {"model": model_id, "format": FORMAT, "prompts": min(n, len(PROMPTS)),
              "rehearsal": min(rehearsal, len(REHEARSAL_PROMPTS))}
    stale = not isinstance(data, dict) or any(data.get(k) != v for k, v in wanted.items())
    if stale and not from_base and isinstance(data, dict) and data.get("model") == model_id and data.get("probes"):
        data = _brought_up(data, tokenizer)
        if problems is not None and wanted["rehearsal"]:
            problems.append("retention probes kept from an earlier version: the rehearsal probes are recorded from "
                            "the original base model, which these weights no longer are (full fine-tuning or a "
                            "merged adapter); lessons rehearse fewer probes")
    elif stale:
        data = dict(wanted, probes=record_probes(model, tokenizer, n, rehearsal=rehearsal, lock=lock))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    examples = [(p.get("rehearsal", False), as_example(p)) for p in data["probes"]]
    fixed = [e for r, e in examples if not r]
    return ProbeSet(gate=fixed[1::2], rehearsal=fixed[0::2] + [e for r, e in examples if r])


def _brought_up(data: dict, tokenizer, max_new_tokens: int = 48) -> dict:
    """Probes of an earlier form, kept: an answer as long as the token limit was cut off by it."""
    probes = [dict(p, complete=p.get("complete",
                                     len(tokenizer(p["answer"], add_special_tokens=False)["input_ids"]) < max_new_tokens - 2))
              for p in data["probes"]]
    return dict(data, probes=probes)


def as_example(answer: dict) -> TrainingExample:
    """A recorded answer as a chat example; one cut off by the token limit has no end of turn."""
    return TrainingExample.chat([{"role": "user", "content": answer["prompt"]},
                                 {"role": "assistant", "content": answer["answer"]}],
                                source="probe", **({} if answer.get("complete", True) else {"open_end": True}))


def fingerprint(probes: list[TrainingExample]) -> str:
    """What a loss measured on ``probes`` was measured on (the base model's is kept on disk)."""
    text = json.dumps([[e.messages, bool(e.metadata.get("open_end"))] for e in probes], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
