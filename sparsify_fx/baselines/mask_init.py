"""Start Continuous Sparsification from a one-shot mask (the MaskLLM setting at our scale).

``cs = transform(dense, method="cs", s_init=2.0, granularity="2:4", ...)`` and a calibrated
``oneshot = transform(dense, method="sparsegpt" | "wanda" | "magnitude", ...)`` with the
same masked weights; :func:`init_cs_from_masks` sets every CS score to ``+s_init`` where
the one-shot mask keeps the weight and ``-s_init`` where it prunes it, so the CS hard mask
starts as the one-shot mask (with ``rescale=True`` a kept weight's soft mask starts at
exactly 1, a pruned one's at ``sigmoid(-s_init) / sigmoid(s_init)``, 0.135 for
``s_init=2``). ``weights=True`` also copies the one-shot model's kept weights (SparseGPT's
reconstructed values); pruned positions keep the CS model's own (dense) values, so a
weight the training revives comes back with its trained value.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify_fx.errors import ConfigError
from sparsify_fx.mask import CSMask
from sparsify_fx.mask_index import masks, unwrap


@torch.no_grad()
def init_cs_from_masks(cs_model: nn.Module, source: nn.Module, *, weights: bool = True) -> int:
    """Set the scores of ``cs_model``'s CS masks from ``source``'s hard masks (same weight
    names and shapes; element or N:M CS masks with ``s_init > 0``). Mutates ``cs_model``
    (scores; weights at kept positions when ``weights``); ``source`` is only read.
    Returns the number of masks set. ConfigError on any mismatch, before changing anything."""
    theirs = {e.name: e for e in masks(unwrap(source)) if not e.mask.auxiliary}
    mine = [e for e in masks(unwrap(cs_model)) if not e.mask.auxiliary]
    if not mine or not all(isinstance(e.mask, CSMask) for e in mine):
        raise ConfigError("init_cs_from_masks needs a model from transform(..., method='cs') "
                          "with element or N:M granularity as its first argument")
    for e in mine:
        other = theirs.get(e.name)
        if other is None:
            raise ConfigError(f"the source model has no mask on {e.name}; transform both "
                              "models from the same model with the same include/exclude")
        if other.mask.score_shape != e.mask.score_shape:
            raise ConfigError(f"{e.name}: the source mask has shape {other.mask.score_shape}, "
                              f"the CS mask {e.mask.score_shape}; use the same granularity")
        if not e.mask.s_init > 0:
            raise ConfigError(f"{e.name}: CS s_init is {e.mask.s_init}; a one-shot start "
                              "needs s_init > 0 (kept = +s_init, pruned = -s_init), e.g. "
                              "transform(..., method='cs', s_init=2.0)")
    for e in mine:
        other = theirs[e.name]
        keep = other.mask.hard_mask().to(e.mask.scores.device)
        e.mask.scores.copy_(torch.where(keep, e.mask.s_init, -e.mask.s_init))
        if weights:
            src = other.weight.detach().to(e.weight.device, e.weight.dtype)
            e.weight.copy_(torch.where(keep.expand_as(src), src, e.weight))
    return len(mine)


__all__ = ["init_cs_from_masks"]
