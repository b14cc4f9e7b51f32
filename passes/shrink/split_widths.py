"""Widths of the pieces a producer's output is split into (read-only).

A fused projection is often cut apart with sizes the module keeps in its own attributes
(``torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], -1)``). The ATen graph
records the sizes as constants; :func:`split_piece_widths` gives, per producer weight,
each piece's size before and after a cut, so the source-class shrink can find the
attributes that hold them (:mod:`~sparsify_fx.passes.shrink.to_source`).
"""
from __future__ import annotations

import numpy as np
from torch import fx

from sparsify_fx.passes.aten.values import concrete_shape, op_name
from sparsify_fx.passes.channels.graph_types import ChannelGraph, Producer


def _producer_above(node: fx.Node, producers: dict[str, Producer], hops: int = 12
                    ) -> Producer | None:
    """The nearest producer call above ``node`` along first arguments (a fused projection,
    then a depthwise convolution, casts and transposes: each keeps the channel order)."""
    for _ in range(hops):
        if node.name in producers:
            return producers[node.name]
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def split_piece_widths(gm: fx.GraphModule, cg: ChannelGraph, keep_id: np.ndarray
                       ) -> dict[str, list[tuple[int, int]]]:
    """``{weight: [(size, kept), ...]}`` for every producer whose output (through ops that
    keep its channel order) is split along its last dim by ``split_with_sizes`` into pieces
    of constant sizes; ``kept``: the piece's channels ``keep_id`` (bool per id) keeps."""
    out: dict[str, list[tuple[int, int]]] = {}
    producers = {p.node: p for p in cg.producers.values() if p.kind in ("linear", "conv")}
    for user in gm.graph.nodes:
        if user.op != "call_function" or op_name(user.target) != "split_with_sizes":
            continue
        prod = _producer_above(user.args[0], producers)
        sizes = user.args[1]
        dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
        rank = len(concrete_shape(user.args[0]) or ())
        if prod is None or not rank or not all(isinstance(s, int) for s in sizes) or \
                int(dim) % rank != rank - 1 or sum(sizes) != len(prod.out_ids):
            continue
        ids = np.asarray(prod.out_ids)
        bounds = np.cumsum([0, *sizes])
        out[prod.weight] = [(int(size), int(keep_id[ids[lo:hi]].sum()))
                            for size, lo, hi in zip(sizes, bounds[:-1], bounds[1:])]
    return out


__all__ = ["split_piece_widths"]
