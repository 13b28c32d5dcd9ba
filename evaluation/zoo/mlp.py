"""M2N2's image classifier: a one-hidden-layer MLP held as one flat float32 vector.

The layout is the reference implementation's (SakanaAI/natural_niches, model.py): W1 as
[inputs, hidden] row-major, b1, W2 as [hidden, outputs], b2. Keeping it matters because
M2N2's split point cuts the *flattened* vector, so the layout decides which weights a
crossover takes from which parent.

Search methods score thousands of candidates, so `Classifier` evaluates a stack of K
parameter vectors in one batched matmul (torch.baddbmm) over data held as tensors: no
per-example Python loop, and a CMA-ES generation or a brute-force sweep costs one call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MLPShape:
    """inputs -> hidden (ReLU) -> outputs."""

    inputs: int
    hidden: int
    outputs: int

    @property
    def size(self) -> int:
        """Number of parameters: (1 + inputs) * hidden + (1 + hidden) * outputs."""
        return (1 + self.inputs) * self.hidden + (1 + self.hidden) * self.outputs

    def logits(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(K, N, outputs) logits of K parameter vectors (K, size) on inputs x (N, inputs)."""
        if params.dim() == 1:
            params = params[None]
        k, i, h, o = params.shape[0], self.inputs, self.hidden, self.outputs
        ends = np.cumsum([i * h, h, h * o, o])
        w1 = params[:, : ends[0]].reshape(k, i, h)
        b1 = params[:, ends[0]: ends[1]]
        w2 = params[:, ends[1]: ends[2]].reshape(k, h, o)
        b2 = params[:, ends[2]: ends[3]]
        hidden = torch.baddbmm(b1[:, None, :], x.expand(k, -1, -1), w1).relu_()
        return torch.baddbmm(b2[:, None, :], hidden, w2)


class Classifier:
    """Per-example correctness of MLP parameter vectors on one fixed labelled set."""

    def __init__(self, shape: MLPShape, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32):
        self.shape = shape
        self.x = x.to(torch.float32).contiguous()
        self.y = y.to(torch.int64)
        self.batch_size = batch_size
        """Candidates per matmul: bounds the (K, N, hidden) activations in memory."""

    def scores(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """(K, N) float32 0/1: is example n classified right by candidate k. A single
        vector (size,) gives (1, N)."""
        params = torch.as_tensor(params, dtype=torch.float32)
        params = params[None] if params.dim() == 1 else params
        out = []
        with torch.no_grad():
            for start in range(0, len(params), self.batch_size):
                logits = self.shape.logits(params[start: start + self.batch_size], self.x)
                out.append((logits.argmax(dim=2) == self.y).to(torch.float32))
        return torch.cat(out).numpy()

    def accuracy(self, params: np.ndarray | torch.Tensor) -> np.ndarray:
        """(K,) accuracy of each candidate."""
        return self.scores(params).mean(axis=1)


def random_params(shape: MLPShape, generator: torch.Generator, std: float = 0.01) -> np.ndarray:
    """N(0, std^2) parameters, the reference's initialisation for evolution from scratch."""
    return (torch.randn(shape.size, generator=generator) * std).numpy()


def train_adam(shape: MLPShape, params: np.ndarray, x: torch.Tensor, y: torch.Tensor,
               lr: float = 0.003, steps: int = 10) -> np.ndarray:
    """Full-batch Adam on the cross-entropy, as the reference makes its "pre-trained"
    seeds (optax.adam(0.003), 10 steps): deliberately weak specialists, so that merging
    them has something to gain."""
    theta = torch.tensor(params, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(shape.logits(theta, x.to(torch.float32))[0], y)
        loss.backward()
        optimizer.step()
    return theta.detach().numpy().copy()
