"""Embedding tables of the ATen channel walk (read-only).

``aten.embedding(table, indices)`` of a parameter ``table`` of shape ``(V, D)`` that no
other op reads, whose output reaches nothing but the inputs of masked projections
(through ``cat`` and other ops that only move data): its ``D`` columns are a
*producer*'s output channels (new ids, stored as
an ``(in, out)`` weight, no MACs). The table carries no mask, so a pruned column is not
zero: the ids reach the walk marked not exactly zero when pruned, and the existing rules
decide. A linear reading them (``cat`` of the word, shape and pronunciation embeddings
projected to the hidden size, a factorised embedding's projection) gates its input
columns with each column's score (``"columns"`` masks), so the hard-masked model never
reads a pruned column, and shrink slices the table's columns with the projection's input
columns. Anything else (a norm over all embedding units, the residual stream, an output,
a product with activations, a table tied to an LM head, a projection excluded from
pruning) leaves the table untracked, as before.

:func:`drop_whole_embeddings` removes, after the walk, the embedding producers whose
columns all stay whole (an LLM's token embedding), so the analysis of models without the
pattern is what it was.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx

from sparsify_fx.passes.aten.op_tables import IDENTITY_OPS, SHAPE_OPS
from sparsify_fx.passes.aten.values import Gathered, ParamRef, Tracked, op_name
from sparsify_fx.passes.channels.graph_types import Producer

if TYPE_CHECKING:
    from sparsify_fx.passes.aten.channel_walk import AtenChannelWalk

#: the walk's attribute listing the embedding calls made producers (``Producer.kind`` is
#: ``"linear"``: an ``(in, out)`` weight the shrink slices along its columns)
EMBEDDING_NODES = "_embedding_nodes"


def _only_reader(walk: "AtenChannelWalk", node: fx.Node, table: torch.Tensor) -> bool:
    """``node`` is the one op reading ``table`` (by any of its names: a table tied to an
    LM head is read by that head's ``linear`` too)."""
    for other in walk.gm.graph.nodes:
        if other.op != "get_attr":
            continue
        try:
            value = walk.gm.get_parameter(str(other.target))
        except AttributeError:
            continue
        if value is not table and not (value.data_ptr() == table.data_ptr()
                                       and value.shape == table.shape):
            continue
        for user in other.users:
            if user is node:
                continue
            if user.op == "call_module" and all(u is node for u in user.users):
                continue  # a mask node in front of this very call
            return False
    return True


#: a product reading the embedding as its input: op name -> the input's argument index
_READERS = {"linear": 0, "mm": 0, "matmul": 0, "addmm": 1}


def _reaches_only_projections(node: fx.Node) -> bool:
    """Every path from ``node`` through ops that only move data (``cat``, ``clone``,
    views, dtype copies, dropout) ends as the input of a product with a masked weight (a
    ``linear`` reading the columns; ``exclude`` it to keep the table whole). Anything else (an add to the residual stream, a norm,
    a product with activations as rotary tables are used) and the columns would be tied
    into other channels or kept whole: the table is left untracked, as before."""
    seen: set[str] = set()
    stack = list(node.users)
    if not stack:
        return False
    while stack:
        user = stack.pop()
        if user.name in seen:
            continue
        seen.add(user.name)
        if user.op != "call_function":
            return False
        if user.target is operator.getitem:
            stack.extend(user.users)
            continue
        name = op_name(user.target)
        if name in SHAPE_OPS or name in IDENTITY_OPS or name == "native_dropout":
            stack.extend(user.users)
            continue
        at = _READERS.get(name)
        if at is None or len(user.args) <= at + 1:
            return False
        x, weight = user.args[at], user.args[at + 1]
        followed = isinstance(x, fx.Node) and (x is node or x.name in seen)
        if not followed or not isinstance(weight, fx.Node) or weight.op != "call_module":
            return False  # a reader excluded from pruning (no mask node) keeps them whole
    return True


def _reads_inputs(indices: Any) -> bool:
    """The tensor ``indices`` is computed from the values of a graph input (token ids),
    not from sizes alone (positions made by ``arange``)."""
    stack, seen = [indices], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node.name in seen \
                or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        seen.add(node.name)
        if node.op == "placeholder":
            return True
        stack.extend(node.all_input_nodes)
    return False


def visit_embedding(walk: "AtenChannelWalk", node: fx.Node) -> Any:
    """``embedding(table, indices, ...)``: new ids on the table's columns when the table is
    a 2-D parameter only this call reads; else no channel (``None``), as before."""
    ref = walk.value(node.args[0])
    if isinstance(walk.value(node.args[1]), Tracked):
        return walk.reject(node, "embedding indices computed from channels")
    if walk.region or not isinstance(ref, ParamRef) or ref.transposed:
        return None
    try:
        table = walk.gm.get_parameter(ref.name)
    except AttributeError:
        return None
    shape = walk.shape(node)
    if table.dim() != 2 or shape[-1] != table.shape[1] or not _only_reader(walk, node, table):
        return None
    if not _reaches_only_projections(node):
        if _reads_inputs(node.args[1]):  # token embeddings: activations, as before
            return None
        # a lookup by position alone (relative-position buckets): its columns may still
        # meet channels (a per-head bias, :mod:`~sparsify_fx.passes.aten.gathered`)
        cols = torch.arange(int(table.shape[1])).reshape((1,) * (len(shape) - 1) + (-1,))
        return Gathered(ref.name, cols.expand(shape))
    rows, cols = int(table.shape[0]), int(table.shape[1])
    index = len(walk.producers)
    out_ids = walk.new_ids(cols, index)
    walk.producers[node.name] = Producer(
        node.name, ref.name, None, ref.masked, "linear", 1, out_ids.numpy(), None,
        (cols, rows), macs_unit=0.0, weight_layout="io")
    getattr(walk, EMBEDDING_NODES).append(node.name)
    ids = out_ids.reshape((1,) * (len(shape) - 1) + (cols,)).expand(shape).contiguous()
    return Tracked(ids, torch.zeros(shape, dtype=torch.bool))  # not masked: not zero


def drop_whole_embeddings(walk: "AtenChannelWalk") -> None:
    """Remove the embedding producers whose every column is in a set kept whole (their
    ids then own nothing); the other producers' owner indices follow. Mutates ``walk``."""
    names = getattr(walk, EMBEDDING_NODES)
    if not names:
        return
    whole_roots = {walk.dsu.find(int(w)) for w in walk.whole}
    order = list(walk.producers)
    drop = {order.index(n) for n in names
            if set(walk.dsu.roots(walk.producers[n].out_ids).tolist()) <= whole_roots}
    if not drop:
        return
    new_index = np.full(len(order), -1, dtype=np.int64)
    kept = [i for i in range(len(order)) if i not in drop]
    new_index[kept] = np.arange(len(kept))
    owner = np.asarray(walk.owner, dtype=np.int64)
    walk.owner = np.where(owner >= 0, new_index[np.clip(owner, 0, None)], -1).tolist()
    for i in sorted(drop):
        del walk.producers[order[i]]
        names.remove(order[i])


__all__ = ["visit_embedding", "drop_whole_embeddings", "EMBEDDING_NODES"]
