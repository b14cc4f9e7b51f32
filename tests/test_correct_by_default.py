"""Correct by default (issue 11): untrained is identity, a requested target is always
delivered, and every budget works for every method or is refused at transform."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import sparsify_fx as sf
from sparsify_fx.baselines import run_imp
from sparsify_fx.data import digits
from sparsify_fx.models import DigitsCNN


def digits_mlp() -> nn.Module:
    """The digits MLP of the issue: 64-256-128-10."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128),
                         nn.ReLU(), nn.Linear(128, 10))


def _varies(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output on ``x``; asserts it changes with the input (not a dead net)."""
    with torch.no_grad():
        out = model(x)
    assert float((out[0] - out[1]).abs().max()) > 1e-4, "output does not vary with the input"
    return out


def vit_b_16() -> nn.Module:
    """vit_b_16 with a random head: torchvision zero-initialises it (a constant output)."""
    model = torchvision.models.vit_b_16(weights=None)
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


CASES = {
    "digits_mlp": (digits_mlp, (4, 1, 8, 8)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (2, 3, 64, 64)),
    "vit_b_16": (vit_b_16, (2, 3, 224, 224)),
}


@pytest.mark.parametrize("name", [
    "digits_mlp", "resnet18", pytest.param("vit_b_16", marks=pytest.mark.slow)])
def test_untrained_transform_folds_to_the_input_model(name: str) -> None:
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    want = _varies(model, x)
    gm = sf.transform(model, example_inputs=x).eval()
    assert sf.sparsity(gm) == 0.0
    rep = sf.report(gm, x)
    masked_rows = [r for r in rep.rows if r.masked]
    assert len(masked_rows) == len(sf.masks(gm))
    dense_rows = {r.name: r for r in sf.report(model, x).rows}
    # counted from the weights: only the zeros the dense model has (vit_b_16 has a few)
    assert all(r.nonzeros == dense_rows[r.name].nonzeros for r in masked_rows)
    assert rep.param_sparsity == sf.report(model, x).param_sparsity
    with torch.no_grad():
        assert torch.allclose(gm(x), want, atol=1e-5)
        with sf.hard_masks(gm):
            assert torch.allclose(gm(x), want, atol=1e-5)
    folded = sf.fold(gm)
    with torch.no_grad():
        assert torch.allclose(folded(x), want, atol=1e-5)
    original = model.state_dict()
    for key, value in folded.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_three_line_loop_ends_exactly_at_the_target_without_finalize() -> None:
    torch.manual_seed(0)
    gm = sf.transform(digits_mlp(), method="cs", target_sparsity=0.9)
    with pytest.raises(sf.TargetNotAppliedError, match="apply_budget"):
        sf.fold(gm)  # the target was asked for and never cut: refused, not folded
    data = digits(0)
    loader = DataLoader(data.train, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(sf.param_groups(gm, lr=0.1, weight_decay=1e-4), momentum=0.9)
    cs = sf.CSScheduler(gm, epochs=30)
    for _epoch in range(30):
        for x, y in loader:
            loss = F.cross_entropy(gm(x), y) + cs.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        cs.step()
    folded = sf.fold(gm)
    weights = [folded.get_parameter(e.name) for e in sf.masks(gm)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.9 * total)
    assert cs.finalize() is cs.cut  # idempotent: no second cut
    x, y = data.test[:]  # the folded model still classifies digits
    with torch.no_grad():
        assert float((folded.eval()(x).argmax(1) == y).float().mean()) > 0.8


def test_untrained_cs_cut_keeps_weights_unscaled() -> None:
    """A cut of a never-trained CS mask keeps the kept weights as they are (factor 1)."""
    torch.manual_seed(0)
    model = digits_mlp()
    gm = sf.transform(model)
    sf.apply_budget(gm, 0.5)
    folded = sf.fold(gm)
    for e in sf.masks(gm):
        w, orig = folded.get_parameter(e.name), model.get_parameter(e.name)
        kept = w != 0
        assert torch.equal(w[kept], orig[kept])


TRAINED_METHODS = ["cs", "magnitude", "gmp", "imp", "l0", "random"]


def _normal_run(gm: nn.Module, method: str) -> None:
    """The method's ordinary run on digits: 2 short epochs (IMP: its levels, 1 epoch each)."""
    train = digits(0).train
    opts = dict(epochs=2, batch_size=64, lr=0.05, progress=False)
    if method == "imp":
        run_imp(gm, train, **{**opts, "epochs": 1})
    elif method in ("cs", "gmp", "l0"):
        sf.Trainer(gm, train, **opts).fit()


@pytest.mark.parametrize("method", TRAINED_METHODS)
def test_target_macs_at_channel_granularity_is_met_by_every_method(method: str) -> None:
    torch.manual_seed(0)
    model = DigitsCNN(width=8, hidden=32).eval()
    x = digits(0).test[:4][0]
    dense = sf.report(model, x).total_dense_macs
    gm = sf.transform(model, method=method, granularity="channel", target_macs=0.5,
                      example_inputs=x)
    _normal_run(gm, method)
    shrunk = sf.shrink(gm).eval()
    _varies(shrunk, x)
    assert sf.report(shrunk, x).total_dense_macs <= 0.5 * dense
    with torch.no_grad(), sf.hard_masks(gm.eval()):
        assert torch.allclose(shrunk(x), gm(x), atol=1e-4)


def test_ste_refuses_target_macs_at_transform() -> None:
    with pytest.raises(sf.ConfigError, match="'ste' cannot honour target_macs"):
        sf.transform(DigitsCNN(width=8, hidden=32), method="ste", granularity="channel",
                     target_macs=0.5, example_inputs=torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("method", ["magnitude", "random", "gmp", "l0", "ste", "cs"])
def test_element_target_sparsity_is_exact_for_every_method(method: str) -> None:
    torch.manual_seed(0)
    gm = sf.transform(digits_mlp(), method=method, target_sparsity=0.8)
    _normal_run(gm, method)
    if method == "ste":  # STE's session freezes at the end of fit
        sf.Trainer(gm, digits(0).train, epochs=1, progress=False).fit()
    folded = sf.fold(gm)
    weights = [folded.get_parameter(e.name) for e in sf.masks(gm)]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * total)


@pytest.mark.parametrize("method", ["gmp", "l0"])
def test_fine_tuning_after_the_final_cut_keeps_the_masks(method: str) -> None:
    """A second Trainer on a model already cut to its target fine-tunes the fixed masks:
    the method's schedule does not start again."""
    torch.manual_seed(0)
    gm = sf.transform(digits_mlp(), method=method, target_sparsity=0.8)
    train = digits(0).train
    sf.Trainer(gm, train, epochs=1, lr=0.05, progress=False).fit()
    keep = [e.mask.hard_mask().clone() for e in sf.masks(gm)]
    tune = sf.Trainer(gm, train, epochs=1, lr=0.01, progress=False)
    assert tune.method is None
    tune.fit()
    assert all(torch.equal(k, e.mask.hard_mask()) for k, e in zip(keep, sf.masks(gm)))
    assert sf.sparsity(gm) == pytest.approx(0.8, abs=1e-4)
