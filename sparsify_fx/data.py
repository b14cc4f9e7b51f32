"""Bundled datasets: scikit-learn's 8x8 digits (no download) and MNIST from a directory.

Both return float32 image tensors ``(N, 1, H, W)`` standardised with training
statistics, and int64 labels, split reproducibly by ``seed``.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from sparsify_fx.errors import InputError


@dataclass
class Splits:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset

    def loader(self, part: str, batch_size: int = 256) -> DataLoader:
        return DataLoader(getattr(self, part), batch_size=batch_size, shuffle=False)


def _split(x: np.ndarray, y: np.ndarray, sizes: tuple[int, int, int], seed: int) -> Splits:
    order = np.random.default_rng(seed).permutation(len(x))
    a, b, c = sizes
    idx = order[:a], order[a:a + b], order[a + b:a + b + c]
    mean, std = x[idx[0]].mean(), x[idx[0]].std() + 1e-8
    parts = [TensorDataset(torch.from_numpy(((x[i] - mean) / std).astype(np.float32)),
                           torch.from_numpy(y[i].astype(np.int64))) for i in idx]
    return Splits(*parts)


def digits(seed: int = 0) -> Splits:
    """sklearn digits (1,797 images, 1x8x8): 1,257 train / 180 val / 360 test."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = data.images.reshape(-1, 1, 8, 8).astype(np.float32)
    return _split(x, data.target, (1257, 180, 360), seed)


def mnist(data_dir: str, seed: int = 0, sizes: tuple[int, int, int] = (8000, 1000, 1000)) -> Splits:
    """The MNIST test set (10,000 IDX images, 1x28x28) in ``data_dir``, split three ways."""
    img = os.path.join(data_dir, "t10k-images-idx3-ubyte.gz")
    lab = os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz")
    for f in (img, lab):
        if not os.path.isfile(f):
            raise InputError(f"MNIST file {f} not found; pass the folder holding "
                             "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    with gzip.open(img, "rb") as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32)
    with gzip.open(lab, "rb") as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8)
    return _split(x / 255.0, y, sizes, seed)
