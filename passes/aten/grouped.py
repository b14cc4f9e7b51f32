"""Grouped and per-head projections, and picks along a fibre, of the ATen channel walk
(read-only).

Two forms of a 2-D weight applied to more than one slice of its input:

* a *grouped linear*: ``W`` of shape ``(G * O, I)`` viewed as ``(G, O, I)``
  (``W.view(G, -1, I)``), its last two dims swapped, and ``bmm(x, W^T)`` with ``x`` of shape
  ``(G, N, I)``: group ``g`` of ``x`` meets rows ``g * O .. (g + 1) * O`` only (as conv
  groups). It is a producer whose rows are cut in units of ``G`` rows, row ``r`` of every
  group at once, so every group keeps the same width and the view still splits the
  weight into ``G`` equal blocks; its input stays whole (a group is a slice of the
  input's channels, which a narrower input would move between groups);
* a *per-head projection*: ``x @ P`` (or ``linear(x, P)``) where each fibre of ``x`` along
  the contracted dim is one tied set and fibres differ (``x`` of shape ``(b, t, H, K)``
  read by one ``(K, N)`` parameter shared by the heads): ``P`` is no producer (never
  sliced, its mask is dropped); each output fibre carries its input fibre's set (zero when
  that set is pruned), and its MACs, ``K x N`` per fibre, are recorded as an
  ``attention_matmul`` producer of those sets so the cost shrinks with the heads.

:func:`visit_grouped` returns :data:`NOT_GROUPED` for any other product.

Picking along a fibre: a softmax over a fibre holding several tied sets (a head's scores
and a per-head sink logit made by a linear, concatenated) ties them when every element of
the fibre carries a channel (:func:`softmax_ties`), and so does a ``gather`` along such a
fibre (a head's bias per relative-position bucket, :func:`gather_fibres`): removing the
unit then removes the whole fibre. A split view whose new last dim every use moves
forward (``view(b, t, buckets, heads).permute(0, 3, 1, 2)``: the heads last) ties no
fibre of that dim (:func:`heads_last`); the ops after it tie what goes together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from sparsify_fx.mask import MaskSet
from sparsify_fx.passes.aten.op_tables import PARAM_COPY_OPS
from sparsify_fx.passes.aten.values import (ParamRef, Tracked, concrete_shape, op_name,
                                             varying_dims)
from sparsify_fx.passes.channels.graph_types import Producer

if TYPE_CHECKING:
    from sparsify_fx.passes.aten.channel_walk import AtenChannelWalk

#: returned by :func:`visit_grouped` when the product is not one of its forms
NOT_GROUPED = object()
_VIEWS = {"view", "_unsafe_view", "reshape", "unflatten"}


@dataclass
class GroupedParam:
    """A 2-D weight ``(G * O, I)`` viewed as ``(G, O, I)`` (``transposed``: ``(G, I, O)``)."""

    name: str
    masked: str | None
    groups: int
    transposed: bool = False


def _weight_shape(walk: "AtenChannelWalk", name: str) -> tuple[int, ...] | None:
    try:
        return tuple(walk.gm.get_parameter(name).shape)
    except AttributeError:
        return None


def grouped_param_op(walk: "AtenChannelWalk", node: fx.Node, name: str, first: Any) -> Any:
    """A view of a 2-D weight into ``(G, O, I)`` blocks of consecutive rows, a swap of its
    last two dims, or a copy of such a view: a :class:`GroupedParam`; else None."""
    out = concrete_shape(node)
    if isinstance(first, ParamRef) and not first.transposed and name in _VIEWS:
        shape = _weight_shape(walk, first.name)
        if shape is not None and len(shape) == 2 and out is not None and len(out) == 3 \
                and out[0] > 1 and out[0] * out[1] == shape[0] and out[2] == shape[1]:
            return GroupedParam(first.name, first.masked, out[0])
    if isinstance(first, GroupedParam):
        if name in PARAM_COPY_OPS:
            return first
        dims = None
        if name == "transpose":
            dims = sorted(int(d) % 3 for d in node.args[1:3])
        elif name == "permute" and [int(d) % 3 for d in node.args[1]] == [0, 2, 1]:
            dims = [1, 2]
        if dims == [1, 2]:
            return GroupedParam(first.name, first.masked, first.groups, not first.transposed)
        if first.masked is not None:  # the weight is no producer: its mask is dropped, named
            walk.unsupported.append(f"{node.name} ({name}): reads the grouped weight "
                                    f"{first.name} in a way the analysis does not follow")
    return None


def visit_grouped(walk: "AtenChannelWalk", node: fx.Node, name: str, vals: list) -> Any:
    """The grouped-linear or per-head-projection rule for this product, or
    :data:`NOT_GROUPED`."""
    if name in ("bmm", "matmul") and len(vals) >= 2 and isinstance(vals[1], GroupedParam):
        return _grouped_linear(walk, node, vals[0], vals[1])
    if any(isinstance(v, GroupedParam) for v in vals):
        return walk.reject(node, "grouped weight in a product form not understood")
    if name == "linear" and isinstance(vals[1], ParamRef):
        return _per_head(walk, node, vals[0], vals[1], "oi", vals[2] if len(vals) > 2 else None)
    if name in ("mm", "matmul") and isinstance(vals[1], ParamRef) \
            and not isinstance(vals[0], ParamRef):
        return _per_head(walk, node, vals[0], vals[1], "io", None)
    return NOT_GROUPED


def _grouped_linear(walk: "AtenChannelWalk", node: fx.Node, x: Any, w: GroupedParam) -> Any:
    shape = _weight_shape(walk, w.name)
    out_shape = walk.shape(node)
    if not w.transposed or shape is None or len(out_shape) != 3 or out_shape[0] != w.groups:
        return walk.reject(node, "grouped weight in a product form not understood")
    rows, width = shape
    per = rows // w.groups
    masked = w.name in walk.masked
    index = len(walk.producers)
    out_ids = walk.new_ids(rows, index if masked else -1)
    if masked:  # row r of every group is one unit: the groups keep one width
        for r in range(per):
            walk.tie_all(out_ids[r::per])
    else:
        walk.whole.update(out_ids.tolist())
    if isinstance(x, Tracked):
        walk.make_whole(x)  # a narrower input would move channels between groups
    in_ids = walk.emit(torch.full((width,), -1, dtype=torch.long))
    walk.producers[node.name] = Producer(node.name, w.name, None, w.masked, "linear", 1,
                                         out_ids.numpy(), in_ids, (rows, width))
    ids = out_ids.reshape(w.groups, 1, per).expand(out_shape).contiguous()
    return Tracked(ids, torch.ones(out_shape, dtype=torch.bool))


def _uses(walk: "AtenChannelWalk", weight: str) -> int:
    """Calls reading ``weight`` (through its mask node)."""
    count = 0
    for n in walk.gm.graph.nodes:
        if n.op == "get_attr" and str(n.target) == weight:
            for u in n.users:
                masks = u.op == "call_module" and str(u.target).startswith(MaskSet.ATTRIBUTE + ".")
                count += len(u.users) if masks else 1
    return count


def _per_head(walk: "AtenChannelWalk", node: fx.Node, x: Any, ref: ParamRef, kind: str,
              bias: Any) -> Any:
    shape = _weight_shape(walk, ref.name)
    if not isinstance(x, Tracked) or x.ids.dim() < 3 or shape is None or len(shape) != 2:
        return NOT_GROUPED
    k = x.ids.shape[-1]
    n = shape[0] if (kind == "oi") != ref.transposed else shape[1]
    fibres = x.ids.reshape(-1, k)
    if bool((fibres == fibres[:1]).all()) or shape[1 if (kind == "oi") != ref.transposed else 0] != k:
        return NOT_GROUPED  # the same channels at every position: an ordinary producer
    tracked = fibres >= 0
    if bool((tracked.any(1) & ~tracked.all(1)).any()):
        return NOT_GROUPED  # a fibre partly without channels: a set would not remove it whole
    per_fibre = walk.one_id_each(fibres)
    if per_fibre is None or _uses(walk, ref.name) != 1:
        return NOT_GROUPED
    out_shape = walk.shape(node)
    sample = x.ids[0].reshape(-1, k)
    emitted = walk.emit(walk.one_id_each(sample))
    walk.producers[node.name] = Producer(node.name, node.name, None, None, "attention_matmul",
                                         1, emitted, None, (len(emitted), 1), float(k * n))
    ids = per_fibre.reshape(*x.ids.shape[:-1], 1).expand(out_shape).contiguous()
    zero = x.zero.all(-1, keepdim=True).expand(out_shape).contiguous()
    if bias is not None:
        zero = torch.zeros_like(zero)
    return Tracked(ids, zero)


def softmax_ties(name: str, x: Tracked, dims: list[int]) -> bool:
    """A softmax over ``dims`` of ``x`` ties the sets of each fibre (else they stay whole):
    every fibre holding a channel holds one at every element."""
    if name not in ("softmax", "_softmax", "log_softmax", "_log_softmax") or len(dims) != 1:
        return False
    tracked = (x.ids >= 0).movedim(dims[0], -1)
    return bool(tracked.any()) and bool((tracked.all(-1) | ~tracked.any(-1)).all())


def gather_fibres(walk: "AtenChannelWalk", x: Tracked, d: int) -> Tracked | None:
    """``gather`` / ``index_select`` along ``d`` where the fibres along ``d`` hold several
    tied sets (a head's bias for each relative-position bucket): when every fibre holding a
    channel holds one at every element, each fibre's sets are tied (a picked element is any
    of them) and ``x`` is returned with the first id of each fibre along ``d`` (zero where
    the whole fibre is); else None."""
    tracked = (x.ids >= 0).movedim(d, -1)
    if not bool(tracked.any()) or not bool((tracked.all(-1) | ~tracked.any(-1)).all()):
        return None
    for row in torch.unique(x.ids.movedim(d, -1).reshape(-1, x.ids.shape[d]), dim=0):
        walk.tie_all(row)
    ids = x.ids.narrow(d, 0, 1).expand_as(x.ids).contiguous()
    return Tracked(ids, x.zero.all(d, keepdim=True).expand_as(x.zero).contiguous())


def one_set_laid_along(walk: "AtenChannelWalk", x: Tracked, fib: torch.Tensor,
                       keep: list[int]) -> torch.Tensor:
    """Per fibre of a sum over channels (``fib``: ``x``'s ids, kept dims first, the summed
    elements last): every element carries a channel of one tied set, and ``x``'s sets
    are laid along a kept dim (a head's channels summed, ``(k_i * k_j).sum(-1)``: the
    result is the head's, at the head's index). The sum then carries that set."""
    full = (fib >= 0).all(-1)
    if not keep or not bool(full.any()) or not (varying_dims(x.ids) & set(keep)):
        return torch.zeros_like(full)
    uniq, inverse = torch.unique(fib, return_inverse=True)
    roots = torch.tensor([walk.dsu.find(int(u)) if u >= 0 else -1 for u in uniq.tolist()])[inverse]
    return full & (roots.amax(-1) == roots.amin(-1))


def heads_last(node: fx.Node, rank: int) -> bool:
    """Every use of a split view moves its new last dim before others (``view(b, t,
    buckets, heads).permute(0, 3, 1, 2)``): that dim counts units (heads), so its fibres are
    no unit; the ops after the permute tie what must go together."""
    users = list(node.users)
    if not users:
        return False
    for u in users:
        if u.op != "call_function" or op_name(u.target) != "permute":
            return False
        order = [int(k) % rank for k in u.args[1]]
        if order[-1] == rank - 1:
            return False
    return True


__all__ = ["GroupedParam", "NOT_GROUPED", "gather_fibres", "grouped_param_op", "heads_last",
           "one_set_laid_along", "softmax_ties", "visit_grouped"]
