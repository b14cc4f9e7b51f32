"""A unit whose activation is not 0 at 0 (xIELU-style ``f(0) != 0``, a recurrent
mixer's output) reaches its consumer not exactly zero when pruned. The coupling pass
gates the consumer's input columns with the unit's own score (``kind`` "columns"), so
the unit is still cut and the shrink is exact (issue 34).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import sparsify_fx as sf
from sparsify_fx.mask_index import masks
from sparsify_fx.passes.channels.couple import group_masks
from tests.helpers import assert_shrunk_parity, l1_cut_and_shrink


class ShiftedActMLP(nn.Module):
    """``x + down(act(up(norm(x))))`` with ``act = gelu + sigmoid / 2``: ``act(0) = 0.25``."""

    def __init__(self, d: int = 32, inner: int = 64) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, inner), nn.Linear(inner, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x))
        return self.head(x + self.down(F.gelu(h) + 0.5 * torch.sigmoid(h)))


class TwoStageMLP(nn.Module):
    """``up -> act(0) != 0 -> mid -> act(0) != 0 -> down``: ``mid`` has gated input
    columns *and* prunable rows, which one mask per weight cannot hold; its inputs
    stay whole and its own rows are still cut."""

    def __init__(self, d: int = 32, inner: int = 48) -> None:
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(d, inner), nn.Linear(inner, inner), nn.Linear(inner, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.mid(torch.sigmoid(self.up(x))))
        return self.head(x + self.down(h))


def _cut(model: nn.Module) -> tuple[nn.Module, nn.Module, list[str]]:
    return l1_cut_and_shrink(model, (torch.randn(2, 7, 32),), ({0: Dim.AUTO, 1: Dim.AUTO},))


def test_unit_not_zero_at_zero_is_cut_through_gated_columns() -> None:
    torch.manual_seed(0)
    model = ShiftedActMLP().eval()
    gm, small, warned = _cut(model)
    assert not any("not exactly zero" in w for w in warned), warned
    columns = [e for e in masks(gm) if e.kind == "columns"]
    assert [e.name for e in columns] == ["down.weight"]
    assert columns[0].mask.auxiliary
    [group] = group_masks(gm).values()
    keep = group.fold_factor().reshape(-1) != 0
    assert 0 < int(keep.sum()) < 64
    # the gate zeroes exactly the pruned units' columns of down (counted from the tensor)
    with torch.no_grad():
        gated = columns[0].mask.fold_factor().reshape(-1)
    assert torch.equal(gated != 0, keep)
    inner = small.up.weight.shape[0]
    assert inner == int(keep.sum()) and small.down.weight.shape == (32, inner)
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))
    # the caller's model is untouched
    assert model.up.weight.shape == (64, 32)


def test_fold_keeps_gated_columns_and_matches_hard_masks() -> None:
    torch.manual_seed(1)
    gm, _, _ = _cut(ShiftedActMLP().eval())
    x = torch.randn(2, 5, 32)
    from sparsify_fx.mask_index import hard_masks
    with torch.no_grad(), hard_masks(gm):
        ref = gm(x)
    folded = sf.fold(gm)
    with torch.no_grad():
        got = folded(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_weight_with_prunable_rows_keeps_not_zero_inputs_whole() -> None:
    torch.manual_seed(2)
    gm, small, warned = _cut(TwoStageMLP().eval())
    assert any("not exactly zero" in w for w in warned), warned  # up's units, named
    assert [e.name for e in masks(gm) if e.kind == "columns"] == ["down.weight"]
    assert small.up.weight.shape[0] == 48  # kept whole: mid's rows are cut instead
    assert small.mid.weight.shape[0] < 48 and small.down.weight.shape[1] == small.mid.weight.shape[0]
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))
