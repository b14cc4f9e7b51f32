"""``method="magnitude"``: one-shot magnitude pruning of the weights the model has now.

``transform(trained, method="magnitude", target_sparsity=0.9, scope="global")``
keeps the largest ``|w|`` over all layers; ``scope="layer"`` with
``distribution="uniform" | "erk" | {name: sparsity}`` keeps the largest per
layer at that layer's share. Masks are frozen at transform time; fine-tune
afterwards with :class:`sparsify_fx.Trainer`.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from sparsify_fx.budgets.cut_result import CutResult
from sparsify_fx.methods import MethodSpec, register_method
from sparsify_fx.baselines._common import OptionMask, config_target, cut, magnitudes


class MagnitudeMask(OptionMask):
    method = "magnitude"


def magnitude_prune(model: nn.Module, target_sparsity: float | Mapping[str, float] | None = None,
                    scope: str = "global",
                    distribution: str | Mapping[str, float] = "uniform", *,
                    target_macs: float | None = None) -> CutResult:
    """Freeze every mask to the largest-magnitude weights at exactly ``target_sparsity``
    (or, global, at ``target_macs`` of the dense MACs: largest ``|w|`` first while they fit).

    Mutates the masks of ``model`` (a transformed model); returns the cut.
    """
    if target_macs is not None:
        return cut(model, target_macs, magnitudes(model), budget="macs")
    return cut(model, target_sparsity, magnitudes(model), scope, distribution)  # type: ignore[arg-type]


def _after_transform(model: nn.Module, config: Any) -> None:
    budget, target = config_target(config)
    if target is None:
        return  # masks stay all-ones; call magnitude_prune later
    if budget == "macs":
        magnitude_prune(model, target_macs=target)
        return
    scope = "layer" if config.per_layer else config.options["scope"]
    magnitude_prune(model, target, scope, config.options["distribution"])


register_method(MethodSpec(
    "magnitude", MagnitudeMask, {"scope": "global", "distribution": "uniform"},
    after_transform=_after_transform,
    doc="One-shot magnitude pruning (global or per layer: uniform, erk or a dict).",
))
