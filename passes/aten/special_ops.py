"""Rules of the ATen channel walk for ops that are neither shapes, products nor plain
elementwise maths (a mixin of :class:`~sparsify_fx.passes.aten.channel_walk.AtenChannelWalk`;
read-only): a ``torch.no_grad()`` region (walked inside), in-place ops, ops on a weight
(transposes keep it a producer's weight; elementwise maths with constants make a
:class:`~sparsify_fx.passes.aten.values.DerivedParam`), complex views.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from sparsify_fx.passes.aten.op_tables import (BINARY, CONV, IDENTITY_OPS, MATMUL,
                                               NONZERO_UNARY, PARAM_COPY_OPS,
                                               PARAM_TRANSPOSE_OPS, PARAM_UNIT_DIM_OPS, SDPA,
                                               SHAPE_OPS, ZERO_KEEPING)
from sparsify_fx.passes.aten.gathered import gathered_shape_op, gathered_vector
from sparsify_fx.passes.aten.grouped import grouped_param_op
from sparsify_fx.passes.channels.graph_types import NormSite
from sparsify_fx.passes.aten.values import (DerivedParam, Gathered, ParamRef, Tracked, Uniform,
                                            concrete_shape, op_name, vector_split_dims)


class SpecialOpRules:
    """Rules that read the walk's values (``self.value``, ``self.visit``, ``self.reject``)."""

    def grad_region(self, node: fx.Node) -> Any:
        """``wrap_with_set_grad_enabled(enabled, submod, *args)`` (a ``torch.no_grad()``
        block in ``forward``): its subgraph is walked with its inputs' ids, unless it holds a
        producer or attention (those stay whole, named)."""
        sub = node.args[1]
        sub = getattr(self.gm, str(sub.target), None) if isinstance(sub, fx.Node) else None
        if not isinstance(sub, fx.GraphModule) or self.region:
            return self.reject(node, "no-grad region not understood")
        calls = [op_name(n.target) for n in sub.graph.nodes if n.op == "call_function"]
        if any(c in MATMUL or c in CONV or c in SDPA for c in calls) or any(
                n.op == "call_module" for n in sub.graph.nodes):
            return self.reject(node, "a no-grad region holding a product or module call")
        outer = self.values
        inputs = [self.value(a) for a in node.args[2:]]
        self.values, self.region = {}, True
        out = None
        try:
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            for ph, v in zip(placeholders, inputs):
                self.values[ph.name] = v
            for n in sub.graph.nodes:
                if n.op == "output":
                    out = self.value(n.args[0])
                elif n.op != "placeholder":
                    self.values[n.name] = self.visit(n)
        finally:
            self.values, self.region = outer, False
        return out

    def in_place(self, node: fx.Node, name: str) -> Any:
        """``x.add_(y)``, ``x.copy_(y)``, ...: the out-of-place rule (``copy_``: the source's
        ids broadcast to the target), and the mutated value takes the result's ids."""
        if name == "copy_":
            src = self.value(node.args[1])
            out = self.broadcast(src, self.shape(node)) if isinstance(src, Tracked) else None
        else:
            out = self.call(node, name[:-1])
        if isinstance(node.args[0], fx.Node):
            self.values[node.args[0].name] = out
        return out

    # -- rules ------------------------------------------------------------------------
    def param_op(self, node: fx.Node, name: str, params: list[ParamRef]) -> Any:
        """An op on a weight (no activation channels): a 2-D transpose (``t``, ``.T``,
        ``transpose``, ``permute(1, 0)``), a copy, or a view that only drops or inserts
        size-1 dims (``w.squeeze(1)``) keeps it a :class:`ParamRef` (a consumer checks the
        shape it needs against the weight's own); any other
        op reading a masked weight is not followed (its channels stay whole, warned)."""
        first = self.value(node.args[0]) if node.args else None
        if isinstance(first, Gathered):  # a table lookup's columns moved by a view
            return gathered_shape_op(self, node, name, first)
        grouped = grouped_param_op(self, node, name, first)  # W.view(G, -1, I) and its swaps
        if grouped is not None:
            return grouped
        if isinstance(first, Uniform) and (name in SHAPE_OPS or name in IDENTITY_OPS
                                           or name in ZERO_KEEPING or name in NONZERO_UNARY):
            return first  # still one value everywhere
        derived = self._derived(node, name, first)
        if derived is not None:
            return derived
        if isinstance(first, DerivedParam) and (name in PARAM_COPY_OPS or (
                name in PARAM_UNIT_DIM_OPS and self._only_unit_dims(node, first))):
            return first  # (-exp(A_log)).to(float32): still computed from A_log elementwise
        if isinstance(first, (ParamRef, DerivedParam)) and name in ("expand", "expand_as"):
            return first  # sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1): its values repeated
        if isinstance(first, (ParamRef, DerivedParam)) and name in ("view", "_unsafe_view",
                                                                     "reshape") \
                and self._splits_a_vector(node, first):
            return first  # dt_bias.view(1, 1, H, D): its elements in order, one per channel
        ref = first
        if not isinstance(first, ParamRef):
            first = None
        if first is not None and name in PARAM_COPY_OPS:
            return first
        if first is not None and name in PARAM_UNIT_DIM_OPS and self._only_unit_dims(node, first):
            return first  # w.squeeze(1).unsqueeze(1): a conv weight read through a view
        rank = len(self.shape(node))
        if first is not None and name in PARAM_TRANSPOSE_OPS and rank in (2, 3):
            # 3-D: (E, a, b) expert weights with their last two dims swapped
            if name == "permute":
                swaps = [int(d) % rank for d in node.args[1]] == [*range(rank - 2), rank - 1, rank - 2]
            elif name == "transpose":
                swaps = {int(node.args[1]) % rank, int(node.args[2]) % rank} == {rank - 2, rank - 1}
            else:
                swaps = rank == 2 or name in ("mT", "mH", "adjoint")
            if swaps:
                return ParamRef(first.name, first.masked, not first.transposed)
        if isinstance(ref, (ParamRef, DerivedParam)) and name in SHAPE_OPS:
            seen = gathered_vector(self, node, name, ref)  # a vector's view permuted
            if seen is not None:
                return seen
        masked = sorted({p.name for p in params if p.masked is not None})
        if masked:
            self.unsupported.append(f"{node.name} ({name}): reads the masked weight(s) "
                                    f"{', '.join(masked)} in a way the analysis does not follow")
        return None

    def _splits_a_vector(self, node: fx.Node, ref: ParamRef | DerivedParam) -> bool:
        """The op views a parameter with one dim of size > 1 (a vector) as consecutive
        dims (row-major: element ``h * D + d`` at ``[..., h, d, ...]``)."""
        try:
            sizes = [n for n in self.gm.get_parameter(ref.name).shape if n != 1]
        except AttributeError:
            return False
        after = concrete_shape(node)
        return len(sizes) == 1 and after is not None and \
            vector_split_dims(sizes[0], after) is not None

    def _only_unit_dims(self, node: fx.Node, ref: ParamRef | DerivedParam) -> bool:
        """The op only drops or inserts size-1 dims of its weight operand (the sizes other
        than 1 are the same, in order), so the value is still the weight's elements in
        their own order."""
        before, after = concrete_shape(node.args[0]), concrete_shape(node)
        if before is None:  # behind a mask node: the weight's own shape
            try:
                before = tuple(self.gm.get_parameter(ref.name).shape)
            except AttributeError:
                return False
            before = before[::-1] if getattr(ref, "transposed", False) else before
        if after is None:
            return False
        return [s for s in before if s != 1] == [s for s in after if s != 1]

    def complex_view(self, node: fx.Node, name: str) -> Any:
        """``view_as_complex`` (last dim of 2 -> one complex element: the pair is tied) and
        ``view_as_real`` (each element -> a pair), as complex rotary embeddings use them."""
        x = self.value(node.args[0])
        if not isinstance(x, Tracked):
            return self.reject(node, "complex view of a non-first operand")
        if name == "view_as_complex":
            self.tie_pairs(x.ids[..., 0], x.ids[..., 1])
            return Tracked(x.ids[..., 0].contiguous(), x.zero.all(-1))
        shape = (*x.ids.shape, 2)
        return Tracked(x.ids.unsqueeze(-1).expand(shape).contiguous(),
                       x.zero.unsqueeze(-1).expand(shape).contiguous())

    def _derived(self, node: fx.Node, name: str, first: Any) -> DerivedParam | None:
        """An elementwise op of one parameter and constants (scalars, 0-d tensors) keeping
        its shape: a :class:`DerivedParam` (a per-channel scale computed from a parameter)."""
        if not isinstance(first, (ParamRef, DerivedParam)) or name not in (
                ZERO_KEEPING | NONZERO_UNARY | {"mul", "add", "sub", "div", "pow", "rsub"}) \
                or name in ("fill", "zeros_like", "ones_like", "full_like", "empty_like",
                            "rand_like", "randn_like"):
            return None
        shape = concrete_shape(node)
        for a in node.args[1:]:
            other = a.meta.get("val") if isinstance(a, fx.Node) else None
            if isinstance(a, fx.Node) and not (isinstance(other, torch.Tensor) and other.dim() == 0):
                return None
        if shape is None or shape != concrete_shape(node.args[0]):
            return None
        return DerivedParam(first.name)

    def cat_params(self, node: fx.Node) -> None:
        """``cat([scores, sinks])`` with ``sinks`` a per-channel parameter (read through
        size-1 views and ``expand``) varying along a dim where the tracked operands hold
        channels, one tied set per index (an attention sink per head): recorded as a site
        whose parameter shrink slices, and its slot in the result carries those ids."""
        parts = node.args[0]
        tracked = [self.value(p) for p in parts if isinstance(self.value(p), Tracked)]
        if not tracked:
            return
        for part in parts:
            ref = self.value(part)
            if not isinstance(ref, (ParamRef, DerivedParam)) or not isinstance(part, fx.Node):
                continue
            source = part
            while source.op == "call_function" and op_name(source.target) in (
                    "expand", "expand_as") and isinstance(source.args[0], fx.Node):
                source = source.args[0]
            try:
                val = self.gm.get_parameter(ref.name)
            except AttributeError:
                continue
            shape = self.shape(part)
            dims = self._param_dims(val, concrete_shape(source), len(shape))
            ids = tracked[0].ids
            if dims is None or len(dims) != 1 or ids.dim() != len(shape) \
                    or ids.shape[dims[0]] != shape[dims[0]]:
                continue
            cols = ids.movedim(dims[0], -1).reshape(-1, ids.shape[dims[0]]).T
            per_index = self.one_id_each(cols)
            if per_index is None:
                continue
            if self.all_whole(per_index):
                continue
            self.norms[node.name + "_" + part.name] = NormSite(
                node.name, ref.name.rpartition(".")[0], self.emit(per_index),
                (ref.name, None, None, None))
            view = [1] * len(shape)
            view[dims[0]] = len(per_index)
            filled = per_index.reshape(view).expand(shape).contiguous()
            self.values[part.name] = Tracked(filled, torch.zeros(shape, dtype=torch.bool))
