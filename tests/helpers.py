"""Shared test utilities."""
from __future__ import annotations

import warnings
from typing import Any

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


def assert_shrunk_parity(gm: nn.Module, small: nn.Module, make, rtol: float = 1e-5,
                         atol: float = 1e-5) -> None:
    """``small`` (``sf.shrink(gm)``) equals ``gm`` under its hard masks on a new input
    ``make()``, after checking that ``gm``'s output follows its input (two inputs give
    outputs more than 1e-3 apart): a parity check on a constant output proves nothing."""
    from sparsify_fx.mask_index import hard_masks
    x, other = make(), make()
    with torch.no_grad(), hard_masks(gm):
        ref, ref_other = gm(x), gm(other)
    assert float((ref - ref_other).abs().max()) > 1e-3  # the output follows the input
    with torch.no_grad():
        got = small(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)


def gqa_attention(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention of a hand-written module with ``q_proj`` / ``k_proj`` /
    ``v_proj`` / ``o_proj`` and ``head_dim`` (KV heads repeated, softmax, no mask):
    ``h`` (batch, seq, hidden) -> ``o_proj`` of the heads concatenated."""
    b, s, _ = h.shape
    q, k, v = (p(h).view(b, s, -1, attn.head_dim).transpose(1, 2)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    a = torch.softmax(q @ k.transpose(-1, -2) * attn.head_dim ** -0.5, -1) @ v
    return attn.o_proj(a.transpose(1, 2).reshape(b, s, -1))


def assert_reload_parity(gm: nn.Module, small: nn.Module, loaded: nn.Module, x: tuple,
                         other: tuple) -> None:
    """``small`` (``sf.shrink(gm)``) equals ``gm`` under its hard masks on ``x``, and
    ``loaded`` (``small`` saved and reloaded) equals both on ``x`` and ``other``, after
    checking that ``gm``'s output follows its input."""
    from sparsify_fx.mask_index import hard_masks
    with torch.no_grad(), hard_masks(gm):
        ref, ref_other = gm(*x), gm(*other)
    assert float((ref - ref_other).abs().max()) > 1e-3  # the output follows the input
    with torch.no_grad():
        torch.testing.assert_close(small(*x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(*x), small(*x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loaded(*other), ref_other, rtol=1e-5, atol=1e-5)


def l1_cut_and_shrink(model: nn.Module, example: tuple, dynamic_shapes: Any = None
                      ) -> tuple[nn.Module, nn.Module, list[str]]:
    """``transform(capture="export", granularity="channel")`` of ``model`` on ``example``,
    an L1 cut to 0.5 of its MACs, ``shrink``: ``(capture, shrunk model, the warnings the
    capture raised)``."""
    from sparsify_fx.budgets.exact_cut import apply_budget
    from sparsify_fx.passes.channels.couple import channel_l1_scores
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sf.transform(model, granularity="channel", target_macs=0.5, example_inputs=example,
                          capture="export", dynamic_shapes=dynamic_shapes)
    apply_budget(gm, target_macs=0.5, scores=channel_l1_scores(gm))
    gm.eval()
    return gm, sf.shrink(gm).eval(), [str(w.message) for w in caught]

