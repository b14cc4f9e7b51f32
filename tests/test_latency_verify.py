"""Latency cuts that hold when measured (issue 15): channel rounding (every group keeps a
multiple of ``round_to`` channels) and the measured correction loop (``verified_cut``)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsify_fx as sf
from sparsify_fx.budgets.exact_cut import macs_fraction, weight_costs
from sparsify_fx.budgets.cost_model import channel_latency
from sparsify_fx.errors import BudgetError
from sparsify_fx.latency.probe import median_ratio
from sparsify_fx.latency.table import grid
from sparsify_fx.latency.verify import verified_cut
from sparsify_fx.models import DigitsCNN
from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
from tests.test_cost_model import X, macs_timer, model_timer

XD = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def kept_counts(gm: nn.Module) -> list[tuple[int, int]]:
    return [(int(m.hard_mask().sum()), m.hard_mask().numel()) for m in group_masks(gm).values()]


def test_grid_rounds_to_the_cut_widths() -> None:
    assert grid(64, True, 8) == [16, 32, 48, 64]
    assert grid(24, True, 8) == [8, 16, 24]
    assert grid(12, True, 8) == [8, 12]
    assert grid(24, False, 8) == [24]
    assert grid(64, True) == grid(64, True, 1)


@pytest.mark.parametrize("budget", [dict(target_sparsity=0.6), dict(target_macs=0.45)])
def test_round_to_keeps_whole_blocks(budget) -> None:
    torch.manual_seed(0)
    gm = sf.transform(DigitsCNN(width=24, hidden=40).eval(), method="fixed",
                      granularity="channel")
    scores = channel_l1_scores(gm)
    kw = dict(budget, costs=weight_costs(gm, XD)) if "target_macs" in budget else budget
    plain, rounded = copy.deepcopy(gm), copy.deepcopy(gm)
    sf.apply_budget(plain, scores=scores, **kw)
    sf.apply_budget(rounded, scores=scores, round_to=8, **kw)
    assert any(k % 8 for k, n in kept_counts(plain) if k < n)  # unrounded: ragged widths
    for k, n in kept_counts(rounded):
        assert k == n or k % 8 == 0, (k, n)
    # each group keeps its best-scored channels (a prefix of its own ranking)
    for key, m in group_masks(rounded).items():
        keep = m.hard_mask().reshape(-1)
        s = scores[key].reshape(-1)
        if 0 < int(keep.sum()) < keep.numel():
            assert s[keep].min() >= s[~keep].max()
    if "target_sparsity" in budget:
        assert sf.sparsity(rounded) >= 0.6 - 1e-9
    else:
        assert macs_fraction(rounded, kw["costs"]) <= 0.45 + 1e-9
    with pytest.raises(sf.SparsifyError, match="round_to"):
        sf.apply_budget(copy.deepcopy(gm), target_sparsity=0.5, round_to=0)


def test_round_to_refused_for_element_masks() -> None:
    gm = sf.transform(DigitsCNN().eval(), method="fixed")
    with pytest.raises(sf.SparsifyError, match="round_to"):
        sf.apply_budget(gm, target_sparsity=0.5, round_to=8)


def test_verified_cut_converges_and_keeps_the_closest_round() -> None:
    kept: list[float] = []
    concave = lambda a: a ** 0.7  # noqa: E731 - the "real" latency of a cut aimed at a
    result, checks = verified_cut(0.5, lambda a: kept.append(a) or a, lambda: kept[-1],
                                  lambda: concave(kept[-1]), tol=0.02, max_rounds=8)
    assert checks[0].aimed == 0.5 and checks[0].measured == pytest.approx(0.5 ** 0.7)
    assert abs(checks[-1].measured / 0.5 - 1) <= 0.02 and result == checks[-1].aimed
    assert len(checks) > 1
    # never within tolerance: the masks end at the round measured closest to the target
    kept.clear()
    noisy = iter([0.9, 0.62, 0.7, 0.8])
    result, checks = verified_cut(0.5, lambda a: kept.append(a) or a, lambda: kept[-1],
                                  lambda: next(noisy), tol=0.01, max_rounds=4)
    best = min(checks, key=lambda c: abs(c.measured - 0.5))
    assert best.measured == 0.62 and kept[-1] == best.aimed and result == best.aimed
    # an infeasible first cut is the caller's error; a later one ends the loop
    def infeasible(a: float) -> float:
        raise BudgetError("floor")
    with pytest.raises(BudgetError):
        verified_cut(0.5, infeasible, lambda: 0.0, lambda: 0.0)


def test_median_ratio_pairs_rounds() -> None:
    dense = [10.0, 20.0, 10.0, 30.0, 10.0]  # load bursts hit both sessions of a round
    pruned = [5.0, 10.0, 5.0, 15.0, 5.0]
    assert median_ratio(pruned, dense) == 0.5


def test_apply_budget_corrects_a_table_that_mispredicts(tmp_path) -> None:
    """The 'real' model runs at (MACs fraction)^0.7 of dense, which no linear calibration
    through dense and one probe predicts; the verified cut measures and corrects."""
    from tests.test_channel_budget import TinyRes
    torch.manual_seed(0)
    gm = sf.transform(TinyRes().eval(), method="cs", granularity="channel")
    with torch.no_grad():
        for m in group_masks(gm).values():
            m.scores.copy_(torch.randn(m.score_shape))

    def concave_timer(models: list[nn.Module], inputs: tuple) -> list[float]:
        dense, pruned = model_timer(models, inputs)
        return [dense, dense * (pruned / dense) ** 0.7]

    def build(verify: bool):
        return channel_latency(gm, X, cache_dir=tmp_path, timer=macs_timer, round_to=1,
                               model_timer=concave_timer, progress=False, verify=verify)

    table_only = copy.deepcopy(gm)
    sf.apply_budget(table_only, target_latency=0.4, cost=build(False))
    lat = build(True)
    result = sf.apply_budget(gm, target_latency=0.4, cost=lat)
    assert result.latency and lat.meta["verified"] == [c.to_dict() for c in result.latency]
    first, last = result.latency[0], min(result.latency, key=lambda c: abs(c.measured - 0.4))
    assert abs(first.measured / 0.4 - 1) > 0.05  # the table alone misses by more than 5 %
    measured_now = lat.measure(gm)
    assert measured_now == pytest.approx(last.measured)  # the masks are at the kept round
    assert abs(measured_now / 0.4 - 1) < abs(first.measured / 0.4 - 1)
    assert kept_counts(table_only) != kept_counts(gm)


def _rank_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from sparsify_fx.latency.verify import LatencyCheck, on_rank_zero
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:  # each rank "measures" something else; every rank must end with rank 0's rounds
        got = on_rank_zero(lambda: [LatencyCheck(0.5, 0.5, 0.4 + 0.1 * rank)])
        with open(f"{out}.{rank}", "w") as f:
            f.write(repr(got[0].measured))
    finally:
        dist.destroy_process_group()


def test_on_rank_zero_shares_rank_zeros_measurement(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(port, str(tmp_path / "m")), nprocs=2, join=True)
    assert [float((tmp_path / f"m.{r}").read_text()) for r in (0, 1)] == [0.4, 0.4]


def test_next_aim_interpolates_between_rounds_on_both_sides() -> None:
    """Rounds measured below and above the target: the next aim lies between their aims
    (a steep measured curve would make the multiplicative step oscillate)."""
    from sparsify_fx.latency.verify import LatencyCheck, next_aim
    below, above = LatencyCheck(0.5, 0.5, 0.414), LatencyCheck(0.603, 0.603, 0.562)
    aim = next_aim([below, above], 0.5)
    assert aim == pytest.approx(0.5 + (0.5 - 0.414) / (0.562 - 0.414) * 0.103)
    assert 0.5 < aim < 0.603
    # one side only: the multiplicative step from the last round
    assert next_aim([below], 0.5) == pytest.approx(0.5 * 0.5 / 0.414)
    assert next_aim([LatencyCheck(0.9, 0.9, 0.4)], 0.5) == 1.0  # never above the dense model
