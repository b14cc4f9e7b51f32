"""Model factories for ``sparsify-fx prune`` (``examples.models:<factory>``, run from the repo root).

A factory is any callable that builds an ``nn.Module`` with no arguments.
"""
from __future__ import annotations

from torch import Tensor, nn


class Conv2(nn.Module):
    """Conv-2 style for 1x28x28 inputs: two 3x3 convs (16, 32 ch), each ReLU + 2x2 max-pool,
    FC 256, FC 10 (the narrow Conv-2 of benchmarks/compare.py)."""

    def __init__(self, side: int = 28) -> None:
        super().__init__()
        pooled = side // 4
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * pooled * pooled, 256),
                                        nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def conv2_mnist() -> nn.Module:
    """Conv-2 for MNIST (1x28x28)."""
    return Conv2(28)


def conv2_digits() -> nn.Module:
    """Conv-2 for scikit-learn digits (1x8x8)."""
    return Conv2(8)
