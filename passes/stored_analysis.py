"""Analyses computed once per model and kept on the graph (``gm.meta``).

Like ``torch.fx.passes.shape_prop`` writes ``node.meta["tensor_meta"]``, the channel
analysis of a coupled model is computed once (at the end of channel coupling, in
``transform``) and stored in ``gm.meta``; budgets, the CS controller, the cost model
and ``shrink`` read it from there. ``copy.deepcopy`` of a GraphModule keeps
``meta``, so a copy reads the same analysis. It is recomputed only when the set
of coupled weights or the input shapes it was made for have changed (masks edited
after transform, or shape propagation run with other inputs).

The dense MACs of every node (the one counter, :mod:`~sparsify_fx.passes.macs.count`)
are kept the same way: ``transform(..., example_inputs=x)`` counts once
(:class:`CountWeightMacs`), and :func:`weight_macs_of` on inputs of the same shapes reads
the nodes' ``node.meta["sparsify_macs"]`` without running the model.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import fx, nn

from sparsify_fx.mask import Mask
from sparsify_fx.mask_index import masks, unwrap

from sparsify_fx.passes.channels.graph_types import ChannelGraph
from sparsify_fx.passes.macs.count import COUNTED_META, MACS_META, count_macs, counted_key, dense_weights, input_shapes
from sparsify_fx.passes.pass_base import PassResult, SparsifyPass

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
    from sparsify_fx.passes.channels.analysis import analyze_channels  # channel_analysis imports this package lazily

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


def weight_macs_of(model: nn.Module, inputs: Sequence[Any]) -> dict[str, int]:
    """Dense MACs charged to each weight by one run of ``model(*inputs)``, every mask seen
    as identity (names as in :func:`~sparsify_fx.passes.macs.count.dense_weights`; weights
    the run never multiplies with are absent).

    On a GraphModule whose nodes were counted for these input shapes and this graph
    (e.g. by ``transform(..., example_inputs=...)``), reads the stored per-node MACs
    and runs nothing; otherwise runs the counter once (it stores them: ``node.meta``,
    ``gm.meta``). Other models (partial traces, torch.export captures) are counted at
    each call. InputError if the model fails on ``inputs``.
    """
    model = unwrap(model)
    inputs = tuple(inputs)
    weights, pairs = dense_weights(model)
    if not isinstance(model, fx.GraphModule):
        return {n: u.dense_macs for n, u in count_macs(model, inputs, weights, pairs).weights.items()}
    shapes = input_shapes(inputs)
    stored = (model.meta.get(COUNTED_META) == counted_key(model, inputs, weights)
              and _input_shapes(model)[:len(shapes)] == shapes  # ShapeProp may have run since
              and all(MACS_META in n.meta for n in model.graph.nodes))  # lost when pickled
    if not stored:
        count_macs(model, inputs, weights, pairs)
    out: dict[str, int] = {}
    for node in model.graph.nodes:
        record = node.meta.get(MACS_META)
        for name, macs in (record.weights.items() if record is not None else ()):
            out[name] = out.get(name, 0) + macs
    return out


class CountWeightMacs(SparsifyPass):
    """``CountWeightMacs(inputs)(gm)``: count ``gm``'s dense MACs on ``inputs`` once and store
    them on its nodes (see :func:`weight_macs_of`); ``.macs`` holds the per-weight result.
    A module that is not a GraphModule is left alone (nothing to store on). Writes only
    ``node.meta`` and ``gm.meta``; ``modified`` is False."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        self.inputs = tuple(inputs)
        self.macs: dict[str, int] = {}

    def call(self, graph_module: nn.Module) -> PassResult:  # type: ignore[override]
        if isinstance(graph_module, fx.GraphModule):
            self.macs = weight_macs_of(graph_module, self.inputs)
        return PassResult(graph_module, False)


__all__ = ["CHANNEL_GRAPH_META", "coupled_producers", "channel_graph_of", "weight_macs_of",
           "CountWeightMacs"]
