"""``method="random"``: random masks at a given layer budget (the floor of any comparison).

Each layer keeps a uniformly random subset of exactly its share of weights;
shares come from ``distribution`` (``"erk"`` by default, ``"uniform"`` or a
``{name: sparsity}`` dict, e.g. another method's allocation). ``seed`` makes
the draw reproducible. Masks are frozen at transform time.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from sparsify_fx.budgets.cut_result import CutResult
from sparsify_fx.mask_index import masks
from sparsify_fx.methods import MethodSpec, register_method
from sparsify_fx.baselines._common import OptionMask, config_target, cut


class RandomMask(OptionMask):
    method = "random"


def random_prune(model: nn.Module, target_sparsity: float | Mapping[str, float] | None = None,
                 distribution: str | Mapping[str, float] = "erk", seed: int = 0, *,
                 target_macs: float | None = None) -> CutResult:
    """Freeze every mask to a random subset at the layer budget (or, global, at
    ``target_macs`` of the dense MACs); mutates the masks."""
    g = torch.Generator().manual_seed(int(seed))
    scores = {e.name: torch.rand(e.mask.score_shape, generator=g)
              for e in masks(model) if not e.mask.auxiliary}
    if target_macs is not None:
        return cut(model, target_macs, scores, budget="macs")
    return cut(model, target_sparsity, scores, "layer", distribution)  # type: ignore[arg-type]


def _after_transform(model: nn.Module, config: Any) -> None:
    budget, target = config_target(config)
    if target is None:
        return
    if budget == "macs":
        random_prune(model, seed=config.options["seed"], target_macs=target)
    else:
        random_prune(model, target, config.options["distribution"], config.options["seed"])


register_method(MethodSpec(
    "random", RandomMask, {"distribution": "erk", "seed": 0},
    after_transform=_after_transform,
    doc="Random masks at the layer budget of a distribution (erk, uniform or a dict).",
))
