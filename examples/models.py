"""Model factories for ``sparsify-fx prune`` (``examples.models:<factory>``, run from the repo root).

A factory is any callable that builds an ``nn.Module`` with no arguments.
"""
from __future__ import annotations

from torch import nn

from sparsify_fx.models import Conv2


def conv2_mnist() -> nn.Module:
    """Conv-2 for MNIST (1x28x28)."""
    return Conv2(28)


def conv2_digits() -> nn.Module:
    """Conv-2 for scikit-learn digits (1x8x8)."""
    return Conv2(8)
