"""Mask weights that live inside leaf modules with torch.nn.utils.parametrize.

Used for nn.MultiheadAttention (keeps its fused fast path exact), user leaf
modules, and parts of a model no graph covers. Mutates the host modules: each
``host.<attr>`` becomes ``mask(original)``; the mask module is the
parametrization itself, so ``state_dict`` keys read
``<host>.parametrizations.<attr>.0.scores``.
"""
from __future__ import annotations

from torch.nn.utils import parametrize

from sparsify_fx.mask import Mask

from .find_weights import WeightSite
from .insert_masks import MaskFactory


class ParametrizeWeights:
    """Pass over parametrize-route sites."""

    def __init__(self, make_mask: MaskFactory) -> None:
        self.make_mask = make_mask

    def run(self, sites: list[WeightSite]) -> list[Mask]:
        created = []
        for site in sites:
            if site.route != "parametrize":
                continue
            mask = self.make_mask(site)
            mask.to(getattr(site.host, site.attr).device)
            parametrize.register_parametrization(site.host, site.attr, mask, unsafe=True)
            created.append(mask)
        return created
