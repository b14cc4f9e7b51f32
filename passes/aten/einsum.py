"""The ``einsum`` rule of the ATen channel walk (read-only): two operands, no ellipsis
(a Mamba-2 chunked scan: ``"bclhn,bcshn->bclsh"``, ``"bclsh,bcshp->bclhp"``, ...).

An einsum is an elementwise product over the joint index space followed by a sum over
the letters missing from the output. So:

* the elements that meet in a product are tied position by position, as ``a * b`` ties
  them (a letter both operands index has one size in both: a channel along it is
  removed from both or neither);
* a summed fibre holding one tied set keeps its id; a fibre of several sets carries
  none of them (each pruned term is exactly 0 when either factor is, so the sum loses
  it exactly: no tie), unless a pruned term may be non-zero: those ids stay whole;
* no letter holding channels of both operands (an outer product): nothing is tied, the
  operand of the larger tied sets keeps its ids and the other's stay whole.

Dims along which an operand's ids do not vary (batch, sequence, chunk) are walked at
size 1, so the joint space stays small. The products' MACs are not recorded as
producers: a budget counts the projections around a scan, not the scan itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from sparsify_fx.passes.aten.values import Tracked, varying_dims

if TYPE_CHECKING:
    from sparsify_fx.passes.aten.channel_walk import AtenChannelWalk


def _compact(t: Tracked) -> Tracked:
    """``t`` with every dim along which its ids and zero flags do not vary cut to size 1."""
    ids, zero = t.ids, t.zero
    for d in range(ids.dim()):
        if ids.shape[d] > 1 and bool((ids == ids.narrow(d, 0, 1)).all()) and \
                bool((zero == zero.narrow(d, 0, 1)).all()):
            ids, zero = ids.narrow(d, 0, 1), zero.narrow(d, 0, 1)
    return Tracked(ids, zero)


def _joint(x: torch.Tensor, letters: str, joint: str) -> torch.Tensor:
    """``x`` (dims named by ``letters``) with its dims in ``joint`` order, size 1 where
    it has no such letter."""
    x = x.permute(*[letters.index(c) for c in joint if c in letters])
    shape = [x.shape[[c for c in joint if c in letters].index(c)] if c in letters else 1
             for c in joint]
    return x.reshape(shape)


def visit_einsum(walk: "AtenChannelWalk", node: fx.Node) -> Any:
    equation, operands = node.args[0], node.args[1]
    if not isinstance(equation, str) or "..." in equation or "->" not in equation \
            or len(operands) != 2:
        return walk.reject(node, "einsum form not understood (two operands, no ellipsis)")
    lhs, out = equation.replace(" ", "").split("->")
    la, lb = lhs.split(",")
    if len(set(la)) != len(la) or len(set(lb)) != len(lb):
        return walk.reject(node, "einsum with a repeated letter (a diagonal)")
    a, b = (walk.as_tracked(x) for x in operands)
    if a is None or b is None:
        return walk.reject(node, "einsum operand without a tensor value")
    a, b = _compact(a), _compact(b)
    vary_a = {la[d] for d in varying_dims(a.ids)}
    vary_b = {lb[d] for d in varying_dims(b.ids)}
    if vary_a and vary_b and not vary_a & vary_b:
        # an outer product (C's state channels against the heads of a state): no letter
        # holds channels of both, so nothing is tied; one id per element is tracked, the
        # operand of the larger tied sets keeps its ids, the other's stay whole
        size_a, size_b = walk.mean_set_sizes(a.ids, b.ids)
        keep = 0 if size_a >= size_b else 1
        drop = (a, b)[1 - keep]
        walk.whole.update(torch.unique(drop.ids[drop.ids >= 0]).tolist())
        drop = Tracked(torch.full_like(drop.ids, -1), torch.zeros_like(drop.zero))
        a, b = (a, drop) if keep == 0 else (drop, b)
    joint = "".join(dict.fromkeys(la + lb))
    shape = torch.broadcast_shapes(_joint(a.ids, la, joint).shape, _joint(b.ids, lb, joint).shape)
    ja = [_joint(v, la, joint).expand(shape) for v in (a.ids, a.zero)]
    jb = [_joint(v, lb, joint).expand(shape) for v in (b.ids, b.zero)]
    walk.tie_pairs(ja[0].reshape(-1), jb[0].reshape(-1))
    ids = torch.where(ja[0] >= 0, ja[0], jb[0])
    zero = ja[1] | jb[1]
    summed = [d for d, c in enumerate(joint) if c not in out]
    kept = [d for d, c in enumerate(joint) if c in out]
    fib = ids.permute(*kept, *summed).reshape(*[shape[d] for d in kept], -1)
    zf = zero.permute(*kept, *summed).reshape(*[shape[d] for d in kept], -1)
    flat, flat_zero = fib.reshape(-1, fib.shape[-1]), zf.reshape(-1, zf.shape[-1])
    rows, inverse = torch.unique(flat, dim=0, return_inverse=True)
    row_id = torch.full((len(rows),), -1, dtype=torch.long)
    row_mixed = torch.zeros(len(rows), dtype=torch.bool)
    for r, row in enumerate(rows):
        if not bool((row >= 0).any()):
            continue
        if walk.n_components(row) == 1:
            row_id[r] = row.max()
        else:
            row_mixed[r] = True
    mixed = row_mixed[inverse]
    all_zero = (flat_zero | (flat < 0)).all(-1)
    loud = mixed & ~all_zero  # a pruned term may be non-zero: its channels stay whole
    if bool(loud.any()):
        picked = flat[loud]
        walk.whole.update(torch.unique(picked[picked >= 0]).tolist())
    out_ids = row_id[inverse].reshape(fib.shape[:-1])
    out_zero = (all_zero & ~mixed).reshape(fib.shape[:-1]) & (out_ids >= 0)
    order = [joint[d] for d in kept]
    perm = [order.index(c) for c in out]
    out_ids, out_zero = out_ids.permute(*perm), out_zero.permute(*perm)
    real = walk.shape(node)
    return Tracked(out_ids.expand(real).contiguous(), out_zero.expand(real).contiguous())


__all__ = ["visit_einsum"]
