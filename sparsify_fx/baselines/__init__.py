"""Baseline pruning methods in the same framework as CS (same mask nodes, trainer, fold, export).

Importing a module registers its method with :func:`sparsify_fx.methods.register_method`;
``sparsify_fx.methods`` imports them all on first use, so ``transform(model,
method="magnitude" | "gmp" | "imp" | "l0" | "ste" | "random")`` just works.
Training-time methods come with a :class:`sparsify_fx.trainer.Trainer`
callback (``GMPCallback``, ``L0Callback``, ``STECallback``) or a driver
(``run_imp``); :func:`callbacks_for` picks the right callback for a model.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..mask_index import unwrap
from ..config import config_of
from .erk import erk_densities, layer_sparsities
from .gmp import GMPCallback, gmp_sparsity
from .imp import imp_schedule, prune_remaining, run_imp
from .l0 import L0Callback
from .magnitude import magnitude_prune
from .random_mask import random_prune
from .ste import STECallback


def callbacks_for(model: nn.Module, **options: Any) -> list[Any]:
    """The Trainer callbacks a model's method needs (empty for one-shot methods and CS)."""
    cfg = config_of(unwrap(model))
    method = cfg.method if cfg is not None else ""
    factory = {"gmp": GMPCallback, "l0": L0Callback, "ste": STECallback}.get(method)
    return [factory(model, **options)] if factory is not None else []


__all__ = ["erk_densities", "layer_sparsities", "GMPCallback", "gmp_sparsity", "imp_schedule",
           "prune_remaining", "run_imp", "L0Callback", "magnitude_prune", "random_prune",
           "STECallback", "callbacks_for"]
