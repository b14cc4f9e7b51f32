"""How each op maps channel layouts, for :mod:`sparsify_fx.passes.channels.analysis`.

The op tables (which functions, methods and modules keep, zero or tie channels),
the value markers for tensors whose channels are not tracked, and the layout rules of
the ops that produce or reshape channels: Conv/Linear producers, flatten, view,
reductions, elementwise ops and concatenation (:class:`LayoutRules`, mixed into the
analyzer). Read-only: nothing here mutates the graph.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from sparsify_fx.mask import MaskSet

from sparsify_fx.passes.channels.graph_types import Layout, Producer

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


class Opaque:
    """A tensor whose channels are not tracked (model input, constants, unknown ops)."""

    def __repr__(self) -> str:
        return "OPAQUE"


class NonTensor:
    """A python value (sizes, shapes, dims) that carries no channels."""

    def __repr__(self) -> str:
        return "NONTENSOR"


OPAQUE = Opaque()
NONTENSOR = NonTensor()


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


class LayoutRules:
    """Layout rules of the ops that create or reshape channels. Mixed into the channel
    analyzer, whose state they use: ``gm``, ``masked``, ``producers``, ``whole_ids`` and
    its helpers ``val``, ``reject``, ``tie``, ``new_ids``, ``layouts_in``."""

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
