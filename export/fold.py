"""``fold``: bake binary masks into the weights and remove every sparsify_fx object.

Works on a deep copy; the input model is not mutated. For each mask the folded
weight is computed by the mask's own hard-mode forward (``weight *
fold_factor()``), so the folded model's output equals the hard-masked model's.
The graph work is the pass :mod:`sparsify_fx.passes.masks.fold_masks`; this module
adds the input checks and the copy (like ``quantize_fx.convert_fx``).
"""
from __future__ import annotations

import copy

from torch import nn

from sparsify_fx.errors import FoldError
from sparsify_fx.mask_index import masks, unwrap
from sparsify_fx.passes.masks.fold_masks import fold_masks_inplace


def fold(model: nn.Module) -> nn.Module:
    """Return a plain copy of ``model`` with masks multiplied into the weights.

    The result is a ``torch.fx.GraphModule`` (or the partially traced module
    tree) with no mask nodes, mask modules, parametrizations or config left.
    Raises :class:`FoldError` if ``model`` carries no masks.
    """
    model = unwrap(model)
    if not masks(model):
        raise FoldError(
            f"{type(model).__name__} has no sparsify_fx masks: it was never transformed or "
            "is folded already. Call sparsify_fx.transform(model) first, and fold once."
        )
    return fold_masks_inplace(copy.deepcopy(model))
