"""capture="auto" switches channel pruning to torch.export when the torch.fx channel
analysis keeps channels whole at modules it does not understand.

The model: own vision module classes (a BatchNorm subclass that also applies the
activation, own squeeze-excitation and pooling; as in test_structured_export.py) written so
that torch.fx traces them: the fx walk sees ``F.batch_norm`` and an SE product it does not
understand, the ATen walk of torch.export reads through both.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim

import sparsify_fx as sf
import sparsify_fx.capture.capture_model as capture_model
from sparsify_fx.budgets.exact_cut import apply_budget
from sparsify_fx.capture.exported_module import ExportedModule
from sparsify_fx.errors import BudgetError
from sparsify_fx.mask_index import hard_masks
from sparsify_fx.passes.channels.couple import ChannelCouplingWarning, group_masks
from tests.test_structured_export import OwnModulesNet


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass that also applies the activation, calling ``F.batch_norm`` itself
    (as timm's ``BatchNormAct2d`` does; torch.fx traces it, unlike ``super().forward``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return F.relu(x)


def _own_modules_net() -> nn.Module:
    torch.manual_seed(0)
    model = OwnModulesNet(BatchNormAct).eval()
    with torch.no_grad():  # non-trivial statistics, so a wrong BN slice would show
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def export_calls(monkeypatch) -> list[tuple]:
    """Every torch.export capture attempt of transform (its dynamic_shapes argument)."""
    calls: list[tuple] = []
    real = capture_model.export_both_modes

    def spy(module, inputs, dynamic_shapes=None, kwargs=None):
        calls.append((dynamic_shapes,))
        return real(module, inputs, dynamic_shapes, kwargs)

    monkeypatch.setattr(capture_model, "export_both_modes", spy)
    return calls


def _transform(model: nn.Module, **kw) -> tuple[nn.Module, list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sf.transform(model, method="cs", granularity="channel", **kw)
    return gm, caught


def _of(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def _masked(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), hard_masks(gm):
        return gm(x)


def test_own_vision_modules_switch_to_export_and_cut_to_half(export_calls) -> None:
    model = _own_modules_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    dynamic = ({0: Dim.AUTO},)
    gm, caught = _transform(model, example_inputs=x, dynamic_shapes=dynamic)
    switched = _of(caught, sf.CaptureSwitchWarning)
    assert len(switched) == 1, [str(w.message) for w in caught]
    assert not _of(caught, ChannelCouplingWarning)  # about the torch.fx capture, not kept
    fx_floor, export_floor = map(float, re.search(
        r"take (\d\.\d+) of the dense MACs there, against (\d\.\d+)", switched[0]).groups())
    assert export_floor < 0.5 < fx_floor
    assert "torch.export" in switched[0] and "batch_norm" in switched[0]
    assert [c[0] for c in export_calls] == [dynamic]  # dynamic_shapes passed through as given

    reference, _ = _transform(model, example_inputs=x, capture="export")
    assert isinstance(gm, ExportedModule) and type(gm).__name__ == type(reference).__name__
    assert set(dict(gm.named_parameters())) == set(dict(reference.named_parameters()))
    assert set(model.state_dict()) == set(before)  # the input model is not mutated
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(type(m).__name__.startswith("Parametrized") for m in model.modules())

    apply_budget(gm, target_macs=0.5)
    gm.eval()
    assert sf.report(gm, x).blocks["fraction"] <= 0.52
    small = sf.shrink(gm)
    assert type(small) is OwnModulesNet and small.bn1.num_features < 64
    for batch in (1, 3):
        xb, other = torch.randn(batch, 3, 8, 8), torch.randn(batch, 3, 8, 8)
        ref = _masked(gm, xb)
        assert (ref - _masked(gm, other)).abs().max() > 1e-3  # the output follows the input
        with torch.no_grad():
            torch.testing.assert_close(small(xb), ref, rtol=1e-4, atol=1e-4)


def test_fx_understood_models_stay_fx_without_an_export_attempt(export_calls) -> None:
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                        nn.Linear(16, 4)).eval()
    for model, x in ((mlp, torch.randn(2, 12)),
                     (tvm.resnet18(weights=None).eval(), torch.randn(1, 3, 32, 32))):
        gm, caught = _transform(model, example_inputs=x)
        assert not _of(caught, sf.CaptureSwitchWarning)
        assert isinstance(gm, fx.GraphModule) and not isinstance(gm, ExportedModule)
    assert not export_calls


def test_explicit_capture_never_switches(export_calls) -> None:
    model = _own_modules_net()
    x = torch.randn(2, 3, 8, 8)
    gm, caught = _transform(model, example_inputs=x, capture="fx")
    assert isinstance(gm, fx.GraphModule)
    assert not _of(caught, sf.CaptureSwitchWarning) and not export_calls
    assert _of(caught, ChannelCouplingWarning)  # the fx analysis says what it kept whole
    with pytest.raises(BudgetError, match=r"must stay whole.*capture='export'.*capture='auto'"):
        apply_budget(copy.deepcopy(gm), target_macs=0.5)
    gm, caught = _transform(model, example_inputs=x, capture="export")
    assert isinstance(gm, ExportedModule) and not _of(caught, sf.CaptureSwitchWarning)
    assert len(export_calls) == 1


def test_failed_export_attempt_keeps_fx_silently(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("no export here")

    monkeypatch.setattr(capture_model, "export_both_modes", fail)
    gm, caught = _transform(_own_modules_net(), example_inputs=torch.randn(2, 3, 8, 8))
    assert isinstance(gm, fx.GraphModule)
    assert not _of(caught, sf.CaptureSwitchWarning)
    assert not any("no export here" in str(w.message) for w in caught)
    assert _of(caught, ChannelCouplingWarning)  # the fx capture's own warning, as before


def test_no_switch_without_example_inputs_or_with_target_latency(export_calls) -> None:
    model = _own_modules_net()
    gm, caught = _transform(model)
    assert isinstance(gm, fx.GraphModule) and not _of(caught, sf.CaptureSwitchWarning)
    from sparsify_fx.capture.channel_capture import CaptureSwitch
    assert not CaptureSwitch("auto", "fx", "channel", object(), 0.5).active  # latency: fx only
    assert CaptureSwitch("auto", "fx", "channel", object(), None).active
    assert not export_calls


def test_switched_capture_draws_as_an_export_capture_would() -> None:
    """Mask inits that draw random numbers (L0's noise) get the same draws as with
    capture="export", and the RNG stream continues the same after transform."""
    model, x = _own_modules_net(), torch.randn(2, 3, 8, 8)
    results = []
    for capture in ("auto", "export"):
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = sf.transform(model, method="l0", granularity="channel", example_inputs=x,
                              capture=capture)
        results.append((gm, torch.rand(3)))
    (auto, after_auto), (export, after_export) = results
    assert isinstance(auto, ExportedModule) and torch.equal(after_auto, after_export)
    got = {k: m.log_alpha for k, m in group_masks(auto).items()}
    want = {k: m.log_alpha for k, m in group_masks(export).items()}
    assert got and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
