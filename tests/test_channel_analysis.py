"""Channel dependency groups and the coupling pass (issue 7).

Helpers at the top (random masks, lively BatchNorm, a random CNN) are shared
with tests/test_shrink.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import sparsify_fx
from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask import SharedChannelMask
from sparsify_fx.passes.channels.analysis import analyze_channels
from sparsify_fx.passes.channels.couple import (ChannelCouplingWarning, channel_l1_scores,
                                                group_masks, select_channels)

def liven_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine params and running stats so activations stay O(1) in eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def random_channel_masks(gm: nn.Module, prune: float, seed: int = 0) -> int:
    """Freeze every group to a random mask pruning about ``prune`` of its slots
    (at least one slot kept). Returns the number of slots pruned."""
    g = torch.Generator().manual_seed(seed)
    pruned = 0
    for m in group_masks(gm).values():
        keep = torch.rand(m.score_shape, generator=g) >= prune
        if not keep.any():
            keep[0] = True
        pruned += int((~keep).sum())
        m.freeze(keep)
    return pruned


def hard_output(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), sparsify_fx.hard_masks(gm):
        return gm(x)


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = ConvBN(c, c)
        self.b = nn.Conv2d(c, c, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b(self.a(x)))


class Concat(nn.Module):
    def __init__(self, cin: int, c1: int, c2: int) -> None:
        super().__init__()
        self.p = ConvBN(cin, c1)
        self.q = ConvBN(cin, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.p(x), self.q(x)], 1)


class Depthwise(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = ConvBN(c, c, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(x)


class Gate(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc(mean(x)))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return x * s


class RandomNet(nn.Module):
    """A CNN assembled from ``plan``: ("conv", c) | ("res",) | ("cat", c1, c2) |
    ("dw",) | ("gate",), then global pooling, flatten and a Linear head."""

    def __init__(self, plan: list[tuple], cin: int = 3, classes: int = 5) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c = cin
        for step in plan:
            if step[0] == "conv":
                blocks.append(ConvBN(c, step[1]))
                c = step[1]
            elif step[0] == "res":
                blocks.append(Residual(c))
            elif step[0] == "cat":
                blocks.append(Concat(c, step[1], step[2]))
                c = step[1] + step[2]
            elif step[0] == "dw":
                blocks.append(Depthwise(c))
            else:
                blocks.append(Gate(c))
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(x)), 1))


# -- tests ------------------------------------------------------------------------------
def _transform(model: nn.Module, **kw) -> nn.Module:
    if kw.get("method", "cs") == "cs":
        kw.setdefault("rescale", False)
    return sparsify_fx.transform(model, granularity="channel", **kw)


@pytest.fixture(scope="module")
def resnet18_gm():
    torch.manual_seed(0)
    model = liven_batchnorm(tvm.resnet18(num_classes=10).eval())
    return model, _transform(model, rescale=True)


def _group_of(gm, weight: str) -> int:
    entry = next(e for e in sparsify_fx.masks(gm) if e.name == weight)
    assert isinstance(entry.mask, SharedChannelMask)
    (src,) = entry.mask.sources
    return next(i for i, m in enumerate(group_masks(gm).values()) if m is src)


def test_residual_adds_couple_producers(resnet18_gm):
    _, gm = resnet18_gm
    g = _group_of(gm, "conv1.weight")
    assert _group_of(gm, "layer1.0.conv2.weight") == g
    assert _group_of(gm, "layer1.1.conv2.weight") == g
    assert _group_of(gm, "layer1.0.conv1.weight") != g
    stream2 = {_group_of(gm, w) for w in ("layer2.0.conv2.weight", "layer2.0.downsample.0.weight",
                                           "layer2.1.conv2.weight")}
    assert len(stream2) == 1 and g not in stream2
    sizes = {k: m.score_shape for k, m in group_masks(gm).items()}
    assert len(sizes) == 1 + 4 + 8 - 1  # stem/layer1 stream, 3 more streams, 8 inner convs
    assert sorted(s[0] for s in sizes.values()).count(64) == 3


def test_output_channels_stay_whole_and_masks_listed_per_weight(resnet18_gm):
    _, gm = resnet18_gm
    entries = {e.name: e for e in sparsify_fx.masks(gm)}
    assert "fc.weight" not in entries and "fc.bias" not in entries
    convs = [n for n, e in entries.items() if e.kind == "conv"]
    assert len(convs) == 20
    assert {e.kind for e in entries.values()} == {"conv", "batchnorm"}
    assert all(isinstance(e.mask, SharedChannelMask) for e in entries.values())
    assert all(k.startswith("channel_group_") for k in group_masks(gm))
    assert not any(e.mask in group_masks(gm).values() for e in entries.values())


def test_soft_model_starts_equal_and_group_scores_get_gradients(resnet18_gm):
    model, gm = resnet18_gm
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (gm(x) - model(x)).abs().max().item() <= 1e-5
    gm.zero_grad()
    gm(x).square().sum().backward()
    grads = [m.scores.grad for m in group_masks(gm).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    ids = {id(p) for p in sparsify_fx.param_groups(gm)[1]["params"]}
    assert all(id(m.scores) in ids for m in group_masks(gm).values())
    gm.zero_grad()


def test_pruned_channel_is_zero_after_every_batchnorm():
    torch.manual_seed(0)
    model = liven_batchnorm(tvm.resnet18(num_classes=10).eval())
    gm = _transform(model)
    random_channel_masks(gm, 0.5, seed=3)
    seen = []

    def hook(mod, _inp, out):
        keep = mod.parametrizations.weight[0].hard_mask()
        seen.append(out[:, ~keep].abs().max().item() if (~keep).any() else 0.0)
        assert out[:, keep].abs().max() > 0

    handles = [m.register_forward_hook(hook) for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
    hard_output(gm, torch.randn(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert len(seen) == 20 and max(seen) == 0.0


def test_fold_equals_hard_masked_model():
    torch.manual_seed(0)
    model = liven_batchnorm(tvm.mobilenet_v2(num_classes=10).eval())
    gm = _transform(model, rescale=True)
    random_channel_masks(gm, 0.4, seed=1)
    x = torch.randn(2, 3, 64, 64)
    ref = hard_output(gm, x)
    folded = sparsify_fx.fold(gm)
    assert not any(isinstance(m, SharedChannelMask) for m in folded.modules())
    with torch.no_grad():
        assert torch.equal(folded(x), ref)


def test_depthwise_conv_ties_input_and_output_channels():
    torch.manual_seed(0)
    gm = _transform(tvm.mobilenet_v2(num_classes=10).eval())
    # features.1: depthwise 3x3 on the stem output, then a 1x1 projection
    assert _group_of(gm, "features.0.0.weight") == _group_of(gm, "features.1.conv.0.0.weight")
    assert _group_of(gm, "features.2.conv.0.0.weight") == _group_of(gm, "features.2.conv.1.0.weight")
    cg = analyze_channels(gm)
    assert not cg.unsupported


def test_concat_maps_channel_ranges():
    torch.manual_seed(0)
    net = RandomNet([("conv", 6), ("cat", 4, 5), ("res",)]).eval()
    gm = _transform(net)
    masks = {e.name: e.mask for e in sparsify_fx.masks(gm)}
    p = masks["blocks.1.p.conv.weight"]
    q = masks["blocks.1.q.conv.weight"]
    b = masks["blocks.2.b.weight"]
    # the residual add ties the 9 concatenated channels to the 1x1 conv's outputs
    assert b.sources[0] in list(p.sources) and b.sources[0] in list(q.sources)
    gmask = b.sources[0]
    keep = torch.ones(9, dtype=torch.bool)
    keep[[1, 6]] = False  # slot order follows the concatenation: p then q
    gmask.freeze(keep)
    assert p.hard_mask().reshape(-1).tolist() == [True, False, True, True]
    assert q.hard_mask().reshape(-1).tolist() == [True, True, False, True, True]
    assert masks["blocks.2.b.bias"].hard_mask().tolist() == keep.tolist()


def test_flatten_into_linear_maps_channel_blocks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.max_pool2d(self.conv(x), 4), 1))

    gm = _transform(Net().eval())
    cg = analyze_channels(gm)
    fc = next(p for p in cg.producers.values() if p.weight == "fc.weight")
    conv = next(p for p in cg.producers.values() if p.weight == "conv.weight")
    assert fc.in_ids.tolist() == [int(i) for i in conv.out_ids for _ in range(4)]


def test_unsupported_pattern_warns_with_node_or_raises():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.b(y)

    with pytest.warns(ChannelCouplingWarning, match=r"view.*view/reshape"):
        gm = _transform(Shuffle().eval())
    names = [e.name for e in sparsify_fx.masks(gm)]
    assert "a.weight" not in names  # its channels stay whole
    from sparsify_fx.passes.channels.couple import couple_channels
    raw = sparsify_fx.transform(Shuffle().eval(), granularity="element")
    with pytest.raises(ShrinkError, match="view"):
        couple_channels(raw, lambda k, name: sparsify_fx.FixedMask((k,), "channel", name),
                        strict=True)


def test_excluded_layer_keeps_its_group_whole():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelCouplingWarning)
        gm = _transform(tvm.resnet18(num_classes=10).eval(), exclude=["layer1.1.conv2"])
    names = {e.name for e in sparsify_fx.masks(gm)}
    assert not names & {"conv1.weight", "layer1.0.conv2.weight", "bn1.weight"}
    assert "layer1.0.conv1.weight" in names


def test_select_channels_by_l1_keeps_largest_norms():
    torch.manual_seed(0)
    net = RandomNet([("conv", 8), ("res",), ("dw",), ("gate",)]).eval()
    gm = _transform(net, method="fixed")
    scores = channel_l1_scores(gm)
    kept = select_channels(gm, 0.5, scores)
    for key, m in group_masks(gm).items():
        keep = m.hard_mask()
        assert int(keep.sum()) == kept[key] == max(1, round(0.5 * keep.numel()))
        assert scores[key][keep].min() >= scores[key][~keep].max()
    w = next(e for e in sparsify_fx.masks(gm) if e.name == "blocks.0.conv.weight")
    by_hand = w.weight.abs().sum((1, 2, 3))
    assert torch.all(scores[_key_of(gm, w.mask)] >= by_hand - 1e-5)


def _key_of(gm, mask) -> str:
    (src,) = mask.sources
    return next(k for k, m in group_masks(gm).items() if m is src)
