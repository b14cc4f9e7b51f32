"""Values of the ATen channel walk (:mod:`~sparsify_fx.passes.aten.channel_walk`).

Plain data shared by the walk and its producer rules
(:mod:`~sparsify_fx.passes.aten.producers`); nothing here reads a graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Tracked:
    """A tensor value with channel ids and zero flags, both of the tensor's concrete shape.

    ``ids``: int64, the producer channel flowing at each element (-1: none).
    ``zero``: bool, the element is exactly 0 when its channel is pruned.
    """

    ids: torch.Tensor
    zero: torch.Tensor


@dataclass
class ParamRef:
    """A parameter (``get_attr`` target ``name``), possibly behind its mask node
    (``masked``: that node's name) or a 2-D transpose (``transposed``: the value is ``W.t()``)."""

    name: str
    masked: str | None = None
    transposed: bool = False


@dataclass
class DerivedParam:
    """A parameter ``name`` through elementwise ops with constants only (``p * 2``,
    ``softplus(p)``): same shape, each element computed from the same element of ``p``, so
    slicing ``p`` slices it. Never a producer's weight."""

    name: str


@dataclass
class Gathered:
    """Elements of a parameter ``name`` laid out by shape ops: rows of a 2-D table
    picked by indices (``embedding(table, bucket)`` of a table that is no producer: a
    per-head bias per relative-position bucket; ``dim`` 1), or a vector viewed and
    permuted (``q_bias.view(1, 1, H, D).permute(0, 2, 1, 3)``; ``dim`` its dim over 1).
    ``cols``: int64 of the value's concrete shape, the parameter's index along ``dim``
    at each element; shape ops move it. No channel flows in it until it meets one
    (:func:`~sparsify_fx.passes.aten.gathered.gathered_operand`)."""

    name: str
    cols: torch.Tensor
    dim: int = 1


@dataclass
class Uniform:
    """A tensor holding one value at every position, made from sizes alone (``zeros``,
    ``full``, ``new_ones``): no channel flows in it and it varies along no dim."""


def channel_dim(shape: tuple[int, ...] | torch.Size) -> int:
    """The dim a per-channel parameter holds its channels along: its first dim of size
    other than 1 (``(C,)``, ``(C, N)``, ``(1, 1, H, 1)``); 0 when there is none."""
    return next((d for d, size in enumerate(shape) if size != 1), 0)


def op_name(target: Any) -> str:
    """``aten.view.default`` -> ``"view"``."""
    return getattr(target, "__name__", str(target)).split(".")[0]


def hint(value: Any) -> Any:
    """A symbolic int/float at its example value; anything else unchanged."""
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    if isinstance(value, torch.SymFloat):
        return float(value.node.hint)
    return value


def concrete_shape(node: Any) -> tuple[int, ...] | None:
    """Concrete shape of an fx node's tensor value (``meta["val"]``), None if not a tensor."""
    val = getattr(node, "meta", {}).get("val")
    return tuple(hint(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def vector_split_dims(size: int, shape: tuple[int, ...]) -> list[int] | None:
    """The dims of ``shape`` a vector of ``size`` elements lies along when viewed as
    ``shape`` row-major over consecutive dims (``dt_bias.view(1, 1, H, D)``: ``[2, 3]``);
    None when its dims over 1 are not consecutive or hold another number of elements."""
    big = [k for k, n in enumerate(shape) if n != 1]
    if not big or big != list(range(big[0], big[-1] + 1)) or \
            int(np.prod([shape[k] for k in big])) != size:
        return None
    return big


def varying_dims(ids: torch.Tensor) -> set[int]:
    """The dims along which some fibre holds two different channel ids (``-1`` entries,
    positions no channel reaches such as a scan's padding, are ignored)."""
    out = set()
    tracked = ids >= 0
    if not bool(tracked.any()):
        return out
    big = torch.iinfo(torch.long).max
    for d in range(ids.dim()):
        if ids.shape[d] < 2:
            continue
        hi = torch.where(tracked, ids, -1).amax(d)
        lo = torch.where(tracked, ids, big).amin(d)
        if bool(((hi >= 0) & (lo != big) & (hi != lo)).any()):
            out.add(d)
    return out


__all__ = ["Tracked", "ParamRef", "DerivedParam", "Uniform", "channel_dim", "op_name", "hint", "concrete_shape",
           "varying_dims", "vector_split_dims"]
