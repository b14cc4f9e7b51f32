"""Mask weights that live inside leaf modules with torch.nn.utils.parametrize.

Used for nn.MultiheadAttention (keeps its fused fast path exact), user leaf
modules, and parts of a model no graph covers. Mutates the host modules: each
``host.<attr>`` becomes ``mask(original)``; the mask module is the
parametrization itself, so ``state_dict`` keys read
``<host>.parametrizations.<attr>.0.scores``.
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from sparsify_fx.mask import Mask

from sparsify_fx.passes.masks.find_weights import WeightSite
from sparsify_fx.passes.masks.insert_masks import MaskFactory
from sparsify_fx.passes.pass_base import PassResult, SparsifyPass


class ParametrizeWeights(SparsifyPass):
    """Pass over parametrize-route sites: ``ParametrizeWeights(sites, make_mask)(model)``;
    the masks made are in ``.created``."""

    def __init__(self, sites: list[WeightSite], make_mask: MaskFactory) -> None:
        self.sites = sites
        self.make_mask = make_mask
        self.created: list[Mask] = []

    def call(self, graph_module: nn.Module) -> PassResult:  # type: ignore[override]
        created = []
        for site in self.sites:
            if site.route != "parametrize":
                continue
            mask = self.make_mask(site)
            mask.to(getattr(site.host, site.attr).device)
            parametrize.register_parametrization(site.host, site.attr, mask, unsafe=True)
            created.append(mask)
        self.created = created
        return PassResult(graph_module, bool(created))
