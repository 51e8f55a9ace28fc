"""Retention probes: the base model's own answers to generic prompts, recorded once.

Their loss under new weights measures forgetting without any dataset; replaying them
(self-distillation) keeps the model's general behaviour while it learns new facts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..examples import TrainingExample

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


def record_probes(model, tokenizer, n: int, max_new_tokens: int = 48) -> list[dict]:
    """Greedy answers of the *base* model (adapters disabled) to the first ``n`` prompts."""
    prompts = PROMPTS[:n]
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
    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"prompt": p, "answer": a.strip()} for p, a in zip(prompts, answers) if a.strip()]


def load_or_record(path: Path, model, tokenizer, n: int, model_id: str) -> list[TrainingExample]:
    """Probes from ``path``, recorded first if missing or made for another model."""
    data = None
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
    if not data or data.get("model") != model_id or len(data.get("probes", [])) < min(n, len(PROMPTS)) * 0.5:
        data = {"model": model_id, "probes": record_probes(model, tokenizer, n)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    return [TrainingExample.chat([{"role": "user", "content": p["prompt"]},
                                  {"role": "assistant", "content": p["answer"]}], source="probe")
            for p in data["probes"][:n]]
