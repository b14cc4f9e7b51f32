"""Shared pieces of the baseline methods: option-carrying fixed masks and magnitude cuts."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsify_fx.budgets.cut_result import CutResult
from sparsify_fx.budgets.exact_cut import apply_budget
from sparsify_fx.errors import ConfigError
from sparsify_fx.mask import FixedMask
from sparsify_fx.mask_index import masks
from sparsify_fx.baselines.erk import layer_sparsities


class OptionMask(FixedMask):
    """A :class:`FixedMask` that records its method's options (``self.options``).

    One-shot and schedule-driven methods (magnitude, GMP, IMP, random) decide
    their masks from outside, through :func:`sparsify_fx.apply_budget`.
    """

    def __init__(self, weight_shape: Sequence[int], granularity: str = "element",
                 weight_name: str = "", **options: Any) -> None:
        super().__init__(weight_shape, granularity, weight_name)
        self.options = dict(options)


def magnitudes(model: nn.Module, only_kept: bool = False) -> dict[str, Tensor]:
    """``|w|`` per masked weight (name -> float32 tensor, weight shape).

    ``only_kept=True`` zeroes already-pruned weights (``|w * keep|``) and ranks
    them below every kept one (-1), so a cut never revives a pruned weight.
    """
    out = {}
    for e in masks(model):
        if e.mask.auxiliary:
            continue
        mag = e.weight.detach().abs().float()
        if only_kept:
            keep = e.mask.hard_mask()
            if keep.shape != mag.shape:  # channel masks: rank channels by summed |w|
                mag = mag.reshape(mag.shape[0], -1).sum(1).reshape(keep.shape)
            mag = torch.where(keep, mag, torch.full_like(mag, -1.0))
        out[e.name] = mag
    return out


def cut(model: nn.Module, target: float | Mapping[str, float], scores: Mapping[str, Tensor],
        scope: str = "global", distribution: str | Mapping[str, float] = "uniform", *,
        budget: str = "sparsity", costs: Mapping[str, float] | None = None,
        final: bool = True) -> CutResult:
    """Freeze masks to the top ``scores`` at ``target``; mutates the masks.

    ``budget="sparsity"``: ``scope="global"`` ranks all layers together
    (``distribution`` ignored); ``scope="layer"`` cuts each layer to its share
    from ``distribution`` (``uniform``, ``erk`` or ``{name: sparsity}``); a dict
    ``target`` is per layer. ``budget="macs"``: ``target`` is the fraction of
    dense MACs to keep, one global ranking (``costs`` default to the transform's
    ``example_inputs``). ``final=False`` marks an intermediate cut of a schedule.
    """
    if scope not in ("global", "layer"):
        raise ConfigError(f"scope must be 'global' or 'layer', got {scope!r}")
    if budget == "macs":
        return apply_budget(model, target_macs=float(target), costs=costs,  # type: ignore[arg-type]
                            scores=scores, final=final)
    if scope == "global" and not isinstance(target, Mapping) and not isinstance(distribution, Mapping):
        return apply_budget(model, float(target), scores=scores, final=final)
    return apply_budget(model, layer_sparsities(model, target, distribution), scores=scores,
                        final=final)


def config_target(config: Any) -> tuple[str, Any]:
    """``("macs", fraction)`` or ``("sparsity", fraction or dict)`` from a transform config;
    ``("sparsity", None)`` when it has no target."""
    if config is not None and config.target_macs is not None:
        return "macs", float(config.target_macs)
    return "sparsity", None if config is None else config.target_sparsity


def density_of(target: float, budget: str) -> float:
    """Kept fraction a target asks for: ``target`` itself for MACs, ``1 - target`` for sparsity."""
    return float(target) if budget == "macs" else 1.0 - float(target)


def require_target(method: str, target: Any) -> None:
    if target is None:
        raise ConfigError(f"method {method!r} needs a target in transform(...): target_sparsity "
                          "(a fraction or a {weight name: fraction} dict) or target_macs")
