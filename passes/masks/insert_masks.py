"""Insert mask nodes: ``get_attr(weight) -> call_module(sparsify_masks.<key>) -> users``.

Mutates the GraphModules it is given (adds ``sparsify_masks`` and nodes, then
recompiles). Shapes and dtypes of the values flowing through are unchanged.
"""
from __future__ import annotations

from typing import Callable

from torch import fx, nn

from sparsify_fx.mask import Mask, MaskSet

from sparsify_fx.passes.masks.find_weights import WeightSite
from sparsify_fx.passes.pass_base import PassResult, SparsifyPass

MaskFactory = Callable[[WeightSite], Mask]


class InsertMaskNodes(SparsifyPass):
    """Graph pass: one mask module per graph-route site, one node per get_attr.

    ``InsertMaskNodes(sites, make_mask)(model) -> PassResult``; the masks made are
    in ``.created`` (site order)."""

    def __init__(self, sites: list[WeightSite], make_mask: MaskFactory) -> None:
        self.sites = sites
        self.make_mask = make_mask
        self.created: list[Mask] = []

    def call(self, graph_module: nn.Module) -> PassResult:  # type: ignore[override]
        self.created = self._insert(self.sites)
        return PassResult(graph_module, bool(self.created))

    def _insert(self, sites: list[WeightSite]) -> list[Mask]:
        created: list[Mask] = []
        touched: dict[int, fx.GraphModule] = {}
        for site in sites:
            if site.route != "graph":
                continue
            gm = site.graph_module
            assert gm is not None
            mask_set = getattr(gm, MaskSet.ATTRIBUTE, None)
            if mask_set is None:
                mask_set = MaskSet()
                gm.add_module(MaskSet.ATTRIBUTE, mask_set)
            key = MaskSet.key_for(site.name)
            while key in mask_set:
                key += "_"
            mask = self.make_mask(site)
            mask.to(getattr(site.host, site.attr).device)
            mask_set[key] = mask
            target = f"{MaskSet.ATTRIBUTE}.{key}"
            for node in site.nodes:
                users = list(node.users)
                with gm.graph.inserting_after(node):
                    masked = gm.graph.call_module(target, (node,))
                for user in users:
                    user.replace_input_with(node, masked)
            created.append(mask)
            touched[id(gm)] = gm
        for gm in touched.values():
            gm.graph.lint()
            gm.recompile()
        return created
