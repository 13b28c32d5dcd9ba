"""The M2N2 image-classifier data set: scikit-learn's bundled 8x8 digits (offline).

Split without shuffling (first 80% train, last 20% test) so that every run and every
machine sees the same examples; features are scaled to [0, 1] (pixel values are 0..16).
"""
from __future__ import annotations

import torch


def load_digits_split(train_fraction: float = 0.8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): float32 features (N, 64), int64 labels (0..9)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    cut = int(len(x) * train_fraction)
    return x[:cut], y[:cut], x[cut:], y[cut:]
