"""One cost model (issue 12 / issue 15): MACs and latency are the same ChannelCost bookkeeping,
and the cut, the CS controller and report read one cost object."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparsify_fx as sf
from sparsify_fx.budgets.exact_cut import weight_costs
from sparsify_fx.config import config_of
from sparsify_fx.budgets.cost_model import ChannelCost, channel_latency, channel_macs, kept_widths
from sparsify_fx.latency.table import OpSignature
from sparsify_fx.passes.channels.couple import group_masks
from tests.test_channel_budget import TinyRes

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
MS_PER_MAC = 1e-6


def macs_timer(sig: OpSignature, kept_out: int, kept_in: int) -> float:
    """A fake onnxruntime: milliseconds exactly proportional to the op's MACs for the batch."""
    if sig.kind == "linear":
        return MS_PER_MAC * sig.batch * sig.spatial[0] * kept_out * kept_in
    out_sp = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in
              zip(sig.spatial, sig.padding, sig.dilation, sig.kernel, sig.stride)]
    groups = kept_out // (sig.out_ch // sig.groups) if sig.groups > 1 else 1
    return (MS_PER_MAC * sig.batch * math.prod(out_sp) * math.prod(sig.kernel)
            * kept_out * kept_in / groups)


REMAINDER = 0.02


def model_timer(models: list[nn.Module], inputs: tuple) -> list[float]:
    """Each model: its Conv/Linear MACs (FlopCounterMode / 2) at MS_PER_MAC, plus REMAINDER."""
    out = []
    for plain in models:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            plain(*inputs)
        out.append(MS_PER_MAC * counter.get_total_flops() / 2 + REMAINDER)
    return out


@pytest.fixture
def gm() -> nn.Module:
    torch.manual_seed(0)
    return sf.transform(TinyRes().eval(), method="cs", granularity="channel")


def latency(gm: nn.Module, tmp_path) -> ChannelCost:
    return channel_latency(gm, X, cache_dir=tmp_path, timer=macs_timer, round_to=1,
                           model_timer=model_timer, progress=False)


def test_latency_and_macs_share_one_bookkeeping(gm, tmp_path) -> None:
    """With a MAC-proportional timer, latency == c x MACs + remainder for every keep: the
    interpolated table, the slot bookkeeping and the remainder are exact."""
    macs = channel_macs(gm, weight_costs(gm, X))
    lat = latency(gm, tmp_path)
    assert type(macs) is type(lat) and macs.unit == "MACs" and lat.unit == "ms"
    assert lat.remainder == pytest.approx(REMAINDER) and lat.scale == pytest.approx(1.0)
    assert lat.meta["probe_ms"] < lat.meta["dense_ms"]
    assert lat.dense == pytest.approx(MS_PER_MAC * X.shape[0] * macs.dense + REMAINDER)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        keep = torch.rand(lat.n_slots, generator=g) < 0.6
        assert lat.cost(keep) == pytest.approx(MS_PER_MAC * X.shape[0] * macs.cost(keep)
                                               + REMAINDER, rel=1e-9)
        per_macs, per_lat = macs.layer_costs(keep), lat.layer_costs(keep)
        assert per_lat.keys() == per_macs.keys()
        for k in per_macs:
            assert per_lat[k] == pytest.approx(MS_PER_MAC * X.shape[0] * per_macs[k], rel=1e-9)


def test_report_reads_the_cost_object(gm, tmp_path) -> None:
    lat = latency(gm, tmp_path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in group_masks(gm).values():
            m.freeze(torch.rand(m.score_shape, generator=g) < 0.5)
    keep = lat.hard_keep()
    rep = sf.report(sf.shrink(gm), X, latency=lat)  # the shrunk model, costed by gm's masks
    est = lat.layer_costs(keep)
    assert {r.name: r.latency_ms for r in rep.rows} == est
    assert rep.latency["estimated_ms"] == pytest.approx(lat.cost(keep))
    assert rep.latency["fraction"] == pytest.approx(lat.hard_fraction())
    assert rep.latency["fraction"] < 1.0
    widths = kept_widths(lat, keep)
    for r in rep.rows:  # the widths the cost reads are the channels report counts
        assert widths[r.name][0] == r.out_channels_kept
    assert "onnxruntime latency: estimated" in rep.to_markdown()
    assert rep.to_dict()["totals"]["latency_fraction"] == pytest.approx(lat.hard_fraction())
    with pytest.raises(sf.SparsifyError, match="channel_latency"):
        sf.report(sf.shrink(gm), X, latency=channel_macs(gm, weight_costs(gm, X)))


def test_latency_cut_and_controller_read_the_same_cost(gm, tmp_path) -> None:
    lat = latency(gm, tmp_path)
    sched = sf.CSScheduler(gm, epochs=2, target_latency=0.5, cost=lat)
    assert sched.cost_model is lat and sched.channel_macs is lat
    assert sched.target_macs == 0.5
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in group_masks(gm).values():
            m.scores.copy_(torch.randn(m.score_shape, generator=g))
    assert sched._density(sched.entries) == lat.hard_fraction()
    sched.finalize()
    frac = lat.hard_fraction()
    assert frac <= 0.5 + 1e-12
    # the cut is the longest prefix of ranked slots that fits: one more slot would not
    ranking = torch.cat([m.ranking_scores().detach().reshape(-1) for m in lat.group_masks])
    keep = lat.hard_keep()
    dropped = ranking.masked_fill(keep, float("-inf"))
    if not bool(keep.all()):
        more = keep.clone()
        more[int(dropped.argmax())] = True
        assert lat.cost(more) / lat.dense > 0.5


def test_apply_budget_target_latency(gm, tmp_path) -> None:
    lat = latency(gm, tmp_path)
    sf.apply_budget(gm, target_latency=0.6, cost=lat)
    assert 0.45 < lat.hard_fraction() <= 0.6 + 1e-12
    with pytest.raises(sf.SparsifyError, match="target_latency"):
        sf.apply_budget(gm, target_latency=0.6, target_macs=0.5, cost=lat)
    with pytest.raises(sf.SparsifyError, match="latency cost"):
        sf.apply_budget(gm, target_latency=0.6, cost=channel_macs(gm, weight_costs(gm, X)))
    element = sf.transform(TinyRes().eval(), method="cs")
    with pytest.raises(sf.SparsifyError, match="channel"):
        sf.apply_budget(element, target_latency=0.5, cost=lat)


def test_transform_stores_target_latency() -> None:
    gm = sf.transform(TinyRes().eval(), method="cs", granularity="channel", target_latency=0.5)
    assert config_of(gm).target_latency == 0.5
    for bad in (dict(granularity="element"), dict(target_macs=0.5), dict(method="magnitude")):
        opts = dict(method="cs", granularity="channel", target_latency=0.5) | bad
        with pytest.raises(sf.SparsifyError, match="target_latency"):
            sf.transform(TinyRes().eval(), **opts)
