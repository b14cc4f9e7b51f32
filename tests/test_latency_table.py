"""Latency lookup table (issue 15): interpolation, monotone grids, cache keyed by environment
(a second build measures nothing), and one real onnxruntime timing of a tiny op."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify_fx as sf
from sparsify_fx.budgets.cost_model import channel_latency
from sparsify_fx.latency.table import (CACHE_ENV, LatencyTable, OpSignature, OpTable, cache_dir,
                                       grid, ort_timer)

X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


class Counter:
    """A fake timer: ms = out x in / 1000 (+ the signature's input channels / 1e6), counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, sig: OpSignature, kept_out: int, kept_in: int) -> float:
        self.calls += 1
        return kept_out * kept_in / 1000 + sig.in_ch / 1e6


def test_bilinear_interpolation_is_exact_for_bilinear_costs() -> None:
    outs, ins = [2, 4, 8], [3, 6]
    table = OpTable(outs, ins, [[0.5 * o * i + 1.0 for i in ins] for o in outs])
    for o, i in [(2, 3), (8, 6), (3, 4), (5, 5.5), (7, 3)]:
        assert table(o, i) == pytest.approx(0.5 * o * i + 1.0)
    assert table(0, 3) == 0.0 and table(4, 0) == 0.0
    assert table(1, 6) == pytest.approx(table(2, 6) / 2)  # linear towards 0 below the grid
    assert table(16, 12) == pytest.approx(table(8, 6))  # clamped above


def test_monotone_removes_noise_dips() -> None:
    noisy = OpTable([1, 2, 3], [1, 2], [[1.0, 2.0], [0.5, 3.0], [4.0, 2.5]]).monotone()
    assert noisy.ms == [[1.0, 2.0], [1.0, 3.0], [4.0, 4.0]]
    for o in (1, 1.5, 2, 2.5, 3):
        assert noisy(o, 1) <= noisy(o, 1.5) <= noisy(o, 2)
        assert noisy(o, 2) <= noisy(min(o + 0.5, 3), 2)


def test_grid_widths() -> None:
    assert grid(64, True) == [16, 32, 48, 64]
    assert grid(3, True) == [1, 2, 3]
    assert grid(3, False) == [3]


def test_cache_dir_override(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_second_build_measures_nothing(tmp_path) -> None:
    gm = sf.transform(Net().eval(), method="cs", granularity="channel")
    timer, models = Counter(), []
    first = channel_latency(gm, X, cache_dir=tmp_path, timer=timer, round_to=1,
                            model_timer=lambda ms, x: models.extend(ms) or [5.0, 3.0],
                            progress=False)
    # c1: 4 out widths x 1 input (the image); c2: 4 x 4; fc: 1 output (classes) x 4
    assert timer.calls == 4 + 16 + 4 and len(models) == 2  # dense + half-width probe
    for m in models:
        assert not any("sparsify" in type(m).__name__.lower() for m in m.modules())
    assert models[1].get_parameter("c2.weight").shape[0] == 8  # the probe: half of c2
    assert first.dense == pytest.approx(5.0)  # remainder completes the measured dense latency
    again_timer = Counter()
    second = channel_latency(gm, X, cache_dir=tmp_path, timer=again_timer, round_to=1,
                             model_timer=lambda m, x: pytest.fail("remainder re-measured"),
                             progress=False)
    assert again_timer.calls == 0 and second.meta["timings"] == 0
    assert not second.meta["model_timed"] and first.meta["timings"] == timer.calls
    assert second.dense == first.dense and second.remainder == first.remainder
    files = list(tmp_path.glob("latency-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["env"]["threads"] == "2" and "onnxruntime" in data["env"] and "cpu" in data["env"]
    # another thread count is another environment: measured again, in another file
    third = Counter()
    channel_latency(gm, X, threads=1, cache_dir=tmp_path, timer=third, round_to=1,
                    model_timer=lambda ms, x: [4.0, 3.0], progress=False)
    assert third.calls == timer.calls and len(list(tmp_path.glob("latency-*.json"))) == 2


def test_table_keyed_by_signature(tmp_path) -> None:
    table = LatencyTable.load(2, tmp_path)
    a = OpSignature("conv", 1, 8, 8, 1, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1))
    b = OpSignature("conv", 1, 8, 8, 1, (16, 16), (3, 3), (1, 1), (1, 1), (1, 1))
    timer = Counter()
    table.measure(a, True, True, timer)
    n = timer.calls
    table.measure(a, True, True, timer)
    assert timer.calls == n  # same signature: cached in memory
    table.measure(b, True, True, timer)
    assert timer.calls == 2 * n  # another input size: another entry
    table.save()
    assert set(LatencyTable.load(2, tmp_path).ops) == {a.key(), b.key()}


def test_real_onnxruntime_timer_orders_widths() -> None:
    """One real measurement: a 4x wider 1x1 conv on a 32x32 map is not faster."""
    timer = ort_timer(threads=1)
    sig = OpSignature("conv", 1, 64, 64, 1, (32, 32), (1, 1), (1, 1), (0, 0), (1, 1))
    small, big = timer(sig, 16, 16), timer(sig, 64, 64)
    assert math.isfinite(small) and small >= 0.0
    assert big > small
    few, wide = timer.many(sig, [(16, 16), (64, 64)])
    assert wide > few >= 0.0
    lin = OpSignature("linear", 1, 32, 16, 1, (4,))
    assert timer(lin, 16, 32) >= 0.0


def test_grid_timed_in_one_interleaved_call(tmp_path) -> None:
    """A timer offering ``many`` gets the op's whole grid at once (timed round-robin)."""
    timer, batches = Counter(), []

    def many(sig: OpSignature, pairs: list[tuple[int, int]]) -> list[float]:
        batches.append(pairs)
        return [o * i / 1000 for o, i in pairs]

    timer.many = many
    sig = OpSignature("conv", 1, 8, 16, 1, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1))
    table = LatencyTable.load(2, tmp_path).measure(sig, True, True, timer)
    assert timer.calls == 0 and len(batches) == 1 and len(batches[0]) == 16
    assert table(12, 6) == pytest.approx(12 * 6 / 1000)
    dw = OpSignature("conv", 1, 16, 16, 16, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1))
    table = LatencyTable.load(2, tmp_path).measure(dw, True, True, timer)
    assert batches[-1] == [(4, 4), (8, 8), (12, 12), (16, 16)]  # whole depthwise groups
    assert table(8, 1) == pytest.approx(8 * 8 / 1000)
