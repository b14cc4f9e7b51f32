"""Parameters read element by element through shape ops, as the ATen channel walk
follows them (read-only).

A :class:`~sparsify_fx.passes.aten.values.Gathered` value is a parameter's index along
one dim at each element of a tensor: rows of an ``(buckets, heads)`` table looked up by
relative-position bucket (made by
:func:`~sparsify_fx.passes.aten.embeddings.visit_embedding`), or a vector viewed per head
and permuted (:func:`gathered_vector`). Shape ops replay on the index
(:func:`gathered_shape_op`). Where it meets tracked channels in ``x + p``, ``x - p`` or
``x * p`` and every index meets one tied set (or none), the parameter is a per-channel
parameter along that dim (:func:`gathered_operand`): a site whose parameter shrink
slices with those sets. Anything else leaves it untracked, as before.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import fx

from sparsify_fx.passes.aten.op_tables import IDENTITY_OPS, SHAPE_OPS
from sparsify_fx.passes.aten.values import (DerivedParam, Gathered, ParamRef, Tracked,
                                            channel_dim, concrete_shape)
from sparsify_fx.passes.channels.graph_types import NormSite

if TYPE_CHECKING:
    from sparsify_fx.passes.aten.channel_walk import AtenChannelWalk


def gathered_shape_op(walk: "AtenChannelWalk", node: fx.Node, name: str,
                      value: Gathered) -> Gathered | None:
    """A view, copy or broadcast of a :class:`Gathered` value (its first operand): the
    op replayed on its column index; None for any other op (no channel, as before)."""
    if name in IDENTITY_OPS or name in ("clone", "contiguous", "detach", "alias"):
        return value
    if name not in SHAPE_OPS or name in ("cat", "concat", "concatenate", "stack"):
        return None
    target = torch.ops.aten.reshape.default if name in ("view", "_unsafe_view") else node.target
    args = [value.cols, *(walk.concrete(a) for a in node.args[1:])]
    kwargs = {k: walk.concrete(v) for k, v in node.kwargs.items()}
    try:
        cols = target(*args, **kwargs)
    except (RuntimeError, TypeError, IndexError):
        return None
    if not isinstance(cols, torch.Tensor) or tuple(cols.shape) != walk.shape(node):
        return None
    return Gathered(value.name, cols, value.dim)


def gathered_vector(walk: "AtenChannelWalk", node: fx.Node, name: str,
                    ref: ParamRef | DerivedParam) -> Gathered | None:
    """A shape op on a parameter vector (one dim over 1, no mask node) that no weight
    rule keeps a :class:`ParamRef` (a permute of its split view): the op replayed on
    its element index, as a :class:`Gathered` value; None otherwise."""
    if getattr(ref, "masked", None) is not None or getattr(ref, "transposed", False):
        return None
    try:
        val = walk.gm.get_parameter(ref.name)
    except AttributeError:
        return None
    if sum(n != 1 for n in val.shape) != 1:
        return None
    seen = concrete_shape(node.args[0]) or tuple(val.shape)
    if math.prod(seen) != val.numel():
        return None
    along = channel_dim(val.shape)
    cols = torch.arange(int(val.shape[along])).reshape(seen)
    return gathered_shape_op(walk, node, name, Gathered(ref.name, cols, along))


def gathered_operand(walk: "AtenChannelWalk", node: fx.Node, name: str, vals: list,
                     ts: list) -> Tracked | None:
    """``scores + bias`` with ``bias`` a :class:`Gathered` table lookup (a head's bias per
    relative-position bucket: ``table[bucket].permute(2, 0, 1)``) and ``scores`` tracked:
    when every table column meets one tied set (or no channel at all), the table is a per-channel
    parameter along its columns: a site whose columns shrink slices with those sets
    (:class:`~sparsify_fx.passes.channels.graph_types.NormSite`, ``dim=1``). A table
    read at several sites (a bias computed once, added in every layer) ties the sets
    each column meets. A table whose columns lie along the last dim (an absolute position
    embedding added to the hidden width) is left to the general rules, as before. None
    when the pattern does not hold (the general rules apply)."""
    if name not in ("add", "sub", "mul") or len(vals) < 2 or walk.region:
        return None
    i = 0 if isinstance(vals[0], Gathered) else 1 if isinstance(vals[1], Gathered) else None
    if i is None or ts[1 - i] is None:
        return None
    table, t = vals[i], ts[1 - i]
    try:
        cols = table.cols.broadcast_to(t.ids.shape)
        width = int(walk.gm.get_parameter(table.name).shape[table.dim])
    except (RuntimeError, AttributeError):
        return None
    if table.dim == 1 and cols.dim() and cols.shape[-1] > 1 and bool(
            (cols != cols[..., :1]).any()):
        return None  # a position table along the last dim: the hidden width, not heads
    pairs = torch.unique(torch.stack([cols.reshape(-1), t.ids.reshape(-1)]), dim=1)
    met = [pairs[1][pairs[0] == c] for c in range(width)]
    if any(bool((m < 0).any() and (m >= 0).any()) for m in met):
        return None  # a column also read where no channel flows: slicing it would change those
    ids = walk.one_id_each(met)
    if ids is None or walk.all_whole(ids):
        return None
    walk.tie_pairs(walk.gathered_sites.setdefault(table.name, ids), ids)  # (-1s skipped)
    walk.norms[node.name] = NormSite(node.name, table.name.rpartition(".")[0], walk.emit(ids),
                                     (table.name, None, None, None), dim=table.dim)
    return Tracked(t.ids, t.zero.clone() if name == "mul" else torch.zeros_like(t.zero))


__all__ = ["gathered_operand", "gathered_shape_op", "gathered_vector"]
