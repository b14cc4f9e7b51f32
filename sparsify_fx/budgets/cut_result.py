"""The result every exact cut returns, and the top-k selection the cuts share.

``keep_top`` picks entries by score under a budget of units; ``cut_result``
reads what the (just frozen) masks keep. Both only read their inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparsify_fx.mask_index import MaskEntry


@dataclass
class CutResult:
    """Outcome of an exact cut: weights kept, total, and bits changed vs the learned rule."""

    kept: int
    total: int
    changed_bits: int
    per_layer: dict[str, float]
    #: a verified latency cut's rounds (aimed, estimated, measured fractions), else empty
    latency: list = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total


def keep_top(scores: Tensor, units: Tensor, budget: float) -> Tensor:
    """Keep highest scores first while the sum of ``units`` stays within ``budget``.

    With unit costs this keeps exactly ``round(budget)`` entries. Ties are broken
    by position (stable sort), so the cut is deterministic.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    cum = torch.cumsum(units[order].double(), 0)
    n_keep = int(torch.searchsorted(cum, torch.tensor(budget + 1e-6, dtype=torch.float64),
                                    right=True))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def cut_result(entries: list[MaskEntry], changed_bits: int) -> CutResult:
    """Kept/total weights and per-layer sparsity of the (just frozen) masks."""
    kept = sum(e.mask.kept_weights() for e in entries)
    total = sum(e.mask.numel() for e in entries)
    per = {e.name: 1.0 - e.mask.kept_weights() / e.mask.numel() for e in entries}
    return CutResult(kept, total, changed_bits, per)
