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

Channel granularity (``transform(..., granularity="channel")`` for both): the scores of
every coupled group (a head, KV group or MLP unit per slot) start from the one-shot
model's kept slots the same way, so CS starts from, e.g., the L1 channel cut.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsify_fx.errors import ConfigError
from sparsify_fx.mask import CSMask
from sparsify_fx.mask_index import masks, unwrap
from sparsify_fx.passes.channels.couple import group_masks


@torch.no_grad()
def init_cs_from_masks(cs_model: nn.Module, source: nn.Module, *, weights: bool = True) -> int:
    """Set the scores of ``cs_model``'s CS masks from ``source``'s hard masks (same weight
    names and shapes; element, N:M or channel CS masks with ``s_init > 0``). Mutates
    ``cs_model`` (scores; weights at kept positions when ``weights``); ``source`` is only
    read. Returns the number of masks (channel: groups) set. ConfigError on any mismatch,
    before changing anything."""
    if group_masks(unwrap(cs_model)):
        return _init_groups(cs_model, source, weights)
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


def _init_groups(cs_model: nn.Module, source: nn.Module, weights: bool) -> int:
    """:func:`init_cs_from_masks` for coupled channel models: one score per group slot."""
    mine, theirs = group_masks(unwrap(cs_model)), group_masks(unwrap(source))
    if set(mine) != set(theirs):
        raise ConfigError("the source model's channel groups differ from the CS model's; "
                          "transform both from the same model with granularity='channel' "
                          "and the same include/exclude")
    for key, mask in mine.items():
        if not isinstance(mask, CSMask):
            raise ConfigError("init_cs_from_masks needs a model from transform(..., "
                              "method='cs') as its first argument")
        if tuple(theirs[key].score_shape) != tuple(mask.score_shape):
            raise ConfigError(f"{key}: the source group has {theirs[key].score_shape} slots, "
                              f"the CS group {mask.score_shape}")
        if not mask.s_init > 0:
            raise ConfigError(f"{key}: CS s_init is {mask.s_init}; a one-shot start needs "
                              "s_init > 0 (kept = +s_init, pruned = -s_init), e.g. "
                              "transform(..., method='cs', s_init=1.0, rescale=False)")
    for key, mask in mine.items():
        keep = theirs[key].hard_mask().to(mask.scores.device).reshape(mask.scores.shape)
        mask.scores.copy_(torch.where(keep, mask.s_init, -mask.s_init))
    if weights:
        theirs_w = {e.name: e for e in masks(unwrap(source)) if not e.mask.auxiliary}
        for e in masks(unwrap(cs_model)):
            other = theirs_w.get(e.name)
            if other is None or e.mask.auxiliary or other.weight.shape != e.weight.shape:
                continue
            keep = other.mask.hard_mask().to(e.weight.device).expand_as(e.weight)
            e.weight.copy_(torch.where(keep, other.weight.detach().to(e.weight.dtype), e.weight))
    return len(mine)

