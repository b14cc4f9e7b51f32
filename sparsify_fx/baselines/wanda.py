"""``method="wanda"``: pruning by weights and activations (Sun et al., 2023), one-shot.

Score of weight ``W_ij`` (output ``i``, input ``j``): ``|W_ij| * ||X_j||_2``, the input
feature's L2 norm over every calibration token. Weights compete only within their output
row (the comparison group): each row keeps its highest scores, so every row of a layer
is pruned to the same fraction (rows differ by at most one weight when the count does
not divide). N:M (``"2:4"``, ``"4:8"``): the ``n`` best scores of every ``m`` consecutive
inputs. No weight update.

Use: ``gm = transform(model, method="wanda", target_sparsity=0.5, example_inputs=...)``
(masks all-ones until calibrated) then ``sparsify_fx.calibrate(gm, batches)``. Option
``sequential`` (default True, as the reference code): layers calibrate on the outputs of
the already pruned layers before them.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from sparsify_fx.baselines._common import OptionMask
from sparsify_fx.baselines.calibration import LayerTarget, register_pruner, split_counts
from sparsify_fx.methods import MethodSpec, register_method


class WandaMask(OptionMask):
    method = "wanda"


def wanda_scores(weight: Tensor, sq_norms: Tensor) -> Tensor:
    """``|W| * ||X_j||_2`` for ``weight`` ``(out, in)`` and ``sq_norms`` ``(in,)``
    (``sum_t x_tj^2``); same shape and dtype as ``weight``. Read-only."""
    return weight.abs() * sq_norms.clamp_min(0).sqrt().to(weight.dtype).unsqueeze(0)


def row_keep(scores: Tensor, prune: int) -> Tensor:
    """Bool keep mask of ``scores`` ``(out, in)``: ``prune`` lowest-scored weights zeroed in
    all, split evenly over the rows (each row its own lowest ones; ties: lower index kept)."""
    rows, cols = scores.shape
    per_row = torch.tensor(split_counts(int(prune), [cols] * rows)).unsqueeze(1)
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(cols).expand(rows, cols).contiguous())
    return ranks >= per_row


class WandaPruner:
    """Wanda's cut: per-row (or N:M) top scores of ``|W| * ||X||``; weights unchanged."""

    statistic = "norms"

    def prune(self, weight: Tensor, stat: Tensor, tokens: int, target: LayerTarget,
              options: Mapping[str, Any]) -> tuple[Tensor | None, Tensor]:
        scores = wanda_scores(weight, stat)
        if target.pattern is not None:
            return None, target.pattern.pattern_keep(scores, input_dim=1)
        return None, row_keep(scores, target.prune)


register_method(MethodSpec(
    "wanda", WandaMask, {"sequential": True}, granularities=("element", "n:m"),
    budgets=("sparsity",),
    doc="Wanda: |W| x ||X||_2 per output row, one-shot from calibration (calibrate).",
))
register_pruner("wanda", WandaPruner())

__all__ = ["WandaMask", "WandaPruner", "wanda_scores", "row_keep"]
