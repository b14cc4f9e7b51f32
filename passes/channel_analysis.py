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

Zero contract: a pruned channel is exactly zero wherever it is consumed,
because the coupling pass gates producer weights *and biases* and every
BatchNorm's weight and bias on it (``Layout.zero`` tracks this).
"""
from __future__ import annotations

import operator
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from sparsify_fx.mask import MaskSet

from . import attention_heads
from .channel_types import AttentionSite, ChannelGraph, ChannelGroup, Layout, NormSite, Producer

CONV_FUNCS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
              F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
LINEAR_FUNCS = {torch._C._nn.linear, F.linear}
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: per-channel ops with f(0) == 0 (a pruned, zero channel stays zero)
ZERO_KEEPING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Tanh,
    nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
ZERO_KEEPING_FUNCS = {
    F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu, F.mish,
    torch.tanh, F.dropout, F.dropout2d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool2d, torch.nn.functional.hardtanh,
}
ZERO_KEEPING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "float", "to", "detach"}
NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
NONZERO_FUNCS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
NONZERO_METHODS = {"sigmoid", "sigmoid_"}
ADD_OPS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
MUL_OPS = {operator.mul, operator.imul, torch.mul}
DIV_OPS = {operator.truediv, operator.itruediv, torch.div}
BINARY_METHODS = {"add": "add", "add_": "add", "sub": "add", "sub_": "add",
                  "mul": "mul", "mul_": "mul", "div": "div", "div_": "div"}
REDUCE_FUNCS = {torch.mean, torch.sum, torch.amax}
REDUCE_METHODS = {"mean", "sum", "amax"}
SHAPE_METHODS = {"size", "dim", "numel"}


class _Opaque:
    """A tensor whose channels are not tracked (model input, constants, unknown ops)."""

    def __repr__(self) -> str:
        return "OPAQUE"


class _NonTensor:
    """A python value (sizes, shapes, dims) that carries no channels."""

    def __repr__(self) -> str:
        return "NONTENSOR"


OPAQUE = _Opaque()
NONTENSOR = _NonTensor()


def weight_source(gm: fx.GraphModule, arg: Any) -> tuple[str | None, str | None]:
    """(get_attr target, mask node name) behind a weight argument (through a mask node)."""
    if not isinstance(arg, fx.Node):
        return None, None
    if arg.op == "call_module" and str(arg.target).startswith(MaskSet.ATTRIBUTE + "."):
        inner = arg.args[0]
        return (str(inner.target) if isinstance(inner, fx.Node) and inner.op == "get_attr"
                else None), arg.name
    if arg.op == "get_attr":
        return str(arg.target), None
    return None, None


class _Analyzer:
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

    def reject(self, node: fx.Node, why: str) -> _Opaque:
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
            return x if isinstance(x, (Layout, _Opaque)) else OPAQUE
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
            return x if isinstance(x, (Layout, _Opaque)) else OPAQUE
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

    # -- producers ------------------------------------------------------------------
    def _producer(self, node: fx.Node, kind: str, x: Any, in_ids: np.ndarray | None,
                  groups: int) -> tuple[Producer, int] | None:
        weight, mask_node = weight_source(self.gm, node.args[1])
        bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias, _ = weight_source(self.gm, bias_arg)
        if weight is None:
            return None
        shape = tuple(int(s) for s in self.gm.get_parameter(weight).shape)
        out = shape[0]
        index = len(self.producers)
        prunable = weight in self.masked and mask_node is not None
        ids = self.new_ids(out, index if prunable else -1)
        if not prunable:
            self.whole_ids.update(ids.tolist())
        prod = Producer(node.name, weight, bias, mask_node, kind, groups, ids, in_ids, shape)
        self.producers[node.name] = prod
        return prod, out

    def conv(self, node: fx.Node, nd: int) -> Any:
        x = self.val(node.args[0])
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if not isinstance(groups, int):
            return self.reject(node, "conv groups is not a constant int")
        if isinstance(x, Layout) and (x.mult != 1 or (x.rank is not None and x.rank != nd + 2)
                                      or x.cdim != -(nd + 1)):
            return self.reject(node, "conv input channels are not on dim 1")
        lay_in = x if isinstance(x, Layout) else None
        weight, _ = weight_source(self.gm, node.args[1])
        if weight is None:
            return self.reject(node, "conv weight does not come from a parameter")
        if lay_in is not None and len(lay_in.ids) != self.gm.get_parameter(weight).shape[1] * groups:
            return self.reject(node, "conv in_channels do not match the input's channels")
        made = self._producer(node, "conv", x, None if lay_in is None else lay_in.ids, groups)
        assert made is not None
        prod, out = made
        if lay_in is not None:
            self._check_consumed(lay_in, lay_in.ids)
            if groups > 1:
                cin, cout = len(lay_in.ids) // groups, out // groups
                for g in range(groups):
                    members = np.concatenate([lay_in.ids[g * cin:(g + 1) * cin],
                                              prod.out_ids[g * cout:(g + 1) * cout]])
                    self.tie(members[:-1], members[1:])
        elif groups > 1:
            self.whole_ids.update(prod.out_ids.tolist())
        return Layout(prod.out_ids, np.ones(out, dtype=bool), -(nd + 1), nd + 2, 1)

    def linear(self, node: fx.Node) -> Any:
        x = self.val(node.args[0])
        weight, _ = weight_source(self.gm, node.args[1])
        if weight is None:
            return self.reject(node, "linear weight does not come from a parameter")
        in_features = int(self.gm.get_parameter(weight).shape[1])
        in_ids = None
        if isinstance(x, Layout):
            if x.cdim != -1:
                return self.reject(node, "linear input channels are not on the last dim")
            mult = x.mult if x.mult is not None else in_features // max(len(x.ids), 1)
            if mult < 1 or len(x.ids) * mult != in_features:
                return self.reject(node, "linear in_features is not a whole multiple of the "
                                   "flattened channels")
            in_ids = np.repeat(x.ids, mult)
            self._check_consumed(x, x.ids)
        made = self._producer(node, "linear", x, in_ids, 1)
        assert made is not None
        prod, out = made
        rank = x.rank if isinstance(x, Layout) else None
        return Layout(prod.out_ids, np.ones(out, dtype=bool), -1, rank, 1)

    def _check_consumed(self, lay: Layout, ids: np.ndarray) -> None:
        """A consumer mixes channels: a pruned channel that may be non-zero stays whole."""
        self.whole_ids.update(int(i) for i in ids[~lay.zero])

    # -- shape-changing ops ------------------------------------------------------------
    def flatten(self, node: fx.Node, x: Any, start: Any, end: Any) -> Any:
        if not isinstance(x, Layout):
            return x
        if x.rank is None or not isinstance(start, int) or not isinstance(end, int):
            return self.reject(node, "flatten of a tensor of unknown rank")
        start = start % x.rank
        end = end % x.rank
        c = x.rank + x.cdim
        if start > c or end < c:  # channel dim untouched
            removed = end - start
            cdim = x.cdim if end < c else x.cdim + removed
            return x.with_(cdim=cdim, rank=x.rank - removed)
        if start == c and end == x.rank - 1:
            mult = 1 if c == x.rank - 1 else None
            return x.with_(cdim=-1, rank=c + 1, mult=mult if x.mult == 1 else None)
        return self.reject(node, "flatten merges the channel dim with a leading dim")

    def view(self, node: fx.Node, x: Any) -> Any:
        """Only ``x.view(x.size(0), -1)`` / ``reshape`` of that form (== flatten(1))."""
        shape = list(node.args[1:])
        if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
            shape = list(shape[0])
        first = shape[0] if shape else None
        is_batch = (isinstance(first, fx.Node) and (
            (first.op == "call_method" and first.target == "size" and first.args[1:] == (0,))
            or (first.op == "call_function" and first.target is operator.getitem
                and first.args[1] == 0)))
        if isinstance(x, Layout) and len(shape) == 2 and is_batch and shape[1] == -1:
            return self.flatten(node, x, 1, -1)
        if not isinstance(x, Layout):
            return x if x is OPAQUE else OPAQUE
        return self.reject(node, "view/reshape that may mix channels")

    def reduce(self, node: fx.Node, x: Any) -> Any:
        if not isinstance(x, Layout):
            return x
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None or x.rank is None or not isinstance(keep, bool):
            return self.reject(node, "reduction over all dims or of unknown rank")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = {d % x.rank for d in dims}
        c = x.rank + x.cdim
        if c in dims:
            return self.reject(node, "reduction over the channel dim")
        if keep:
            return x
        after = sum(1 for d in dims if d > c)
        return x.with_(cdim=x.cdim + after, rank=x.rank - len(dims))

    def binary(self, node: fx.Node, kind: str, a: Any, b: Any) -> Any:
        la, lb = isinstance(a, Layout), isinstance(b, Layout)
        if not la and not lb:
            return NONTENSOR if a is NONTENSOR and b is NONTENSOR else OPAQUE
        if la and lb:
            if (len(a.ids) != len(b.ids) or a.cdim != b.cdim or a.mult != b.mult
                    or kind == "div"):
                return self.reject(node, "elementwise op between different channel layouts")
            self.tie(a.ids, b.ids)
            zero = a.zero & b.zero if kind == "add" else a.zero | b.zero
            return a.with_(zero=zero, rank=a.rank if a.rank is not None else b.rank)
        lay, other = (a, b) if la else (b, a)
        if other is OPAQUE:
            return self.reject(node, "elementwise op with an untracked tensor (broadcast unknown)")
        if kind == "div" and not la:
            return self.reject(node, "division by a channel tensor")
        scalar = node.args[1] if la else node.args[0]
        if kind == "add" and not (isinstance(scalar, (int, float)) and scalar == 0):
            return lay.with_(zero=np.zeros_like(lay.zero))
        return lay

    def cat(self, node: fx.Node) -> Any:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        vals = [self.val(t) for t in tensors]
        if not all(isinstance(v, Layout) for v in vals):
            return self.reject(node, "concatenation with untracked tensors") \
                if self.layouts_in(vals) else OPAQUE
        first = vals[0]
        rank = next((v.rank for v in vals if v.rank is not None), None)
        if not isinstance(dim, int) or (dim >= 0 and rank is None):
            return self.reject(node, "concatenation dim unknown")
        d = dim - rank if dim >= 0 else dim
        if any(v.cdim != first.cdim or v.mult != 1 for v in vals):
            return self.reject(node, "concatenated tensors have different channel dims")
        if d == first.cdim:
            return Layout(np.concatenate([v.ids for v in vals]),
                          np.concatenate([v.zero for v in vals]), first.cdim, rank, 1)
        if any(len(v.ids) != len(first.ids) for v in vals):
            return self.reject(node, "concatenation along another dim of different widths")
        for v in vals[1:]:
            self.tie(first.ids, v.ids)
        return first.with_(zero=np.logical_and.reduce([v.zero for v in vals]), rank=rank)


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def analyze_channels(gm: fx.GraphModule, masked: set[str] | None = None) -> ChannelGraph:
    """Channel dependency groups of ``gm``.

    ``masked``: qualified weight names whose producers may lose channels
    (default: every weight reached through a mask node). Read-only.
    """
    if masked is None:
        masked = {w for n in gm.graph.nodes for w in [weight_source(gm, n)[0]]
                  if n.op == "call_module" and w is not None}
    an = _Analyzer(gm, masked)
    an.run()
    g = nx.Graph()
    g.add_nodes_from(range(an.n_ids))
    g.add_edges_from(an.edges)
    component = np.full(an.n_ids, -1, dtype=np.int64)
    comps = sorted((sorted(c) for c in nx.connected_components(g)), key=lambda c: c[0])
    owner = np.asarray(an.owner, dtype=np.int64)
    whole = np.zeros(an.n_ids, dtype=bool)
    whole[list(an.whole_ids)] = True
    prunable = np.zeros(len(comps), dtype=bool)
    owners = nx.Graph()
    names = list(an.producers)
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
    return ChannelGraph(an.n_ids, an.producers, an.norms,
                        {k: v for k, v in an.state.items() if isinstance(v, Layout)},
                        component, prunable, group_of, slot_of, groups, an.unsupported,
                        an.attention)
