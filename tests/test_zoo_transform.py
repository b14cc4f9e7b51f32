"""Zoo parity (issue 2, acceptance 1): masks ~ 1 is the identity, masks learn,
fold equals the hard-masked model, and every Conv/Linear weight is masked."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import fx

import sparsify_fx as sf
from sparsify_fx.passes.masks.find_weights import prunable_weight_names
from tests.helpers import assert_parameters_equal, max_diff, randomize_scores
from tests.zoo import build, detection_model, first_tensor, zoo_params


@pytest.mark.parametrize("name", zoo_params())
def test_zoo_parity(name: str) -> None:
    model, x = build(name)
    before = copy.deepcopy(model)
    gm = sf.transform(model)
    assert_parameters_equal(model, before)  # input untouched
    assert repr(model) == repr(before)

    entries = sf.masks(gm)
    expected = prunable_weight_names(model)
    assert sorted(e.name for e in entries) == sorted(expected), name

    with torch.no_grad():
        ref = first_tensor(model(x))
        out = first_tensor(gm(x))
    assert max_diff(out, ref) <= 1e-5 * max(1.0, float(ref.abs().max()))

    # gradients reach every mask (train mode: BatchNorm uses batch statistics)
    gm.train()
    opt = torch.optim.SGD(sf.param_groups(gm, lr=1e-3), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        first_tensor(gm(x)).float().pow(2).mean().backward()
        opt.step()
    dead = [e.name for e in entries if e.mask.scores.grad is None
            or not bool((e.mask.scores.grad != 0).any())]
    assert not dead, f"{name}: masks without gradient: {dead[:5]}"

    # fold equals the hard-masked model
    gm.eval()
    randomize_scores(gm)
    sf.set_hard(gm, True)
    folded = sf.fold(gm)
    with torch.no_grad():
        hard = first_tensor(gm(x))
        out = first_tensor(folded(x))
    assert max_diff(out, hard) <= 1e-5 * max(1.0, float(hard.abs().max()))
    assert not any(isinstance(m, (sf.Mask,)) for m in folded.modules())
    assert not any(type(m).__module__.startswith("sparsify_fx") for m in folded.modules())
    with pytest.raises(sf.FoldError):
        sf.fold(folded)


@pytest.mark.slow
def test_detection_model_partial_trace() -> None:
    model = detection_model()
    images = [torch.rand(3, 160, 160)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sf.transform(model)
    partial = [w for w in caught if issubclass(w.category, sf.PartialTraceWarning)]
    assert len(partial) == 1 and "Proxy object cannot be iterated" in str(partial[0].message)
    graphs = [n for n, m in gm.named_modules() if isinstance(m, fx.GraphModule)]
    assert "backbone" in graphs
    assert sorted(e.name for e in sf.masks(gm)) == sorted(prunable_weight_names(model))
    with torch.no_grad():
        feats_ref = model.backbone(torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1)))
        feats = gm.backbone(torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1)))
        for k in feats_ref:
            assert max_diff(feats[k], feats_ref[k]) <= 1e-5
        ref, out = model(images)[0], gm(images)[0]
    for key in ("boxes", "scores"):
        assert ref[key].shape == out[key].shape
        assert max_diff(out[key], ref[key]) <= 1e-4
    randomize_scores(gm)
    sf.set_hard(gm, True)
    folded = sf.fold(gm)
    with torch.no_grad():
        hard, out = gm(images)[0], folded(images)[0]
    for key in ("boxes", "scores"):
        assert torch.equal(hard[key], out[key])
    assert not sf.masks(folded)
