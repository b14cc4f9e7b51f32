"""Where an untracked operand of the ATen channel walk is only broadcast (read-only).

An operand without channel ids that varies along a dim holding several tied sets keeps
those sets whole (:meth:`~sparsify_fx.passes.aten.elementwise.ElementwiseRules.check_untracked_operand`):
shrink would have to slice it. An operand made by ``expand`` from a tensor of size 1
along that dim (a causal mask ``mask[None, None].expand(b, heads, t, t)``) holds the
same values at every index of it, so a narrower result is the same expand at the new
size: :func:`varying_shape` reports such dims as size 1.
"""
from __future__ import annotations

from torch import fx

from sparsify_fx.passes.aten.values import concrete_shape, op_name

#: ops that keep their input's values where they are (dtype or layout changes)
_SAME_VALUES = {"to", "_to_copy", "clone", "contiguous", "alias", "detach", "type_as",
                "lift_fresh_copy"}


def varying_shape(node: fx.Node) -> tuple[int, ...] | None:
    """``node``'s concrete shape with 1 at every dim along which its values cannot vary:
    dims an ``expand`` (reached through dtype and layout copies) broadcast from size 1."""
    shape = concrete_shape(node)
    if shape is None:
        return None
    src = node
    while src.op == "call_function" and op_name(src.target) in _SAME_VALUES and src.args \
            and isinstance(src.args[0], fx.Node):
        src = src.args[0]
    if src.op != "call_function" or op_name(src.target) not in ("expand", "expand_as") \
            or not isinstance(src.args[0], fx.Node):
        return shape
    before = varying_shape(src.args[0])
    if before is None or len(before) > len(shape):
        return shape
    aligned = (1,) * (len(shape) - len(before)) + tuple(before)
    return tuple(1 if a == 1 else s for a, s in zip(aligned, shape))


__all__ = ["varying_shape"]
