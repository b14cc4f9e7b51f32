"""Exact budgets (issue 3, acceptance 4): global and per-layer targets to one weight,
MACs budgets met."""
from __future__ import annotations

import pytest
import torch

import sparsify_fx as sf
from sparsify_fx.budgets.exact_cut import apply_budget, macs_fraction, weight_costs
from sparsify_fx.models import DigitsCNN
from tests.helpers import randomize_scores


def scored(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    gm = sf.transform(DigitsCNN(width=6, hidden=20), **kw)
    randomize_scores(gm, 1)
    return gm


def zeros_counted(gm: torch.nn.Module) -> tuple[int, int]:
    """Zeros and total over masked weights, counted from the folded tensors."""
    sf.set_hard(gm)
    params = dict(sf.fold(gm).named_parameters())
    names = [e.name for e in sf.masks(gm)]
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros, sum(params[n].numel() for n in names)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 0.983])
def test_global_target_exact_to_one_weight(target: float) -> None:
    gm = scored()
    cut = apply_budget(gm, target)
    zeros, total = zeros_counted(gm)
    assert abs(zeros - target * total) <= 1.0
    assert cut.kept == total - zeros
    # the kept weights are exactly the highest scores
    scores = torch.cat([e.mask.scores.detach().reshape(-1) for e in sf.masks(gm)])
    keep = torch.cat([e.mask.hard_mask().reshape(-1) for e in sf.masks(gm)])
    assert float(scores[keep].min()) >= float(scores[~keep].max())


def test_per_layer_and_dict_targets() -> None:
    gm = scored()
    apply_budget(gm, 0.8, per_layer=True)
    for e in sf.masks(gm):
        zeros = e.mask.numel() - e.mask.kept_weights()
        assert abs(zeros - 0.8 * e.mask.numel()) <= 1.0, e.name
    gm = scored()
    targets = {"features.0.weight": 0.25, "classifier.1.weight": 0.97}
    apply_budget(gm, targets)
    per = sf.sparsity(gm, per_layer=True)
    for name, t in targets.items():
        n = next(e.mask.numel() for e in sf.masks(gm) if e.name == name)
        assert abs(per[name] * n - t * n) <= 1.0


def test_changed_bits_counts_flips_against_s_positive() -> None:
    gm = scored()
    before = torch.cat([(e.mask.scores > 0).reshape(-1) for e in sf.masks(gm)])
    cut = apply_budget(gm, 0.9)
    after = torch.cat([e.mask.hard_mask().reshape(-1) for e in sf.masks(gm)])
    assert cut.changed_bits == int((before != after).sum()) > 0


def test_macs_budget_met() -> None:
    gm = scored()
    x = torch.randn(4, 1, 8, 8)
    costs = weight_costs(gm, x)
    # conv weights take part in 8*8 MACs each, the Linears in one
    assert costs["features.0.weight"] == 64 and costs["features.3.weight"] == 64
    assert costs["classifier.1.weight"] == 1
    apply_budget(gm, target_macs=0.3, costs=costs)
    frac = macs_fraction(gm, costs)
    assert 0.3 - 64.0 / sum(e.mask.numel() * costs[e.name] for e in sf.masks(gm)) <= frac <= 0.3


def test_scores_override_ranks_by_magnitude() -> None:
    gm = scored()
    apply_budget(gm, 0.5, per_layer=True, scores={
        e.name: e.weight.detach() for e in sf.masks(gm)})
    for e in sf.masks(gm):
        assert abs(e.mask.numel() - e.mask.kept_weights() - 0.5 * e.mask.numel()) <= 1


def test_budget_errors() -> None:
    gm = scored()
    with pytest.raises(sf.ConfigError, match="exactly one"):
        apply_budget(gm)
    with pytest.raises(sf.ConfigError, match="weight_costs"):
        apply_budget(gm, target_macs=0.5)
    with pytest.raises(sf.ConfigError, match="example_inputs"):
        sf.CSScheduler(sf.transform(DigitsCNN(), target_macs=0.5), epochs=2)


def test_weight_costs_agree_with_report_inside_attention() -> None:
    """Every masked weight's MACs cost times its size equals what report counts for it,
    including nn.MultiheadAttention.out_proj, whose module the forward never calls."""
    import math

    from sparsify_fx.budgets.exact_cut import weight_costs
    from tests.test_heads import small_vit

    gm = sf.transform(small_vit().eval())
    x = torch.randn(2, 3, 32, 32)
    costs = weight_costs(gm, x)
    counted = {r.name: r.dense_macs for r in sf.report(gm, x).rows}
    for e in sf.masks(gm):
        assert costs[e.name] * math.prod(e.mask.weight_shape) * 2 == counted[e.name], e.name
