"""Run a causal LM over a task's examples and return per-example scores.

Generation is batched with left padding (so every prompt ends where generation starts),
prompts of similar lengths together (less padding), starts with the BOS token where the
tokenizer adds one by default (a task's `bos`), and is greedy, and a batch stops as soon
as every sequence has produced a stop string or EOS: merged candidates are scored
thousands of times, so wasted work matters.
"""
from __future__ import annotations

from typing import Sequence

import torch

from evaluation.tasks import Task, TaskResult, cut_at_stop
from merging.errors import EvomergeError


class _StopWhenAllDone:
    """Stopping criterion: every sequence's new text contains a stop string (or EOS)."""

    def __init__(self, tokenizer, prompt_length: int, stop: Sequence[str]):
        self.tokenizer, self.prompt_length, self.stop = tokenizer, prompt_length, list(stop)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_length:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        done = [any(s in text for s in self.stop) or (eos is not None and bool((row == eos).any()))
                for text, row in zip(texts, new)]
        return torch.tensor(done, device=input_ids.device)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS token by default (what HF
    pipelines and vLLM send the model): Llama and Gemma tokenizers do, GPT-2's does not."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos] != tokenizer(
        "a", add_special_tokens=False)["input_ids"][:1]


def wants_bos(task: Task, tokenizer) -> bool:
    """A task's `bos` setting resolved for `tokenizer` (None: the tokenizer's default)."""
    if task.bos is None:
        return adds_bos(tokenizer)
    if task.bos and tokenizer.bos_token_id is None:
        raise EvomergeError(f"task {task.name!r} asks for a BOS token (bos: true) and the tokenizer has none")
    return task.bos


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             stop: Sequence[str] = (), batch_size: int = 32, bos: bool = False,
             stats: dict | None = None) -> list[str]:
    """Greedy continuations of `prompts` (decoded, cut at the first stop string); with
    `bos`, each prompt starts with the tokenizer's BOS token.

    With `stats`, adds to stats["new_tokens"] the tokens generated (padding of finished
    rows excluded) for throughput measurements."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prefix = [tokenizer.bos_token_id] if bos else []
    encoded = [prefix + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # batches of prompts of similar lengths: the prefill, most of the work, pays for padding
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id, device)
        length = input_ids.shape[1]
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_StopWhenAllDone(tokenizer, length, stop)]),
        )
        if stats is not None:
            produced = (generated[:, length:] != tokenizer.pad_token_id).sum().item()
            stats["new_tokens"] = stats.get("new_tokens", 0) + produced
        texts = tokenizer.batch_decode(generated[:, length:], skip_special_tokens=True)
        for index, text in zip(batch, texts):
            outputs[index] = cut_at_stop(text, stop)
    return outputs


def _left_padded(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch and its attention mask: every prompt ends
    where generation starts."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, attention


def _right_padded(ids: list[list[int]], pad: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one right-padded batch and its attention mask. Right padding keeps
    every row's real tokens at positions 0..n-1, as when scored alone."""
    width = max(len(x) for x in ids)
    pad = pad if pad is not None else 0
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
    return input_ids, attention


@torch.no_grad()
def continuation_logprobs(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str],
                          *, batch_size: int = 32, task: str = "multiple_choice") -> list[float]:
    """Sum of log p(continuation | context) per pair (right padding, one forward pass).

    An empty context gets the tokenizer's BOS token to condition on (the first
    continuation token needs a position before it); without a BOS token it is an error
    naming `task`."""
    device = next(model.parameters()).device
    results: list[float] = []
    for start in range(0, len(contexts), batch_size):
        pairs = list(zip(contexts[start:start + batch_size], continuations[start:start + batch_size]))
        ids, spans = [], []
        for index, (context, continuation) in enumerate(pairs, start=start):
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            if not context_ids:
                if tokenizer.bos_token_id is None:
                    raise EvomergeError(f"task {task!r}: the context of choice pair {index} is empty and the "
                                        "tokenizer has no BOS token to condition the choice on")
                context_ids = [tokenizer.bos_token_id]
            continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids.append(context_ids + continuation_ids)
            spans.append((len(context_ids), len(context_ids) + len(continuation_ids)))
        input_ids, attention = _right_padded(ids, tokenizer.pad_token_id, device)
        logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits.float(), -1)
        for row, (begin, end) in enumerate(spans):
            positions = torch.arange(begin, end, device=device)
            targets = input_ids[row, begin:end]
            results.append(logprobs[row, positions - 1, targets].sum().item())
    return results


@torch.no_grad()
def mean_token_losses(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                      task: str = "perplexity") -> list[float]:
    """Mean next-token loss of each text (what `model(ids, labels=ids).loss` gives for
    it alone), batched with right padding; padded positions count for nothing."""
    device = next(model.parameters()).device
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    for index, row in enumerate(ids):
        if len(row) < 2:  # no token has a predecessor: the mean over zero losses is NaN
            raise EvomergeError(f"task {task!r}: example {index} has {len(row)} token(s); perplexity needs "
                                "at least 2")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
    losses: list[float] = [0.0] * len(ids)
    for start in range(0, len(ids), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention = _right_padded([ids[i] for i in batch], tokenizer.pad_token_id, device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:],
                                                         reduction="none")
        mask = attention[:, 1:].float()
        for index, loss in zip(batch, ((token_losses * mask).sum(1) / mask.sum(1)).tolist()):
            losses[index] = loss
    return losses


@torch.no_grad()  # fitness only reads the model: no autograd graph, no activations kept
def evaluate(model, tokenizer, task: Task, *, limit: int | None = None, batch_size: int = 32,
             examples: list[dict] | None = None, stats: dict | None = None) -> TaskResult:
    """Score `model` on `task`; one score per example, in data order. `stats` collects
    generation counts (see `generate`)."""
    if not isinstance(task, Task):  # an lm-eval task (evaluation.lm_eval_backend) runs itself
        return task.run(model, tokenizer, limit=limit, batch_size=batch_size)
    examples = examples if examples is not None else task.load(limit)
    if task.kind == "generate":
        texts = generate(model, tokenizer, [task.prompt(e) for e in examples],
                         max_new_tokens=task.max_new_tokens, stop=task.stop, batch_size=batch_size,
                         bos=wants_bos(task, tokenizer), stats=stats)
        scores = [task.score_generation(e, t) for e, t in zip(examples, texts)]
    elif task.kind == "multiple_choice":
        contexts, continuations, owners = [], [], []
        for index, example in enumerate(examples):
            for choice in example[task.choices_field]:
                contexts.append(task.prompt(example))
                continuations.append(str(choice))
                owners.append(index)
        logprobs = continuation_logprobs(model, tokenizer, contexts, continuations, batch_size=batch_size,
                                         task=task.name)
        best: dict[int, tuple[float, int]] = {}
        choice_index = [0] * len(examples)
        for owner, logprob in zip(owners, logprobs):
            position = choice_index[owner]
            choice_index[owner] += 1
            if owner not in best or logprob > best[owner][0]:
                best[owner] = (logprob, position)
        scores = [float(best[i][1] == int(e[task.answer_field])) for i, e in enumerate(examples)]
    elif task.kind == "perplexity":
        losses = mean_token_losses(model, tokenizer, [task.prompt(e) for e in examples], batch_size=batch_size,
                                   task=task.name)
        scores = [-loss for loss in losses]
    elif task.kind == "classify":
        scores = classify(model, examples, task.answer_field, batch_size=batch_size)
    else:
        raise EvomergeError(f"task {task.name!r}: unknown kind {task.kind!r}")
    return TaskResult(task.name, scores)


@torch.no_grad()
def classify(model, examples: Sequence[dict], label_field: str, *, batch_size: int = 256) -> list[float]:
    """1.0 where the classifier's argmax is the label. `model` maps a float batch of
    feature vectors to logits (a plain `nn.Module`, or one whose output has `.logits`)."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        features = torch.stack([torch.as_tensor(e["features"], dtype=torch.float32) for e in batch]).to(device)
        output = model(features)
        logits = getattr(output, "logits", output)
        labels = torch.tensor([int(e[label_field]) for e in batch], device=device)
        scores.extend((logits.argmax(-1) == labels).float().tolist())
    return scores
