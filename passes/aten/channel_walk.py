"""Channel walk over ATen graphs (torch.export captures); read-only.

The module-graph walk (:mod:`~sparsify_fx.passes.channels.analysis`) tracks one
channel dimension per value. Here every tracked value carries a whole *id
tensor* of its concrete shape (int64, ``-1`` where no producer channel flows)
and a *zero tensor* (bool: this element is exactly 0 when its channel is
pruned). Shape ops (view, reshape, transpose, permute, expand, slice, cat,
split, ...) are the graph's own ATen op applied to the id tensor, so head
splitting and merging, ``repeat_kv`` (expand + reshape), fused q/k/v or
gate/up projections split by slicing, and ``rotate_half`` are followed
exactly, whatever the model's code calls them. Other rules:

* ``aten.linear`` / ``addmm`` / ``mm`` / ``matmul`` with a parameter operand
  (``(out, in)``, or ``(in, out)`` as HF ``Conv1D`` stores it) and
  ``aten.conv*`` are *producers*: new ids on their output channels;
* elementwise ops tie the ids that meet position by position (a gated MLP's
  ``act(gate) * up`` ties gate row ``i`` to up row ``i``); an operand without
  ids that varies along a dimension holding several tied sets (a per-channel
  parameter) keeps those channels whole (shrink would have to slice it);
* a view that splits the last dimension ties each new last-dim fiber: an
  attention head (``head_dim`` channels) is never split, so rotary embeddings
  stay correct;
* products of two activations (``q @ k^T``, ``attn @ v``,
  ``scaled_dot_product_attention``) tie everything one batch entry (head)
  reads: a query head, the key/value head it reads (grouped-query attention:
  all query heads of one KV head) and their value rows become one unit.
  Their MACs are recorded as ``attention_matmul`` producers;
* state-space mixers: a weight read through a view that only drops or inserts size-1
  dims (``w.squeeze(1)``) is still that weight; ``W @ x`` is a producer along ``x``'s
  dim -2; a per-channel parameter may lie along any dim (``D[None, :, None]``); an outer
  product ``a[:, c, None] * b[:, None, s]`` ties nothing (the operand with fewer ids stays
  whole); ``state @ C`` with channels down the rows only keeps them per row; ``zeros``
  and friends vary along no dim; constant ``pad`` adds positions with no channel, and
  ``tril`` / ``triu`` over positions keep ids;
* reductions (softmax, mean, norms) over one tied set are fine (a head's
  softmax); over several sets they keep those channels whole (a LayerNorm or
  RMSNorm over the residual stream: it stays dense), ``sum`` ties them;
* ids reaching the output, an unknown op, or a producer input where they may
  be non-zero while pruned stay whole (named in ``unsupported`` for unknown ops).

Concrete sizes come from each node's ``meta["val"]`` (symbolic dims at their
example hints). Result: :class:`AtenWalk`, grouped by
:func:`~sparsify_fx.passes.channels.analysis.analyze_channels`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import fx

from sparsify_fx.mask import MaskSet
from sparsify_fx.passes.aten.einsum import visit_einsum
from sparsify_fx.passes.aten.elementwise import ElementwiseRules
from sparsify_fx.passes.aten.embeddings import drop_whole_embeddings, visit_embedding
from sparsify_fx.passes.aten.grouped import heads_last
from sparsify_fx.passes.aten.experts import EXPERT_OPS, clamp_keeps_zero, visit_expert_op
from sparsify_fx.passes.aten.op_tables import (BATCH_NORM, BINARY, CONV, IDENTITY_OPS, MATMUL,
                                               NO_CHANNELS, NONZERO_UNARY, NORMALIZE, REDUCE, SDPA,
                                               SHAPE_OPS, UNIFORM_OPS, ZERO_KEEPING)
from sparsify_fx.passes.aten.producers import visit_matmul, visit_sdpa
from sparsify_fx.passes.aten.special_ops import SpecialOpRules
from sparsify_fx.passes.aten.values import (ParamRef, Tracked, Uniform, concrete_shape, hint,
                                            op_name)
from sparsify_fx.passes.channels.graph_types import NormSite, Producer

aten = torch.ops.aten


@dataclass
class AtenWalk:
    """What the walk found, for the grouping in ``analyze_channels``."""

    n_ids: int
    owner: list[int]
    whole: set[int]
    edges: list[tuple[int, int]]
    producers: dict[str, Producer]
    norms: dict[str, NormSite] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)


class _DSU:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> None:
        self.parent.extend(range(len(self.parent), len(self.parent) + n))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.find(int(i)) for i in ids], dtype=np.int64)


def _pieces_selected(node: fx.Node, rank: int) -> bool:
    """Every use of a split view picks one piece along the new dim before the last
    (``h.view(b, t, 2, -1)`` then ``select(-2, 0)`` / ``select(-2, 1)``: a chunk of a fused
    gate/up, no head), so no op reads a fibre as a unit. Only a split into two dims
    counts: ``view(b, t, heads, 3, head_dim)`` then ``select`` still splits heads."""
    users = list(node.users)
    return bool(users) and all(
        u.op == "call_function" and op_name(u.target) == "select"
        and int(u.args[1]) % rank == rank - 2 for u in users)


class AtenChannelWalk(ElementwiseRules, SpecialOpRules):
    """One walk over an ATen ``gm``; ``masked``: weight names whose rows may be removed."""

    UNTRACKED = 0  # one whole id stands for "no producer channel" in emitted id arrays

    def __init__(self, gm: fx.GraphModule, masked: set[str],
                 gated: Callable[[str], bool] | None = None) -> None:
        self.gm = gm
        self.masked = masked
        #: weights whose input columns may be gated (see ``producers._input_ids``)
        self.gated: Callable[[str], bool] = gated or (lambda weight: False)
        self.dsu = _DSU()
        self.owner: list[int] = []
        self.whole: set[int] = set()
        self.producers: dict[str, Producer] = {}
        self.norms: dict[str, NormSite] = {}
        self.unsupported: list[str] = []
        self.values: dict[str, Any] = {}
        self.weight_uses: dict[str, tuple] = {}  # weight -> its first call's (out, in) ids
        self.region = False  # walking inside a no-grad region's subgraph
        self.current: str | None = None  # the node being visited (named in warnings)
        self._embedding_nodes: list[str] = []  # embedding tables made producers
        self.gathered_sites: dict[str, torch.Tensor] = {}  # table -> its columns' ids
        self.new_ids(1, -1)  # id 0: UNTRACKED
        self.whole.add(self.UNTRACKED)

    # -- ids ------------------------------------------------------------------------
    def new_ids(self, n: int, owner: int) -> torch.Tensor:
        start = len(self.owner)
        self.owner.extend([owner] * n)
        self.dsu.add(n)
        return torch.arange(start, start + n, dtype=torch.long)

    def tie_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        both = (a >= 0) & (b >= 0) & (a != b)
        if both.any():
            pairs = torch.unique(torch.stack([a[both], b[both]], 1), dim=0)
            for x, y in pairs.tolist():
                self.dsu.union(x, y)

    def tie_all(self, ids: torch.Tensor) -> None:
        flat = torch.unique(ids[ids >= 0])
        for x in flat[1:].tolist():
            self.dsu.union(int(flat[0]), x)

    def all_whole(self, ids: torch.Tensor) -> bool:
        """Every tracked id in ``ids`` (``-1``: none) is already kept whole (nothing
        prunable flows there)."""
        return set(torch.unique(ids[ids >= 0]).tolist()) <= self.whole

    def make_whole(self, values: Any) -> None:
        for v in self._tracked_in(values):
            self.whole.update(torch.unique(v.ids[v.ids >= 0]).tolist())

    def _tracked_in(self, obj: Any) -> list[Tracked]:
        if isinstance(obj, Tracked):
            return [obj]
        if isinstance(obj, (list, tuple)):
            return [t for o in obj for t in self._tracked_in(o)]
        return []

    def n_components(self, ids: torch.Tensor) -> int:
        flat = torch.unique(ids[ids >= 0]).numpy()
        return len(set(self.dsu.roots(flat).tolist())) if len(flat) else 0

    # -- values ---------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple[int, ...]:
        shape = concrete_shape(node)
        if shape is None:
            raise TypeError(f"{node.name} has no tensor value")
        return shape

    def value(self, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.values.get(arg.name)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return hint(arg)

    def concrete(self, arg: Any) -> Any:
        """Args for re-running a shape op: sym ints at their hints, tensors as given."""
        if isinstance(arg, fx.Node):
            val = arg.meta.get("val")
            if isinstance(val, (int, float, torch.SymInt, torch.SymFloat)):
                return hint(val)
            return self.values.get(arg.name)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.concrete(a) for a in arg)
        return hint(arg)

    def as_tracked(self, node_arg: Any) -> Tracked | None:
        v = self.value(node_arg)
        if isinstance(v, Tracked):
            return v
        if isinstance(node_arg, fx.Node) and isinstance(node_arg.meta.get("val"), torch.Tensor):
            shape = self.shape(node_arg)
            return Tracked(torch.full(shape, -1, dtype=torch.long), torch.zeros(shape, dtype=torch.bool))
        return None

    def reject(self, node: fx.Node, why: str) -> None:
        tracked = self._tracked_in(self.value(list(node.args) + list(node.kwargs.values())))
        if tracked:
            self.unsupported.append(f"{node.name} ({op_name(node.target)}): {why}")
            self.make_whole(tracked)
        return None

    # -- walk -----------------------------------------------------------------------
    def run(self) -> AtenWalk:
        for node in self.gm.graph.nodes:
            self.values[node.name] = self.visit(node)
        drop_whole_embeddings(self)
        edges = [(i, self.dsu.find(i)) for i in range(len(self.owner)) if self.dsu.find(i) != i]
        return AtenWalk(len(self.owner), self.owner, self.whole, edges, self.producers,
                        self.norms, self.unsupported)

    def visit(self, node: fx.Node) -> Any:
        self.current = node.name
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            # inside a no-grad region an attribute is the region's own constant
            return None if self.region else ParamRef(str(node.target))
        if node.op == "output":
            self.make_whole(self.value(node.args))
            return None
        if node.op == "call_module":
            if str(node.target).startswith(MaskSet.ATTRIBUTE + "."):
                src = self.value(node.args[0])
                return ParamRef(src.name, node.name, src.transposed) if isinstance(src, ParamRef) else src
            return self.reject(node, "module call inside an exported graph")
        if node.op != "call_function":
            return self.reject(node, f"{node.op} is not understood")
        if node.target is torch.ops.higher_order.wrap_with_set_grad_enabled:
            return self.grad_region(node)
        if node.target is operator.getitem:
            v = self.value(node.args[0])
            return v[node.args[1]] if isinstance(v, (list, tuple)) else None
        if not isinstance(node.target, torch._ops.OpOverload):
            values = self._tracked_in(self.value(list(node.args)))
            return self.reject(node, "python function in the graph") if values else None
        name = op_name(node.target)
        try:
            if name == "copy_" or (name.endswith("_") and name[:-1] in (
                    BINARY | ZERO_KEEPING | NONZERO_UNARY) and name not in ZERO_KEEPING):
                return self.in_place(node, name)
            return self.call(node, name)
        except (TypeError, ValueError, IndexError, RuntimeError) as exc:
            # a form of the op no rule expects: its channels stay whole, named
            return self.reject(node, f"form not understood ({type(exc).__name__}: {exc})")

    def call(self, node: fx.Node, name: str) -> Any:
        args = node.args
        tracked = self._tracked_in(self.value(list(args) + list(node.kwargs.values())))
        params = [v for v in self.value(list(args)) if isinstance(v, ParamRef)]
        if name in EXPERT_OPS:  # grouped matmuls over expert weights, routing
            return visit_expert_op(self, node, name)
        if name in MATMUL or name in CONV:
            return visit_matmul(self, node, name)
        if name in SDPA:
            return visit_sdpa(self, node)
        if name == "einsum":
            return visit_einsum(self, node) if tracked else None
        if name == "embedding":
            return visit_embedding(self, node)
        if name in BATCH_NORM:
            return self.batch_norm(node, name)
        if name in UNIFORM_OPS:
            return Uniform()
        if name in NO_CHANNELS:
            return None
        if not tracked:
            return self.param_op(node, name, params)
        if name in IDENTITY_OPS:
            return self.value(args[0])
        if name in SHAPE_OPS:
            return self.shape_op(node)
        if name in ("pad", "constant_pad_nd"):
            return self.constant_pad(node, name)
        if name in ("tril", "triu"):
            return self.causal_mask(node, name)
        if name in ("view_as_complex", "view_as_real"):
            return self.complex_view(node, name)
        if name in ZERO_KEEPING or name in NONZERO_UNARY:
            x = self.value(args[0])
            if not isinstance(x, Tracked) or any(isinstance(a, Tracked) for a in self.value(list(args[1:]))):
                return self.reject(node, "elementwise op with channels in a non-first operand")
            out = self.broadcast(x, self.shape(node)) if self.shape(node) != tuple(x.ids.shape) else x
            if name == "native_dropout":
                return (out, None)
            if name in ZERO_KEEPING or clamp_keeps_zero(node, name):
                return out
            return Tracked(out.ids, torch.zeros_like(out.zero))
        if name in BINARY or (name in ("max", "min") and len(args) > 1 and isinstance(
                args[1], fx.Node) and isinstance(args[1].meta.get("val"), torch.Tensor)):
            return self.binary(node, name)  # max.other / min.other: elementwise
        if name in REDUCE:
            return self.reduce(node, name)
        if name in NORMALIZE:
            return self.normalize(node, name)
        return self.reject(node, "op not understood by the channel analysis")

    def broadcast(self, t: Tracked, shape: tuple[int, ...]) -> Tracked:
        return Tracked(t.ids.broadcast_to(shape), t.zero.broadcast_to(shape))

    def shape_op(self, node: fx.Node) -> Any:
        if op_name(node.target) in ("cat", "concat", "concatenate"):
            self.cat_params(node)
        args = []
        for a in node.args:
            if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) and isinstance(
                    x.meta.get("val"), torch.Tensor) for x in a):
                args.append([self.as_tracked(x) for x in a])
            elif isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
                args.append(self.as_tracked(a))
            else:
                args.append(self.concrete(a))
        kwargs = {k: self.concrete(v) for k, v in node.kwargs.items()}
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return self.reject(node, "shape op with tensor keyword arguments")

        name = op_name(node.target)
        # the id tensors' strides are not the real tensor's: a view replays as a reshape
        target = aten.reshape.default if name in ("view", "_unsafe_view") else node.target

        def run(field_name: str) -> Any:
            real = [[getattr(x, field_name) for x in a] if isinstance(a, list) and a and isinstance(
                a[0], Tracked) else getattr(a, field_name) if isinstance(a, Tracked) else a for a in args]
            return target(*real, **kwargs)
        try:
            ids, zero = run("ids"), run("zero")
        except (RuntimeError, TypeError, IndexError) as exc:
            return self.reject(node, f"could not follow the shape op ({exc})")
        out = self._wrap(ids, zero)
        if name in ("view", "_unsafe_view", "reshape", "unflatten", "view_as", "reshape_as") \
                and isinstance(out, Tracked):
            src = args[0]
            chunk = out.ids.dim() == src.ids.dim() + 1 and _pieces_selected(node, out.ids.dim()) \
                or heads_last(node, out.ids.dim())  # (buckets, heads) moved: no fibre unit
            if out.ids.dim() and src.ids.dim() and out.ids.shape[-1] < src.ids.shape[-1] \
                    and not chunk:
                # the last dim was split (e.g. heads x head_dim): a fiber is never split
                fibers = out.ids.reshape(-1, out.ids.shape[-1])
                for row in torch.unique(fibers, dim=0):
                    self.tie_all(row)
        return out

    def constant_pad(self, node: fx.Node, name: str) -> Any:
        """``F.pad(x, pad, value=v)`` in constant mode (a chunked scan padding its length to
        whole chunks): the new positions carry no channel (-1)."""
        x = self.value(node.args[0])
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        if name == "pad" and mode != "constant" or not isinstance(x, Tracked):
            return self.reject(node, f"pad in {mode!r} mode")
        pad = [int(self.concrete(p)) for p in node.args[1]]
        ids = torch.constant_pad_nd(x.ids, pad, -1)
        if tuple(ids.shape) != self.shape(node):
            return self.reject(node, "pad form not understood")
        return Tracked(ids, torch.constant_pad_nd(x.zero, pad, 0))

    def causal_mask(self, node: fx.Node, name: str) -> Any:
        """``tril`` / ``triu`` over positions (a causal mask): zeros and ids kept when every
        matrix of the last two dims holds one tied set (or none: padding); else whole."""
        x = self.value(node.args[0])
        if isinstance(x, Tracked) and x.ids.dim() >= 2:
            uniq, inverse = torch.unique(x.ids, return_inverse=True)
            roots = torch.tensor([self.dsu.find(int(u)) if u >= 0 else -1 for u in uniq])
            flat = roots[inverse].reshape(-1, x.ids.shape[-2] * x.ids.shape[-1])
            hi = flat.amax(-1)
            lo = torch.where(flat >= 0, flat, hi.unsqueeze(-1)).amin(-1)
            if bool(((hi == lo) | (hi < 0)).all()):
                return x
        return self.reject(node, f"{name} over channel dims")

    def _wrap(self, ids: Any, zero: Any) -> Any:
        if isinstance(ids, torch.Tensor):
            return Tracked(ids, zero)
        if isinstance(ids, (list, tuple)):
            return [self._wrap(i, z) for i, z in zip(ids, zero)]
        return None

    # -- emitted arrays ---------------------------------------------------------------
    def emit(self, ids: torch.Tensor) -> np.ndarray:
        out = ids.reshape(-1).numpy().copy()
        out[out < 0] = self.UNTRACKED
        return out


__all__ = ["AtenChannelWalk", "AtenWalk", "SHAPE_OPS"]
