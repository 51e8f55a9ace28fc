"""Turning examples into token ids and loss masks, and batches into padded tensors."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..examples import TrainingExample

IGNORE = -100


@dataclass
class Encoded:
    key: object  # the example's queue id (None for a retention probe)
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    kind: str = "chat"

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def encode(example: TrainingExample, tokenizer, max_len: int) -> Encoded:
    """Chat: loss on the final assistant turn only (with its end-of-turn token, unless the answer
    was cut off: ``open_end`` in its metadata). Text: on all tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if example.kind == "chat":
        if example.metadata.get("open_end"):
            eos = []
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


def collate(items: list[Encoded], pad_id: int, device, length: int = 0, rows: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item, or to ``length`` if longer, and add empty rows up to
    ``rows`` (CUDA-graphed training replays one graph per shape, so shapes are bucketed); padding
    carries no loss, and an empty row has no targets (its loss sum and count are 0).

    No attention mask is needed: padding is only ever on the right and attention is causal, so
    no real token attends to a pad, and positions count from 0 in every row (true of causal
    language models; not of bidirectional embedding variants, which idletune does not train).
    Without a mask the model takes its fast causal attention path: no padding mask to build or
    check.

    Besides the padded tensors, the batch carries where its targets are, worked out here on the
    host: ``target_pos`` (flat indices into the (B, T-1) shifted positions), ``target_row`` and
    ``target_labels``, and ``target_count`` per row. With them the loss needs no boolean
    indexing on the device, which would make the host wait for the GPU. On a GPU the tensors
    are copied from pinned memory without blocking.
    """
    n = max(length, *(len(e.input_ids) for e in items))
    empty = [pad_id] * n, [IGNORE] * n
    # one tensor from one nested list: a tensor per row costs more than the rest of a step's host work
    ids = torch.tensor([list(e.input_ids) + [pad_id] * (n - len(e.input_ids)) for e in items]
                       + [empty[0]] * (rows - len(items)), dtype=torch.long)
    labels = torch.tensor([list(e.labels) + [IGNORE] * (n - len(e.labels)) for e in items]
                          + [empty[1]] * (rows - len(items)), dtype=torch.long)
    shifted = labels[:, 1:]  # position t-1 predicts token t
    hit = shifted != IGNORE
    pos = hit.reshape(-1).nonzero()[:, 0]  # on the host: a batch of 4096 tokens in microseconds
    batch = {"input_ids": ids, "labels": labels, "target_pos": pos,
             "target_row": torch.div(pos, max(n - 1, 1), rounding_mode="floor"),
             "target_labels": shifted.reshape(-1).index_select(0, pos), "target_count": hit.sum(dim=1)}
    device = torch.device(device)
    if device.type == "cuda":
        return {k: v if v is None else v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v if v is None else v.to(device) for k, v in batch.items()}


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


def target_token_losses(model, batch: dict[str, torch.Tensor], between_chunks: Callable[[], None] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`per_example_loss`, but the output layer runs only on positions that carry a
    loss: prompts and padding never reach the (large) vocabulary projection, which saves its
    compute and the (B, T, V) logits tensor. Falls back to full logits for models that post-process
    them (logit soft-capping or scaling). Takes a batch from :func:`collate`. ``between_chunks``:
    called between the chunks of the output layer's loss, forward and (where the output layer
    trains) backward (see :func:`gpu.loss.linear_cross_entropy`; not on the full-logits
    fallback: one piece there)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = lm.config
    # use_cache=False: a model's config asks for a KV cache by default, and each layer would
    # copy its keys and values into one, which no training pass reads (on a GPU its guards
    # also made the compiled layers recompile per layer, and again for every new batch shape)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) or not hasattr(lm, "get_decoder"):
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        return per_example_loss(logits, batch["labels"])
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
    selected = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["target_pos"])  # (N, C)
    labels = batch["target_labels"]  # (N,)
    head = lm.get_output_embeddings()
    weight = _plain_head(head)
    if weight is not None:  # no (N, V) logits in memory (see gpu/loss.py)
        from ..gpu.loss import linear_cross_entropy

        tok = linear_cross_entropy(selected, weight, labels, between_chunks=between_chunks)  # (N,)
    else:
        logits = head(selected).float()  # (N, V)
        tok = torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # (N,)
    sums = torch.zeros(hidden.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, batch["target_row"], tok)
    return sums, batch["target_count"]


def _plain_head(head):
    from ..gpu.loss import plain_head

    return plain_head(head)
