"""Property test (issue 2, acceptance 2): random small conv/linear nets with residual
adds and concatenations keep the three equalities of the zoo test."""
from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsify_fx as sf
from sparsify_fx.passes.masks.find_weights import prunable_weight_names
from sparsify_fx.training.cs_scheduler import mask_parameters
from tests.helpers import max_diff


class RandomNet(nn.Module):
    """Blocks: ("conv", c) | ("res",) | ("cat", c); then pooling and a Linear head."""

    def __init__(self, spec: list[tuple], in_ch: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList()
        ch = in_ch
        for kind, width in spec:
            if kind == "conv":
                self.blocks.append(nn.Sequential(nn.Conv2d(ch, width, 3, padding=1),
                                                 nn.BatchNorm2d(width), nn.ReLU()))
                ch = width
            elif kind == "res":
                self.blocks.append(nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, bias=False),
                                                 nn.BatchNorm2d(ch), nn.ReLU(),
                                                 nn.Conv2d(ch, ch, 1)))
            else:  # concat of two branches
                self.blocks.append(nn.ModuleList([nn.Conv2d(ch, width, 1),
                                                  nn.Conv2d(ch, width, 3, padding=1, groups=1)]))
                ch = 2 * width
        self.head = nn.Linear(ch, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for (kind, _), block in zip(self.spec, self.blocks):
            if kind == "conv":
                x = block(x)
            elif kind == "res":
                x = torch.relu(x + block(x))
            else:
                x = torch.cat([block[0](x), block[1](x)], dim=1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


block = st.one_of(st.tuples(st.just("conv"), st.integers(2, 6)),
                  st.tuples(st.just("res"), st.just(0)),
                  st.tuples(st.just("cat"), st.integers(1, 4)))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(block, min_size=1, max_size=5), seed=st.integers(0, 2**16),
       granularity=st.sampled_from(["element", "channel"]))
def test_random_nets(spec: list[tuple], seed: int, granularity: str) -> None:
    torch.manual_seed(seed)
    model = RandomNet(spec).eval()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # channel coupling warns about ops it leaves whole
        gm = sf.transform(model, granularity=granularity)
    weights = [e for e in sf.masks(gm) if not e.mask.auxiliary]
    if granularity == "element":
        assert sorted(e.name for e in weights) == sorted(prunable_weight_names(model))
    else:  # channels feeding the output stay whole: the head carries no channel mask
        assert {e.name for e in weights} <= set(prunable_weight_names(model)) - {"head.weight"}
    with torch.no_grad():
        assert max_diff(gm(x), model(x)) <= 1e-5
    gm.train()
    gm(x).pow(2).sum().backward()
    learnable = mask_parameters(gm)
    assert learnable or granularity == "channel"
    for p in learnable:
        assert p.grad is not None and bool((p.grad != 0).any())
    gm.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learnable:
            p.copy_(torch.randn(p.shape, generator=g))
    sf.set_hard(gm, True)
    folded = sf.fold(gm)
    with torch.no_grad():
        assert max_diff(folded(x), gm(x)) <= 1e-5
        # the folded weights carry exactly the zeros of the hard masks
        params = dict(folded.named_parameters())
        for e in weights:
            w = params[e.name]
            expected = e.mask.hard_mask().expand_as(w)
            assert torch.equal(w[~expected], torch.zeros_like(w[~expected]))
