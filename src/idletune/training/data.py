"""Turning examples into token ids and loss masks, and batches into padded tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..examples import TrainingExample

IGNORE = -100


@dataclass
class Encoded:
    key: object  # the example's id (or a probe's name)
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    kind: str = "chat"

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def encode(example: TrainingExample, tokenizer, max_len: int) -> Encoded:
    """Chat: loss on the final assistant turn only (with its end-of-turn token). Text: on all tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if example.kind == "chat":
        prompt = tokenizer.apply_chat_template(example.messages[:-1], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        if hasattr(prompt, "keys"):
            prompt = prompt["input_ids"]
        target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + eos
        target = target[: max_len // 2] if len(target) > max_len // 2 and len(prompt) > max_len // 2 else target
        target = target[:max_len]
        prompt = list(prompt)[-(max_len - len(target)):] if max_len > len(target) else []
        return Encoded(example.id, prompt + target, [IGNORE] * len(prompt) + target)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + tokenizer(example.text, add_special_tokens=False)["input_ids"] + eos)[:max_len]
    return Encoded(example.id, ids, [IGNORE] * len(bos) + ids[len(bos):], kind="text")


def collate(items: list[Encoded], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item; padding carries no loss and no attention."""
    n = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and target-token count per example: (B,), (B,).

    logits (B, T, V) predict labels shifted by one position.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    tok = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels,
                                            ignore_index=IGNORE, reduction="none")  # (B, T-1)
    count = (shift_labels != IGNORE).sum(dim=1)
    return tok.sum(dim=1), count


def target_token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`per_example_loss`, but the output layer runs only on positions that carry a
    loss: prompts and padding never reach the (large) vocabulary projection, which saves its
    compute and the (B, T, V) logits tensor. Falls back to full logits for models that post-process
    them (logit soft-capping or scaling)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = lm.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) or not hasattr(lm, "get_decoder"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_example_loss(logits, batch["labels"])
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    mask = shift_labels != IGNORE
    selected = hidden[:, :-1][mask]  # (N, C)
    head = lm.get_output_embeddings()
    frozen = _frozen_head(head) if selected.is_cuda else None
    if frozen is not None:  # on a GPU: no (N, V) logits in memory (see gpu/loss.py)
        from ..gpu.loss import linear_cross_entropy

        tok = linear_cross_entropy(selected, frozen, shift_labels[mask])  # (N,)
    else:
        logits = head(selected).float()  # (N, V)
        tok = torch.nn.functional.cross_entropy(logits, shift_labels[mask], reduction="none")  # (N,)
    row = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]  # (N,)
    sums = torch.zeros(mask.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, row, tok)
    return sums, mask.sum(dim=1)


def _frozen_head(head):
    from ..gpu.loss import frozen_plain_head

    return frozen_plain_head(head)
