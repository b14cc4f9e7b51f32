"""Find the prunable weights of a traced model and how each one can be masked.

A weight is prunable when its owner *in the original model* is a Conv,
ConvTranspose or Linear (``.weight``) or a MultiheadAttention input projection
(``in_proj_weight`` / ``q|k|v_proj_weight``). Owner types are looked up in the
original model because a GraphModule turns submodules reached only through
``get_attr`` into plain ``nn.Module``.

Route ``"graph"``: the weight reaches the graph through ``get_attr`` nodes; a
mask node goes after them. Route ``"parametrize"``: the weight lives inside a
leaf module (or a module no graph covers); it is masked by parametrization.
Nothing is mutated here.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Sequence

from torch import fx, nn

from .trace import TRACED_THROUGH

ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def weight_kind(owner: nn.Module, attr: str) -> str | None:
    """Op kind of ``owner.<attr>`` if it is prunable, else None."""
    if isinstance(owner, nn.MultiheadAttention):
        return "attention_in_proj" if attr in ATTENTION_WEIGHTS else None
    if attr != "weight" or not isinstance(owner, TRACED_THROUGH):
        return None
    if isinstance(owner, nn.Linear):
        return "linear"
    if isinstance(owner, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "conv_transpose"
    groups = getattr(owner, "groups", 1)
    if groups > 1 and groups == owner.in_channels:
        return "depthwise_conv"
    return "grouped_conv" if groups > 1 else "conv"


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Qualified names of every prunable weight in a plain module (module order)."""
    names = []
    for path, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param is not None and weight_kind(module, attr) is not None:
                names.append(f"{path}.{attr}" if path else attr)
    return names


@dataclass
class WeightSite:
    """One prunable weight.

    ``name``: qualified name in the original model. ``host``: the module holding
    the weight in the transformed tree, ``host_path`` its path there, ``attr``
    the parameter name. ``nodes``: get_attr nodes (route "graph" only) in the
    GraphModule ``graph_module``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    route: str
    host: nn.Module
    attr: str
    graph_module: fx.GraphModule | None = None
    nodes: list[fx.Node] = field(default_factory=list)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def find_weight_sites(root: nn.Module, original: nn.Module,
                      graphs: dict[str, fx.GraphModule]) -> list[WeightSite]:
    """List prunable weights of ``root`` (graph order first, then leaf order).

    ``graphs`` maps a path in ``root`` (``""`` for the root itself) to the
    GraphModule traced there; ``original`` is an untouched copy with the same
    paths, used to look owner types up.
    """
    sites: dict[str, WeightSite] = {}
    for prefix, gm in graphs.items():
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            owner_path, _, attr = node.target.rpartition(".")
            try:
                owner = original.get_submodule(_join(prefix, owner_path))
            except AttributeError:
                continue
            kind = weight_kind(owner, attr)
            if kind is None:
                continue
            name = _join(prefix, node.target)
            if name in sites:
                sites[name].nodes.append(node)
                continue
            host = gm.get_submodule(owner_path)
            sites[name] = WeightSite(name, kind, tuple(getattr(host, attr).shape), "graph",
                                     host, attr, gm, [node])
    for path, module in root.named_modules(remove_duplicate=True):
        for attr, param in module.named_parameters(recurse=False):
            name = _join(path, attr)
            if name in sites or param is None:
                continue
            try:
                owner = original.get_submodule(path)
            except AttributeError:
                owner = module
            kind = weight_kind(owner, attr)
            if kind is not None:
                sites[name] = WeightSite(name, kind, tuple(param.shape), "parametrize", module, attr)
    return list(sites.values())


def select_sites(sites: list[WeightSite], include: Sequence[str] | None,
                 exclude: Sequence[str] | None, keep_first: bool,
                 keep_last: bool) -> list[WeightSite]:
    """Apply name globs (matched against the weight name and its module path)."""
    def matches(site: WeightSite, patterns: Sequence[str]) -> bool:
        module_path = site.name.rpartition(".")[0]
        return any(fnmatch.fnmatchcase(site.name, p) or fnmatch.fnmatchcase(module_path, p)
                   for p in patterns)

    chosen = list(sites)
    if keep_first and chosen:
        chosen = chosen[1:]
    if keep_last and chosen:
        chosen = chosen[:-1]
    if include:
        chosen = [s for s in chosen if matches(s, include)]
    if exclude:
        chosen = [s for s in chosen if not matches(s, exclude)]
    return chosen
