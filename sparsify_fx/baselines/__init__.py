"""Baseline pruning methods in the same framework as CS (same mask nodes, trainer, fold, export).

Importing a module registers its method with :func:`sparsify_fx.methods.register_method`;
``sparsify_fx.methods`` imports them all on first use, so ``transform(model,
method="magnitude" | "gmp" | "imp" | "l0" | "ste" | "random")`` just works.
Training-time methods register a :class:`~sparsify_fx.methods.MethodSession`
(``GMPSession``, ``L0Session``, ``STESession``; the old ``*Callback`` names are
aliases) that :class:`sparsify_fx.Trainer` runs by itself, or a driver
(``run_imp``).

May import: the core modules (``mask``, ``mask_index``, ``methods``, ``granularity``,
``errors``), ``budgets``, ``training`` (IMP drives a Trainer) and
``sparsify_fx.passes``; never ``export`` or ``cli``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sparsify_fx.baselines.erk import erk_densities, layer_sparsities
from sparsify_fx.baselines.gmp import GMPCallback, GMPSession, gmp_sparsity
from sparsify_fx.baselines.imp import imp_schedule, prune_remaining, run_imp
from sparsify_fx.baselines.l0 import L0Callback, L0Session
from sparsify_fx.baselines.magnitude import magnitude_prune
from sparsify_fx.baselines.random_mask import random_prune
from sparsify_fx.baselines.ste import STECallback, STESession
from sparsify_fx.baselines import sparsegpt, wanda  # noqa: F401  (register the methods)


def callbacks_for(model: nn.Module, **options: Any) -> list[Any]:
    """Deprecated: the Trainer now builds the method's session itself; returns ``[]``."""
    return []


__all__ = ["erk_densities", "layer_sparsities", "GMPCallback", "GMPSession", "gmp_sparsity",
           "imp_schedule", "prune_remaining", "run_imp", "L0Callback", "L0Session",
           "magnitude_prune", "random_prune", "STECallback", "STESession", "callbacks_for"]
