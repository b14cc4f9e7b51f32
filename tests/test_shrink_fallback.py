"""A source class whose code reshapes by a width the shrink does not update: the
``ShrinkError`` names the cut groups that cause it (``groups``, ``exclude``), and the
documented fix (``transform(..., exclude=exc.exclude)``, cut again, shrink) gives a
shrunk model equal to the hard-masked one."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify_fx as sf
from sparsify_fx.budgets.exact_cut import apply_budget
from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask_index import hard_masks
from sparsify_fx.passes.channels.couple import group_masks
from sparsify_fx.passes.shrink.shrink_graph import plan_shrink

WIDTH, HEAD_DIM, UNITS = 32, 8, 128


class InputWidthAttention(nn.Module):
    """Heads by ``-1``, but the output reshaped by the input's own last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, embed = x.shape
        q, k, v = (p(x).view(b, t, -1, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, embed))  # the input's width


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = InputWidthAttention()
        self.fc1, self.fc2 = nn.Linear(WIDTH, UNITS), nn.Linear(UNITS, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(WIDTH, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _cut(model: nn.Module, x: torch.Tensor, exclude: tuple[str, ...] = ()) -> nn.Module:
    """Capture, cut at half the MACs with seeded random scores (heads and units)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(model, method="cs", granularity="channel", target_macs=0.5,
                          example_inputs=(x,), capture="export", exclude=list(exclude))
    g = torch.Generator().manual_seed(3)
    scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
    apply_budget(gm, target_macs=0.5, scores=scores)
    return gm.eval()


def test_the_error_names_the_attention_groups_and_the_fix_shrinks_exactly() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 6, WIDTH)
    gm = _cut(model, x)
    layers = plan_shrink(gm).layers
    assert any(layers[f"blocks.{i}.attn.q.weight"][0] < WIDTH for i in (0, 1))  # heads are cut
    with pytest.raises(ShrinkError) as info:
        sf.shrink(gm)
    exc = info.value
    attention = {f"blocks.{i}.attn.{p}.weight" for i in (0, 1) for p in "qkv"}
    assert set(exc.exclude) == attention  # both layers' heads (same code), no MLP group
    assert exc.groups and all(key in str(exc) for key in exc.groups)
    assert "exclude=exc.exclude" in str(exc)

    fixed = _cut(model, x, exc.exclude)  # the documented fix: the heads stay whole
    small = sf.shrink(fixed).eval()
    assert small.blocks[0].fc1.out_features < UNITS or small.blocks[1].fc1.out_features < UNITS
    assert small.blocks[0].attn.q.out_features == WIDTH
    other = torch.randn(2, 6, WIDTH)
    with torch.no_grad(), hard_masks(fixed):
        ref, ref_other = fixed(x), fixed(other)
    assert float((ref - ref_other).abs().max()) > 1e-3  # the output follows the input
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(small(other), ref_other, rtol=1e-4, atol=1e-5)


class HeadCountScale(InputWidthAttention):
    """Runs shrunk, but scales the scores by its head count: a different output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[1], dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, -1))


def test_a_shrink_that_runs_but_differs_names_its_groups_one_at_a_time() -> None:
    torch.manual_seed(0)
    model = Net()
    for block in model.blocks:
        old = block.attn
        block.attn = HeadCountScale()
        block.attn.load_state_dict(old.state_dict())
    model.eval()
    x = torch.randn(2, 6, WIDTH)
    gm = _cut(model, x)
    with pytest.raises(ShrinkError, match="differs from the hard-masked") as info:
        sf.shrink(gm)
    layers = plan_shrink(gm).layers
    cut = {i for i in (0, 1) if layers[f"blocks.{i}.attn.q.weight"][0] < WIDTH}
    assert cut and set(info.value.exclude) == {f"blocks.{i}.attn.{p}.weight" for i in cut
                                               for p in "qkv"}
    fixed = _cut(model, x, info.value.exclude)
    small = sf.shrink(fixed).eval()
    other = torch.randn(2, 6, WIDTH)
    with torch.no_grad(), hard_masks(fixed):
        ref, ref_other = fixed(x), fixed(other)
    assert float((ref - ref_other).abs().max()) > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(small(other), ref_other, rtol=1e-4, atol=1e-5)
