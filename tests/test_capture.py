"""Capture beyond symbolic_trace (issue 13) and functional weights (issue 11).

Models: a Parameter + F.conv2d / F.linear model (symbolic_trace works), the
same with a branch on ``x.shape`` (only torch.export captures it), and one
that neither can capture.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparsify_fx
from sparsify_fx.capture.capture_model import PartialTraceWarning
from sparsify_fx.errors import ConfigError, TraceError
from sparsify_fx.capture.exported_module import ExportedModule
from sparsify_fx.mask_index import hard_masks
from sparsify_fx.capture.export_modes import SpecializationWarning


class Functional(nn.Module):
    """Two prunable weights, both plain Parameters: a conv (F.conv2d) and a linear (F.linear).

    ``scale`` and ``bias`` are Parameters too, but not conv/linear weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.lin_w = nn.Parameter(torch.randn(5, 8) * 0.3)
        self.bias = nn.Parameter(torch.randn(5) * 0.1)
        self.scale = nn.Parameter(torch.ones(8))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(F.conv2d(x, self.conv_w, padding=1)))
        return self.drop(y.mean((2, 3)) * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.features(x), self.lin_w, self.bias)


class ShapeBranch(Functional):
    """``forward`` branches on ``x.shape[-1]``: symbolic_trace fails, torch.export captures it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if x.shape[-1] > 4:
            y = y * 2.0
        return F.linear(y, self.lin_w, self.bias)


class DataDependent(nn.Module):
    """Branches on a tensor *value*: neither symbolic_trace nor torch.export captures it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return F.linear(x, self.w)
        return -F.linear(x, self.w)


def _trained_bn(model: nn.Module) -> nn.Module:
    """Give batch norm non-trivial running statistics, then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6) * 2 + 0.5)
    return model.eval()


def _varies(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        a, b = model(x), model(x + torch.randn_like(x))
    assert (a - b).abs().max() > 1e-3, "dead net: output does not vary with the input"


def _transform(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecializationWarning)
        return sparsify_fx.transform(model, **kwargs)


def _check_masked_model(source: nn.Module, gm: nn.Module, x: torch.Tensor) -> None:
    """Mask count, parity at 1, pruned fold == hard-masked, report MACs == FlopCounterMode / 2."""
    _varies(source, x)
    names = [e.name for e in sparsify_fx.masks(gm)]
    assert names == ["conv_w", "lin_w"]
    assert sparsify_fx.sparsity(gm) == 0.0
    gm.eval()
    for batch in (x.shape[0], 5):
        xb = torch.randn(batch, *x.shape[1:])
        torch.testing.assert_close(gm(xb), source(xb), rtol=0, atol=1e-6)
    sparsify_fx.apply_budget(gm, target_sparsity=0.5)
    zeros = sum(int((~e.mask.hard_mask()).sum()) for e in sparsify_fx.masks(gm))
    total = sum(e.mask.numel() for e in sparsify_fx.masks(gm))
    assert zeros == total // 2
    with torch.no_grad(), hard_masks(gm):
        hard = gm(x)
    assert (hard - source(x)).abs().max() > 1e-4  # the cut changed the function
    plain = sparsify_fx.fold(gm)
    assert not sparsify_fx.masks(plain)
    torch.testing.assert_close(plain(x), hard, rtol=0, atol=1e-6)
    folded_zeros = sum(int((p == 0).sum()) for n, p in plain.named_parameters()
                       if n.endswith(("conv_w", "lin_w")))
    assert folded_zeros == total // 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        source(x)
    rep = sparsify_fx.report(plain, x)
    assert rep.total_dense_macs == counter.get_total_flops() // 2
    assert sorted(r.name for r in rep.rows) == ["conv_w", "lin_w"]  # names as in the source


def test_functional_weights_found_by_fx():
    source = _trained_bn(Functional())
    x = torch.randn(3, 3, 6, 6)
    gm = sparsify_fx.transform(source)
    assert isinstance(gm, torch.fx.GraphModule)
    assert [e.kind for e in sparsify_fx.masks(gm)] == ["conv", "linear"]
    _check_masked_model(source, gm, x)


def test_functional_weights_found_by_export():
    source = _trained_bn(Functional())
    x = torch.randn(3, 3, 6, 6)
    gm = _transform(source, capture="export", example_inputs=(x,))
    assert isinstance(gm, ExportedModule)
    _check_masked_model(source, gm, x)


def test_shape_branch_auto_uses_export_and_warns_once_naming_the_branch():
    source = _trained_bn(ShapeBranch())
    x = torch.randn(3, 3, 6, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sparsify_fx.transform(source, example_inputs=(x,))
    special = [w for w in caught if issubclass(w.category, SpecializationWarning)]
    assert len(special) == 1
    assert "if x.shape[-1] > 4:" in str(special[0].message)
    assert isinstance(gm, ExportedModule)
    _check_masked_model(source, gm, x)


def test_exported_model_trains_like_the_source():
    """Train mode: dropout is random, batch norm uses batch statistics and updates the
    running statistics both graphs share; .eval() switches to the eval graph."""
    x = torch.randn(4, 3, 6, 6)
    gm = _transform(_trained_bn(ShapeBranch()), example_inputs=(x,))
    gm.train()
    assert (gm(x) - gm(x)).abs().max() > 1e-4  # dropout active
    gm.eval()
    assert not any(m.training for m in gm.modules())
    torch.testing.assert_close(gm(x), gm(x), rtol=0, atol=0)

    model = _trained_bn(ShapeBranch())
    model.drop.p = 0.0  # deterministic, to compare train-mode outputs with the source
    twin = copy.deepcopy(model)
    gm = _transform(model, example_inputs=(x,))
    for _ in range(2):
        gm.train()
        twin.train()
        torch.testing.assert_close(gm(x), twin(x), rtol=1e-5, atol=1e-6)
    gm.eval()
    twin.eval()
    torch.testing.assert_close(gm(x), twin(x), rtol=1e-5, atol=1e-6)
    running = gm.eval_graph.get_buffer("bn.running_mean")
    assert running is gm.train_graph.get_buffer("bn.running_mean")
    torch.testing.assert_close(running, twin.bn.running_mean)
    assert (running - model.bn.running_mean).abs().max() > 1e-4  # updated, and not in `model`


def test_exported_model_one_cs_step_gives_every_mask_a_gradient():
    source = _trained_bn(ShapeBranch())
    x = torch.randn(4, 3, 6, 6)
    gm = _transform(source, example_inputs=(x,))
    gm.train()
    cs = sparsify_fx.CSScheduler(gm, epochs=2)
    opt = torch.optim.SGD(sparsify_fx.param_groups(gm, lr=0.1), lr=0.1)
    loss = F.cross_entropy(gm(x), torch.tensor([0, 1, 2, 3])) + cs.penalty()
    opt.zero_grad()
    loss.backward()
    for entry in sparsify_fx.masks(gm):
        assert entry.mask.scores.grad is not None and entry.mask.scores.grad.abs().sum() > 0
    before = [e.mask.scores.detach().clone() for e in sparsify_fx.masks(gm)]
    opt.step()
    assert all((e.mask.scores - b).abs().sum() > 0 for e, b in zip(sparsify_fx.masks(gm), before))


def test_exported_model_state_dict_device_and_copy_keep_one_set_of_tensors():
    x = torch.randn(3, 3, 6, 6)
    gm = _transform(_trained_bn(ShapeBranch()), example_inputs=(x,))
    keys = list(gm.state_dict())
    assert keys and not any(k.startswith("eval_graph.") for k in keys)
    fresh = _transform(ShapeBranch(), example_inputs=(x,))
    fresh.load_state_dict(gm.state_dict())  # strict: eval-graph keys are neither saved nor expected
    gm.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)
    double = copy.deepcopy(gm).to(torch.float64)
    assert double.eval_graph.get_buffer("bn.running_var") is \
        double.train_graph.get_buffer("bn.running_var")
    assert double.eval_graph.get_buffer("bn.running_var").dtype == torch.float64
    assert gm.train_graph.get_buffer("bn.running_var").dtype == torch.float32


@pytest.mark.slow
def test_exported_model_onnx_two_batch_sizes(tmp_path):
    source = _trained_bn(ShapeBranch())
    x = torch.randn(2, 3, 6, 6)
    gm = _transform(source, example_inputs=(x,))
    sparsify_fx.apply_budget(gm, target_sparsity=0.6)
    result = sparsify_fx.export_onnx(gm, x, tmp_path / "branch.onnx", latency_runs=0)
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance
    with torch.no_grad(), hard_masks(gm.eval()):
        for batch in (1, 7):
            xb = torch.randn(batch, 3, 6, 6)
            assert abs(result.run(xb) - gm(xb).numpy()).max() < 1e-4


def test_dynamic_shapes_passed_through_and_batch_one_capture():
    source = _trained_bn(ShapeBranch())
    gm = _transform(source, example_inputs=(torch.randn(1, 3, 6, 6),),
                    dynamic_shapes=({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO,
                                     3: torch.export.Dim.AUTO},))
    gm.eval()
    for shape in ((1, 3, 6, 6), (4, 3, 9, 7)):
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x), source(x), rtol=0, atol=1e-6)


def test_capture_fx_keeps_old_behaviour_and_names_both_failures():
    with pytest.raises(TraceError) as info:
        sparsify_fx.transform(DataDependent(), capture="fx")
    text = str(info.value)
    assert "torch.fx" in text and "torch.export: not tried" in text
    assert "example_inputs=" in text and "leaf_modules=" in text and "concrete_args=" in text
    assert "if x.sum() > 0:" in text


def test_nothing_captures_error_names_both_failures():
    with pytest.raises(TraceError) as info:
        sparsify_fx.transform(DataDependent(), example_inputs=(torch.randn(2, 6),))
    text = str(info.value)
    assert "torch.fx" in text and "torch.export" in text and "not tried" not in text
    assert "if x.sum() > 0:" in text
    assert "pass `example_inputs=`" not in text  # given already: not offered as a fix
    assert "leaf_modules=" in text


def test_capture_option_errors():
    with pytest.raises(ConfigError, match="example_inputs"):
        sparsify_fx.transform(Functional(), capture="export")
    with pytest.raises(ConfigError, match="capture must be one of"):
        sparsify_fx.transform(Functional(), capture="dynamo")
    with pytest.raises(ConfigError, match="dynamic_shapes"):
        sparsify_fx.transform(Functional(), capture="fx", example_inputs=torch.randn(2, 3, 6, 6),
                              dynamic_shapes=({0: torch.export.Dim.AUTO},))
    # channel structure works on a capture (the ATen walk); latency needs a stated workload
    from sparsify_fx.budgets.cost_model import channel_latency
    x = torch.randn(2, 3, 6, 6)
    gm = _transform(ShapeBranch(), example_inputs=x, granularity="channel", method="magnitude")
    assert type(gm).__name__.startswith("Exported")
    with pytest.raises(ConfigError, match="target_latency on a torch.export capture is measured for a stated workload"):
        channel_latency(gm, x)


def test_partial_fallback_warning_says_export_was_not_tried():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 6), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for row in x:  # iterating a Proxy: symbolic_trace fails at the root only
                row.sum()
            return self.body(x)

    with pytest.warns(PartialTraceWarning, match="torch.export: not tried"):
        gm = sparsify_fx.transform(Outer())
    assert [e.name for e in sparsify_fx.masks(gm)] == ["body.0.weight"]


def test_tied_embedding_weight_is_not_masked():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.emb(ids))))

    ids = torch.randint(0, 20, (2, 5))
    for capture in ("fx", "export"):
        gm = _transform(Tied(), capture=capture, example_inputs=(ids,))
        assert [e.name for e in sparsify_fx.masks(gm)] == ["mid.weight"], capture


@pytest.mark.slow
def test_detection_model_falls_back_to_partial_trace_naming_the_export_failure():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None).eval()
    x = torch.rand(1, 3, 320, 320)
    with pytest.warns(PartialTraceWarning) as record:
        gm = sparsify_fx.transform(model, example_inputs=x)
    text = "\n".join(str(w.message) for w in record if w.category is PartialTraceWarning)
    assert "for img in images:" in text and "torch.export" in text and "eval-mode" in text
    assert not isinstance(gm, ExportedModule) and len(sparsify_fx.masks(gm)) > 50
    with torch.no_grad():
        expected, got = model(x)[0], gm(x)[0]
    assert len(expected["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=1e-4)


def test_exported_model_macs_budget_uses_real_costs():
    """Per-weight MAC costs read the exported graph's shapes as numbers, like the fx path."""
    from sparsify_fx.budgets.exact_cut import weight_costs

    x = torch.randn(3, 3, 6, 6)
    source = _trained_bn(Functional())
    by_fx = weight_costs(sparsify_fx.transform(source), (x,))
    by_export = weight_costs(_transform(source, capture="export", example_inputs=(x,)), (x,))
    assert by_fx == by_export == {"conv_w": 36.0, "lin_w": 1.0}
    gm = _transform(source, capture="export", example_inputs=(x,), method="magnitude",
                    target_macs=0.5)
    rep = sparsify_fx.report(sparsify_fx.fold(gm), x)
    assert rep.total_macs <= 0.5 * rep.total_dense_macs
    assert rep.total_macs > 0.3 * rep.total_dense_macs


def test_shrink_refuses_element_masks_on_an_exported_model_by_name():
    gm = _transform(ShapeBranch(), example_inputs=torch.randn(2, 3, 6, 6), method="magnitude",
                    target_sparsity=0.5)
    with pytest.raises(sparsify_fx.ShrinkError, match="granularity='channel'"):
        sparsify_fx.shrink(gm)
