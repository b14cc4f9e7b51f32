"""Analyses computed once per model and kept on the graph (``gm.meta``).

Like ``torch.fx.passes.shape_prop`` writes ``node.meta["tensor_meta"]``, the channel
analysis of a coupled model is computed once (at the end of channel coupling, in
``transform``) and stored in ``gm.meta``; budgets, the CS controller, the cost model
and ``shrink`` read it from there. ``copy.deepcopy`` of a GraphModule keeps
``meta``, so a copy reads the same analysis. It is recomputed only when the set
of coupled weights or the input shapes it was made for have changed (masks edited
after transform, or shape propagation run with other inputs).
"""
from __future__ import annotations

from torch import fx

from sparsify_fx.mask import Mask
from sparsify_fx.mask_index import masks

from .channel_types import ChannelGraph

#: ``gm.meta`` key of the stored ``{(coupled weights, input shapes): ChannelGraph}``
CHANNEL_GRAPH_META = "sparsify_channel_graph"


def coupled_producers(gm: fx.GraphModule) -> dict[str, Mask]:
    """``{weight: coupled channel mask}`` for every weight whose output channels may be
    removed: graph-route weights by their get_attr target, attention in-projections
    (parametrized) by name. Read-only."""
    out: dict[str, Mask] = {}
    for e in masks(gm):
        if e.mask.auxiliary or not hasattr(e.mask, "sources"):
            continue
        if e.route == "graph" and e.node is not None:
            out[str(e.node.args[0].target)] = e.mask
        elif e.route == "parametrize":
            out[e.name] = e.mask
    return out


def channel_graph_of(gm: fx.GraphModule, coupled: frozenset[str] | None = None) -> ChannelGraph:
    """The stored channel analysis of ``gm`` for the weights ``coupled`` (default: every
    :func:`coupled_producers` weight), computed and stored on first use. Mutates
    ``gm.meta`` only.

    The MACs cost model analyses the graph-route weights alone (attention heads add
    their own MAC units there), shrink every coupled weight: each set is stored once.
    """
    from .channel_analysis import analyze_channels  # channel_analysis imports this package lazily

    if coupled is None:
        coupled = frozenset(coupled_producers(gm))
    # the analysis reads shapes where ShapeProp left them (attention MACs per channel pair
    # depend on the token count): the input shapes are part of what it was computed for
    key = (coupled, _input_shapes(gm))
    stored: dict[tuple, ChannelGraph] = gm.meta.setdefault(CHANNEL_GRAPH_META, {})
    if key not in stored:
        stored[key] = analyze_channels(gm, set(coupled))
    return stored[key]


def _input_shapes(gm: fx.GraphModule) -> tuple:
    """Shapes ShapeProp recorded on the placeholders (None where it has not run)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            meta = node.meta.get("tensor_meta")
            out.append(tuple(meta.shape) if hasattr(meta, "shape") else None)
    return tuple(out)


__all__ = ["CHANNEL_GRAPH_META", "coupled_producers", "channel_graph_of"]
