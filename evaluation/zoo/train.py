"""A plain training loop for the zoo: AdamW, causal LM loss, warmup + cosine decay.

Examples are (context, target) pairs; the loss covers only the target. Pretraining text
has an empty context (loss on everything); a task example's context is its prompt, so a
fine-tune learns to answer rather than to write prompts. Sequences are right-padded per
batch (padding is masked out of attention and loss).
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch

Example = tuple[str, str]


def encode_batch(tokenizer, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels (-100 on context and padding)."""
    rows, labels = [], []
    for context, target in examples:
        c = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        rows.append(c + t)
        labels.append([-100] * len(c) + t)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, mask, lab


def train(model, tokenizer, sample_batch: Callable[[random.Random, int], list[Example]], *, steps: int, batch_size: int,
          lr: float, seed: int, warmup: int = 20, weight_decay: float = 0.01,
          log: Callable[[str], None] | None = None) -> dict:
    """Train `model` in place on `steps` batches drawn by `sample_batch(rng, batch_size)`;
    return a summary."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    start, losses = time.perf_counter(), []
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        ids, mask, labels = encode_batch(tokenizer, sample_batch(rng, batch_size))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": round(time.perf_counter() - start, 1)}
