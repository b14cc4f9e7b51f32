"""shrink(): physically removing pruned channels gives the channel-masked model's outputs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import sparsify_fx
from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask import SharedChannelMask
from sparsify_fx.passes.channels.couple import ChannelCouplingWarning
from sparsify_fx.passes.shrink.shrink_graph import plan_shrink, shrink
from tests.test_channel_analysis import (RandomNet, hard_output, liven_batchnorm,
                                       random_channel_masks)

TOL = 1e-4


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_parity(model: nn.Module, x: torch.Tensor, prune: float, seed: int = 0,
                  **kw) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelCouplingWarning)
        gm = sparsify_fx.transform(model, granularity="channel", **kw)
    pruned = random_channel_masks(gm, prune, seed)
    # every pruned group slot removes at least one output channel from the shrink plan
    removed = sum(total - kept for kept, total in plan_shrink(gm).layers.values())
    assert removed >= pruned > 0
    ref = hard_output(gm, x)
    small = shrink(gm)
    assert isinstance(small, fx.GraphModule)
    assert not any(isinstance(m, SharedChannelMask) for m in small.modules())
    assert not sparsify_fx.masks(small)
    with torch.no_grad():
        out = small(x)
        dense = model(x)
    assert out.shape == ref.shape
    assert ref.std() > 1e-3  # a live signal, not a pruned-to-zero network
    assert (out - ref).abs().max().item() <= TOL
    assert (dense - ref).abs().max().item() > 10 * TOL  # the masks did change the function
    assert _n_params(small) < _n_params(model) * (1.0 - 0.5 * prune)
    return small


def _cnn(name: str) -> nn.Module:
    torch.manual_seed(0)
    return liven_batchnorm(getattr(tvm, name)(num_classes=10).eval())


@pytest.mark.parametrize("prune", [0.3, 0.6])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_shrink_parity_fast(name: str, prune: float) -> None:
    _check_parity(_cnn(name), torch.randn(1, 3, 64, 64), prune, rescale=False)


@pytest.mark.slow
@pytest.mark.parametrize("prune", [0.3, 0.6])
@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "densenet121",
                                  "regnet_y_400mf"])
def test_shrink_parity_zoo(name: str, prune: float) -> None:
    _check_parity(_cnn(name), torch.randn(2, 3, 64, 64), prune, rescale=False)


def test_shrink_keeps_cs_scale_and_input_untouched() -> None:
    model = _cnn("resnet18")
    gm = sparsify_fx.transform(model, granularity="channel")  # rescale=True: factor 2
    random_channel_masks(gm, 0.5, seed=2)
    x = torch.randn(1, 3, 32, 32)
    ref = hard_output(gm, x)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    small = shrink(gm)
    with torch.no_grad():
        out = small(x)
    assert (out - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(hard_output(gm, x), ref)  # the masked model still runs


def test_shrunk_shapes_follow_the_plan() -> None:
    model = _cnn("mobilenet_v2")
    gm = sparsify_fx.transform(model, granularity="channel", rescale=False)
    random_channel_masks(gm, 0.5, seed=4)
    plan = plan_shrink(gm)
    small = shrink(gm)
    for name, (kept, total) in plan.layers.items():
        if name.endswith(".weight"):
            w = small.get_parameter(name)
            assert w.shape[0] == kept and total == model.get_parameter(name).shape[0]
        else:
            assert small.get_submodule(name).num_features == kept
    dw = small.get_parameter("features.2.conv.1.0.weight")
    assert dw.shape[1] == 1  # still depthwise
    assert "features.2.conv.1.0.weight" in plan.format()


@st.composite
def plans(draw):
    steps = [("conv", draw(st.integers(3, 8)))]
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "res", "cat", "dw", "gate"]))
        if kind == "conv":
            steps.append(("conv", draw(st.integers(2, 8))))
        elif kind == "cat":
            steps.append(("cat", draw(st.integers(2, 6)), draw(st.integers(2, 6))))
        else:
            steps.append((kind,))
    return steps


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), prune=st.sampled_from([0.3, 0.6]), seed=st.integers(0, 100))
def test_shrink_parity_random_nets(plan, prune, seed) -> None:
    torch.manual_seed(seed)
    net = liven_batchnorm(RandomNet(plan).eval(), seed)
    gm = sparsify_fx.transform(net, granularity="channel", rescale=False)
    random_channel_masks(gm, prune, seed)
    x = torch.randn(2, 3, 12, 12)
    ref = hard_output(gm, x)
    small = shrink(gm)
    with torch.no_grad():
        out = small(x)
    assert (out - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())
    assert _n_params(small) <= _n_params(net)


def test_shrink_refuses_models_without_coupled_channel_masks() -> None:
    model = _cnn("resnet18")
    with pytest.raises(ShrinkError, match="no sparsify_fx masks"):
        shrink(fx.symbolic_trace(model))
    element = sparsify_fx.transform(model, granularity="element")
    with pytest.raises(ShrinkError, match="granularity 'element'"):
        shrink(element)


def test_shrink_refuses_a_group_with_no_channel_left() -> None:
    net = RandomNet([("conv", 4), ("conv", 4)]).eval()
    gm = sparsify_fx.transform(net, granularity="channel", rescale=False)
    first = next(iter(sparsify_fx.passes.channels.couple.group_masks(gm).values()))
    first.freeze(torch.zeros(first.score_shape, dtype=torch.bool))
    with pytest.raises(ShrinkError, match="keeps no channel"):
        shrink(gm)


@pytest.mark.parametrize("name", ["random", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_shrunk_model_exports_to_onnx(tmp_path, name: str) -> None:
    pytest.importorskip("onnxruntime")
    if name == "random":
        torch.manual_seed(0)
        model = liven_batchnorm(RandomNet([("conv", 8), ("res",), ("cat", 4, 4), ("dw",),
                                           ("gate",)]).eval())
        x = torch.randn(1, 3, 16, 16)
    else:
        model, x = _cnn(name), torch.randn(1, 3, 64, 64)
    gm = sparsify_fx.transform(model, granularity="channel", rescale=False)
    random_channel_masks(gm, 0.5, seed=5)
    ref = hard_output(gm, x)
    small = shrink(gm)
    result = sparsify_fx.export_onnx(small, x, tmp_path / "small.onnx", latency_runs=0)
    assert result.max_abs_diff is not None and result.max_abs_diff <= TOL
    from sparsify_fx.export.onnx_export import run_onnx
    onnx_out = run_onnx(tmp_path / "small.onnx", x)
    assert np.abs(onnx_out - ref.numpy()).max() <= TOL


def test_layer_that_loses_every_channel_keeps_one_zero_channel() -> None:
    """One branch of a concatenation can lose all its channels while its group keeps
    some; shrink keeps one (exactly zero) channel there instead of a 0-channel conv."""
    net = liven_batchnorm(RandomNet([("conv", 3), ("cat", 2, 2), ("res",)]).eval(), 0)
    x = torch.randn(2, 3, 12, 12)
    hit = 0
    for seed in range(12):
        gm = sparsify_fx.transform(net, granularity="channel", rescale=False)
        random_channel_masks(gm, 0.6, seed)
        emptied = [e.name for e in sparsify_fx.masks(gm)
                   if not e.mask.auxiliary and not e.mask.hard_mask().any()]
        small = shrink(gm)
        with torch.no_grad():
            assert (small(x) - hard_output(gm, x)).abs().max().item() <= TOL
        for name in emptied:
            hit += 1
            assert small.get_parameter(name).shape[0] == 1
            assert small.get_parameter(name).abs().sum() == 0
    assert hit > 0  # the case this test is about did occur
