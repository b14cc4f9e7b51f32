"""Checks ``transform`` runs on what it was given, before any mask exists (read-only)."""
from __future__ import annotations

import fnmatch
from typing import Any, Mapping, Sequence

import torch

from sparsify_fx.errors import ConfigError, InputError


def resolve_layer_targets(target: Any, names: Sequence[str]) -> Any:
    """A ``{weight name or glob: fraction}`` target -> ``{weight name: fraction}`` over
    ``names`` (the masked weights; a later key wins). Any other target is returned
    as is. ConfigError for a key that matches no masked weight."""
    if not isinstance(target, Mapping):
        return target
    resolved: dict[str, float] = {}
    for key, value in target.items():
        hits = [n for n in names if n == key or fnmatch.fnmatchcase(n, key)]
        if not hits:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"per-layer target key {key!r} matches no masked weight; keys are weight "
                f"names or globs over them, e.g. {shown}")
        resolved.update({n: float(value) for n in hits})
    return resolved


def check_finite_weights(weights: Mapping[str, torch.Tensor]) -> None:
    """InputError naming the first weight that holds NaN or inf."""
    for name, w in weights.items():
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise InputError(
                f"weight {name} holds {bad} NaN/inf value(s): magnitudes and masks of it would be "
                "meaningless. Fix or re-initialise the weight (e.g. load a good checkpoint), or "
                "leave it out with exclude=[...]")
