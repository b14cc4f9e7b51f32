"""Layer-sparsity distributions: uniform, Erdős–Rényi-Kernel (ERK) and explicit dicts.

ERK (Evci et al., RigL) gives layer ``l`` a density proportional to
``sum(shape_l) / prod(shape_l)``, scaled so the weighted mean density equals
the global target; layers that would exceed density 1 are made dense and the
scale is solved again over the rest. Pure functions: nothing is mutated.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from torch import nn

from sparsify_fx.errors import ConfigError
from sparsify_fx.mask_index import masks

DISTRIBUTIONS = ("uniform", "erk")


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Per-layer densities (kept fraction) whose weight-weighted mean is ``density``.

    ``shapes``: weight name -> weight shape. Returns name -> density in (0, 1].
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"ERK needs a density in (0, 1], got {density}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(sizes[n] for n in dense)
        rest = [n for n in shapes if n not in dense]
        if not rest:
            break
        eps = budget / sum(raw[n] * sizes[n] for n in rest)
        over = [n for n in rest if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else min(1.0, eps * raw[n]) for n in shapes}


def layer_sparsities(model: nn.Module, target: float | Mapping[str, float],
                     distribution: str | Mapping[str, float] = "uniform") -> dict[str, float]:
    """Per-layer sparsity for every (non-auxiliary) masked weight of ``model``.

    ``target``: global fraction of masked weights to zero, or already a
    ``{name: fraction}`` dict (returned as is, validated). ``distribution``:
    ``"uniform"`` (every layer at ``target``), ``"erk"`` or an explicit
    ``{name: fraction}`` dict (e.g. the allocation CS found). Read-only.
    """
    entries = [e for e in masks(model) if not e.mask.auxiliary]
    names = [e.name for e in entries]
    explicit = target if isinstance(target, Mapping) else (
        distribution if isinstance(distribution, Mapping) else None)
    if explicit is not None:
        missing = [n for n in names if n not in explicit]
        if missing:
            raise ConfigError(f"per-layer sparsities miss {', '.join(missing[:4])}; give a "
                              "fraction for every masked weight (see sparsify_fx.masks(model))")
        return {n: float(explicit[n]) for n in names}
    if distribution == "uniform":
        dens = {n: 1.0 - float(target) for n in names}
    elif distribution == "erk":
        dens = erk_densities({e.name: e.mask.weight_shape for e in entries}, 1.0 - float(target))
    else:
        raise ConfigError(f"unknown layer distribution {distribution!r}; use "
                          f"{', '.join(DISTRIBUTIONS)} or a {{weight name: sparsity}} dict")
    return _exact(entries, dens, float(target))


def _exact(entries: list, dens: dict[str, float], target: float) -> dict[str, float]:
    """Round per-layer densities to whole weights so the global count is exact.

    Element masks: the rounding error of all layers is moved onto the layers
    with room, largest first, so the kept total is ``round((1 - target) * N)``.
    """
    units = {e.name: e.mask.numel() // e.mask.weights_per_score for e in entries}
    per = {e.name: e.mask.weights_per_score for e in entries}
    kept = {n: round(d * units[n]) for n, d in dens.items()}
    if all(p == 1 for p in per.values()):
        want = round((1.0 - target) * sum(units.values()))
        diff = want - sum(kept.values())
        for n in sorted(kept, key=lambda n: -units[n]):
            if diff == 0:
                break
            room = (units[n] - kept[n]) if diff > 0 else -kept[n]
            move = min(diff, room) if diff > 0 else max(diff, room)
            kept[n] += move
            diff -= move
    return {n: 1.0 - kept[n] / units[n] for n in kept}

