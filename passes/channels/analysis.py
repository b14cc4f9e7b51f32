"""Channel dependency analysis over a traced model (read-only; nothing is mutated).

Every output channel of a Conv/Linear call (a *producer*) gets an integer id.
Each tensor value in the graph carries a :class:`Layout`: the id of every
channel along its channel dimension. Ops map layouts:

* BatchNorm, activations, pooling, dropout, flatten and spatial reductions keep
  the layout (flatten into a Linear repeats each channel over its block of
  features); ``torch.cat`` on the channel dim concatenates layouts;
* residual ``add``/``mul`` tie the channels of their inputs position by position;
* depthwise and grouped convs tie each conv group's input channels to its
  output channels (a conv group is removed as a unit).

Tied ids are connected components of a networkx graph; producers sharing a
component form one :class:`ChannelGroup` (one score vector). A channel id is
*whole* (never removed) when it reaches the model output, comes from a layer
without a mask (excluded by the user), meets an op this analysis does not
understand (named in :attr:`ChannelGraph.unsupported`), or may be non-zero
where a Conv/Linear consumes it while pruned (e.g. straight after a sigmoid).

Here: the walk over the graph (dispatch per node kind) and the grouping of tied ids;
the op tables and the layout rules of each op live in
:mod:`~sparsify_fx.passes.channels.layout_rules`.

Zero contract: a pruned channel is exactly zero wherever it is consumed,
because the coupling pass gates producer weights *and biases* and every
BatchNorm's weight and bias on it (``Layout.zero`` tracks this).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import networkx as nx
import numpy as np
import torch
from torch import fx, nn

from sparsify_fx.mask import MaskSet

from sparsify_fx.passes.channels import attention_heads
from sparsify_fx.passes.aten.channel_walk import AtenChannelWalk
from sparsify_fx.passes.channels.layout_rules import (ADD_OPS, BINARY_METHODS, CONV_FUNCS, DIV_OPS, LINEAR_FUNCS,
                                   MUL_OPS, NONTENSOR, NONZERO_FUNCS, NONZERO_METHODS,
                                   NONZERO_MODULES, NORM_TYPES, OPAQUE, REDUCE_FUNCS,
                                   REDUCE_METHODS, SHAPE_METHODS, ZERO_KEEPING_FUNCS,
                                   ZERO_KEEPING_METHODS, ZERO_KEEPING_MODULES, LayoutRules,
                                   Opaque, weight_source)
from sparsify_fx.passes.channels.graph_types import AttentionSite, ChannelGraph, ChannelGroup, Layout, NormSite, Producer

#: ``kind`` of the masks that gate a consumer's input columns
COLUMNS = "columns"


class _Analyzer(LayoutRules):
    """One walk over ``gm``: the layout of every value, producers, ties and whole ids."""

    def __init__(self, gm: fx.GraphModule, masked: set[str]) -> None:
        self.gm = gm
        self.masked = masked  # weight names whose producer may be pruned
        self.n_ids = 0
        self.owner: list[int] = []  # per id: producer index, -1 none
        self.whole_ids: set[int] = set()
        self.edges: list[tuple[int, int]] = []
        self.producers: dict[str, Producer] = {}
        self.norms: dict[str, NormSite] = {}
        self.state: dict[str, Any] = {}
        self.unsupported: list[str] = []
        self.attention: dict[str, AttentionSite] = {}
        self.calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1

    # -- helpers ----------------------------------------------------------------
    def new_ids(self, n: int, owner: int) -> np.ndarray:
        ids = np.arange(self.n_ids, self.n_ids + n, dtype=np.int64)
        self.n_ids += n
        self.owner.extend([owner] * n)
        return ids

    def val(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.state.get(arg.name, OPAQUE)
        if isinstance(arg, (list, tuple)):
            return [self.val(a) for a in arg]
        if isinstance(arg, (int, float, bool)) or arg is None:
            return NONTENSOR
        return OPAQUE

    def layouts_in(self, obj: Any) -> list[Layout]:
        if isinstance(obj, Layout):
            return [obj]
        if isinstance(obj, (list, tuple)):
            return [lay for o in obj for lay in self.layouts_in(o)]
        return []

    def make_whole(self, obj: Any) -> None:
        for lay in self.layouts_in(obj):
            self.whole_ids.update(int(i) for i in lay.ids)

    def reject(self, node: fx.Node, why: str) -> Opaque:
        """Unsupported pattern: every tracked input channel stays whole."""
        values = [self.val(a) for a in (*node.args, *node.kwargs.values())]
        if self.layouts_in(values):
            self.unsupported.append(f"{node.name} ({node.op} {_target_name(node)}): {why}")
            self.make_whole(values)
        return OPAQUE

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        self.edges.extend(zip(a.tolist(), b.tolist()))

    # -- ops ----------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.state[node.name] = self.visit(node)

    def visit(self, node: fx.Node) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return OPAQUE
        if node.op == "output":
            self.make_whole(self.val(node.args))
            return NONTENSOR
        if node.op == "call_module":
            if str(node.target).startswith(MaskSet.ATTRIBUTE + "."):
                return OPAQUE
            return self.call_module(node, self.gm.get_submodule(str(node.target)))
        if node.op == "call_method":
            return self.call_method(node)
        return self.call_function(node)

    def call_module(self, node: fx.Node, mod: nn.Module) -> Any:
        x = self.val(node.args[0]) if node.args else OPAQUE
        if isinstance(mod, NORM_TYPES):
            if isinstance(x, Layout):
                if x.mult != 1 or len(x.ids) != mod.num_features:
                    return self.reject(node, "BatchNorm width does not match its input channels")
                if self.calls.get(str(node.target), 0) > 1:
                    return self.reject(node, "BatchNorm module called at several places")
                self.norms[node.name] = NormSite(node.name, str(node.target), x.ids)
                zero = np.full(len(x.ids), bool(mod.affine))
                return x.with_(zero=zero)
            return OPAQUE
        if isinstance(mod, ZERO_KEEPING_MODULES) or type(mod).__name__ == "StochasticDepth":
            return x if isinstance(x, (Layout, Opaque)) else OPAQUE
        if isinstance(mod, NONZERO_MODULES):
            return x.with_(zero=np.zeros_like(x.zero)) if isinstance(x, Layout) else OPAQUE
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, x, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.MultiheadAttention):
            return attention_heads.visit_mha(self, node, mod)
        return self.reject(node, f"module type {type(mod).__name__} is not understood")

    def call_method(self, node: fx.Node) -> Any:
        name = str(node.target)
        x = self.val(node.args[0])
        if name in SHAPE_METHODS:
            return NONTENSOR
        if name in ZERO_KEEPING_METHODS:
            return x
        if name in NONZERO_METHODS:
            return x.with_(zero=np.zeros_like(x.zero)) if isinstance(x, Layout) else x
        if name in BINARY_METHODS:
            return self.binary(node, BINARY_METHODS[name], x, self.val(node.args[1]))
        if name in REDUCE_METHODS:
            return self.reduce(node, x)
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, start, end)
        if name in ("view", "reshape"):
            return self.view(node, x)
        if not isinstance(x, Layout) and not self.layouts_in(self.val(node.args)):
            return NONTENSOR if x is NONTENSOR else OPAQUE
        return self.reject(node, f"tensor method .{name}() is not understood")

    def call_function(self, node: fx.Node) -> Any:
        t = node.target
        args = node.args
        if t in CONV_FUNCS:
            return self.conv(node, CONV_FUNCS[t])
        if t in LINEAR_FUNCS:
            return self.linear(node)
        if t in ZERO_KEEPING_FUNCS or getattr(t, "__name__", "") == "stochastic_depth":
            x = self.val(args[0])
            return x if isinstance(x, (Layout, Opaque)) else OPAQUE
        if t in NONZERO_FUNCS:
            x = self.val(args[0])
            return x.with_(zero=np.zeros_like(x.zero)) if isinstance(x, Layout) else OPAQUE
        if t in ADD_OPS or t in MUL_OPS or t in DIV_OPS:
            kind = "add" if t in ADD_OPS else "mul" if t in MUL_OPS else "div"
            b = args[1] if len(args) > 1 else node.kwargs.get("other")
            return self.binary(node, kind, self.val(args[0]), self.val(b))
        if getattr(t, "__name__", "") in attention_heads.WINDOW_FUNCTIONS:
            return attention_heads.visit_window(self, node)
        if t in (torch.cat, torch.concat):
            return self.cat(node)
        if t is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, self.val(args[0]), start, end)
        if t in REDUCE_FUNCS:
            return self.reduce(node, self.val(args[0]))
        if t is getattr or (t is operator.getitem and self.val(args[0]) is NONTENSOR):
            return NONTENSOR
        values = self.val(list(args) + list(node.kwargs.values()))
        if not self.layouts_in(values):
            flat = [v for v in values if not isinstance(v, list)]
            if all(v is NONTENSOR for v in flat) and getattr(t, "__module__", "") in (
                    "_operator", "operator", "builtins"):
                return NONTENSOR
            return OPAQUE
        return self.reject(node, "function is not understood")


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def is_aten(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is an ATen graph (a torch.export capture)."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               for n in gm.graph.nodes)


def analyze_channels(gm: fx.GraphModule, masked: set[str] | None = None,
                     gated: Callable[[str], bool] | None = None) -> ChannelGraph:
    """Channel dependency groups of ``gm``: a module graph (torch.fx) or an ATen graph
    (a torch.export capture, walked by :mod:`~sparsify_fx.passes.aten.channel_walk`).

    ``masked``: qualified weight names whose producers may lose channels
    (default: every weight reached through a mask node). ``gated`` (ATen graphs):
    weights whose input columns may be gated, so an input that is not exactly zero
    when pruned need not stay whole (default: those behind a ``"columns"`` mask node,
    as :func:`~sparsify_fx.passes.channels.couple.couple_channels` left them). Read-only.
    """
    if masked is None:
        masked = {w for n in gm.graph.nodes for w in [weight_source(gm, n)[0]]
                  if n.op == "call_module" and w is not None}
    if is_aten(gm):
        if gated is None:
            with_columns = column_gated_weights(gm)
            gated = with_columns.__contains__
        walk = AtenChannelWalk(gm, masked, gated).run()
        return group_channels(walk.n_ids, walk.owner, walk.whole, walk.edges, walk.producers,
                              walk.norms, {}, walk.unsupported, {})
    an = _Analyzer(gm, masked)
    an.run()
    return group_channels(an.n_ids, an.owner, an.whole_ids, an.edges, an.producers, an.norms,
                          {k: v for k, v in an.state.items() if isinstance(v, Layout)},
                          an.unsupported, an.attention)


def column_gated_weights(gm: fx.GraphModule) -> frozenset[str]:
    """Weights whose get_attr feeds a ``"columns"`` mask node (input columns gated)."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(MaskSet.ATTRIBUTE + "."):
            mask = gm.get_submodule(str(node.target))
            weight = weight_source(gm, node)[0]
            if getattr(mask, "kind", "") == COLUMNS and weight is not None:
                out.add(weight)
    return frozenset(out)


def group_channels(n_ids: int, owner_of: list[int], whole_ids: set[int],
                   edges: list[tuple[int, int]], producers: dict[str, Producer],
                   norms: dict[str, NormSite], layouts: dict[str, Layout],
                   unsupported: list[str], attention: dict[str, AttentionSite]) -> ChannelGraph:
    """Tied ids -> components -> groups (one score vector per set of producers sharing
    components), whichever walk found them. ``owner_of[id]``: producer index, -1 none."""
    g = nx.Graph()
    g.add_nodes_from(range(n_ids))
    g.add_edges_from(edges)
    component = np.full(n_ids, -1, dtype=np.int64)
    comps = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: c[0])
    owner = np.asarray(owner_of, dtype=np.int64)
    whole = np.zeros(n_ids, dtype=bool)
    whole[list(whole_ids)] = True
    prunable = np.zeros(len(comps), dtype=bool)
    owners = nx.Graph()
    names = list(producers)
    for ci, ids in enumerate(comps):
        component[ids] = ci
        prunable[ci] = not whole[ids].any() and (owner[ids] >= 0).all()
        if prunable[ci]:
            members = sorted(set(owner[ids].tolist()))
            owners.add_nodes_from(members)
            owners.add_edges_from(zip(members[:-1], members[1:]))
    group_of = np.full(len(comps), -1, dtype=np.int64)
    slot_of = np.full(len(comps), -1, dtype=np.int64)
    groups: list[ChannelGroup] = []
    comp_owner = {ci: int(owner[ids[0]]) for ci, ids in enumerate(comps) if prunable[ci]}
    ordered = sorted(nx.connected_components(owners), key=min)
    for gi, members in enumerate(ordered):
        cs = np.array(sorted(ci for ci, o in comp_owner.items() if o in members), dtype=np.int64)
        group_of[cs] = gi
        slot_of[cs] = np.arange(len(cs))
        groups.append(ChannelGroup(gi, [names[i] for i in sorted(members)], cs))
    return ChannelGraph(n_ids, producers, norms, layouts, component, prunable, group_of,
                        slot_of, groups, unsupported, attention)


__all__ = ["analyze_channels", "group_channels", "weight_source", "ChannelGraph", "OPAQUE", "NONTENSOR",
           "CONV_FUNCS", "LINEAR_FUNCS"]
