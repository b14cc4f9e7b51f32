"""Small reference networks used by the demo, tests and benchmarks."""
from __future__ import annotations

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2 + pooling + 2 Linear for 1x8x8 inputs -> 10 logits."""

    def __init__(self, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class Conv2(nn.Module):
    """Conv-2 style for ``1 x side x side`` inputs: two 3x3 convs (16, 32 ch), each ReLU +
    2x2 max-pool, FC 256, FC 10. Narrower than Frankle et al.'s Conv-2 (64, 64, 256, 256)
    so a full method sweep fits on 2 CPU cores."""

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

