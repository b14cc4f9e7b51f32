"""Shared test utilities."""
from __future__ import annotations

import torch
from torch import nn

import sparsify_fx as sf


def randomize_scores(model: nn.Module, seed: int = 0) -> None:
    """Give every CS mask random scores in N(0, 1): a random ~50 % hard mask."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in sf.masks(model):
            e.mask.scores.copy_(torch.randn(e.mask.score_shape, generator=g))
            e.mask.mark_trained()  # as if a scheduler had trained them (untrained keeps all)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def assert_parameters_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
