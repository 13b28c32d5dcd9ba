"""Fashion-MNIST from the Debian/Ubuntu package `dataset-fashion-mnist` (offline IDX files).

M2N2's second, harder image data set. Searching weights by evolution costs one forward
pass over the training set per candidate, so the study uses a subsample and smaller
images (2x2 average pooling: 28x28 -> 14x14, which keeps the garment shapes), see
scripts/reproduce_m2n2_digits.py for the sizes chosen. Features are scaled to [0, 1].
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from merging.errors import EvomergeError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (big-endian header: zero, zero, type code, rank; then the dimensions)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise EvomergeError(f"{path} is not an IDX file of unsigned bytes")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def load_fashion_mnist(train_size: int | None = None, test_size: int | None = None, pool: int = 1,
                       directory: Path = FASHION_DIR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): float32 features (N, (28 // pool)^2), int64 labels.
    The first `train_size` / `test_size` images of each split (the files are already shuffled),
    each averaged over pool x pool blocks."""
    paths = {split: [directory / name for name in names] for split, names in FILES.items()}
    missing = [str(p) for ps in paths.values() for p in ps if not p.exists()]
    if missing:
        raise EvomergeError(f"Fashion-MNIST not found ({missing[0]} is missing): install the Debian/Ubuntu "
                            f"package dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")
    out = []
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = (read_idx(p)[:size] for p in paths[split])
        x = torch.tensor(images, dtype=torch.float32) / 255.0
        if pool > 1:
            x = torch.nn.functional.avg_pool2d(x[:, None], pool)[:, 0]
        out += [x.reshape(len(x), -1), torch.tensor(labels, dtype=torch.int64)]
    return out[0], out[1], out[2], out[3]
