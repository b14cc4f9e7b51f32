"""Bookkeeping for MAC counting: per-weight uses, other ops, the densities that
turn dense MACs into effective MACs, and what each graph node computed
(:class:`NodeMacs`). Weights are recognised by tensor storage.
Nothing here runs a model or mutates one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

Shape = tuple[int, ...]
#: parameter names of nn.MultiheadAttention input projections
ATTENTION_IN = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass
class WeightUse:
    """MACs charged to one weight, summed over every call that uses it."""

    name: str
    kind: str
    weight_shape: Shape
    groups: int = 1
    dense_macs: int = 0
    macs: float = 0.0
    output_shape: Shape | None = None
    calls: int = 0


@dataclass
class OtherOp:
    """MACs of one op that uses no prunable weight (attention matmuls, einsum, ...)."""

    name: str
    op: str
    macs: int
    output_shape: Shape | None


@dataclass
class NodeMacs:
    """Dense MACs one graph node computes (``node.meta["sparsify_macs"]``, written by
    :class:`~sparsify_fx.passes.macs.count.GraphCounter`): ``weights`` maps each weight
    name the node multiplies with to its MACs, ``other`` sums ops without a prunable
    weight. Dense: the same for a masked and an unmasked weight of one shape."""

    weights: dict[str, int] = field(default_factory=dict)
    other: int = 0

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.other


@dataclass
class MacCount:
    """Result of :func:`count_macs`. ``method``: ``"fx"`` (graph walk) or ``"eager"``."""

    weights: dict[str, WeightUse] = field(default_factory=dict)
    other: list[OtherOp] = field(default_factory=list)
    method: str = "fx"
    trace_error: str = ""


def _shape(x: Any) -> Shape | None:
    if isinstance(x, Tensor):
        return tuple(int(s) for s in x.shape)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return tuple(int(s) for s in x[0].shape)
    return None


def _ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr() if t.numel() else 0
    except (RuntimeError, NotImplementedError):
        return 0


def conv_kind(weight_shape: Sequence[int], groups: int, transposed: bool) -> str:
    if transposed:
        return "conv_transpose"
    if groups > 1 and weight_shape[1] == 1:
        return "depthwise_conv"
    return "grouped_conv" if groups > 1 else "conv"


class Tally:
    """Accumulates weight uses and other ops; knows each weight's density."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        self.weights = weights
        self.owner = {p: n for n, t in weights.items() if (p := _ptr(t))}
        self._nnz: dict[tuple[str, int, int], int] = {}
        self.count = MacCount()
        #: where the node being run records its MACs too (set by the graph counter)
        self.node: NodeMacs | None = None

    def name_of(self, t: Any) -> str | None:
        return self.owner.get(_ptr(t)) if isinstance(t, Tensor) else None

    def nonzeros(self, name: str, start: int = 0, stop: int | None = None) -> int:
        w = self.weights[name]
        stop = w.shape[0] if stop is None else stop
        key = (name, start, stop)
        if key not in self._nnz:
            self._nnz[key] = int(torch.count_nonzero(w[start:stop]))
        return self._nnz[key]

    def density(self, name: str, used: Tensor | None = None) -> float:
        """Density of weight ``name``, or of the slice ``used`` of it (e.g. a q/k/v split)."""
        w = self.weights[name]
        if used is not None and used.numel() != w.numel():
            key = (name, -1 - int(used.storage_offset()), int(used.numel()))
            if key not in self._nnz:
                self._nnz[key] = int(torch.count_nonzero(used))
            return self._nnz[key] / used.numel()
        return self.nonzeros(name) / w.numel() if w.numel() else 0.0

    def add_weight(self, name: str, kind: str, dense: int, out: Any, groups: int = 1,
                   effective: float | None = None, used: Tensor | None = None) -> None:
        use = self.count.weights.get(name)
        if use is None:
            use = WeightUse(name, kind, tuple(self.weights[name].shape), groups)
            self.count.weights[name] = use
        use.dense_macs += int(dense)
        use.macs += dense * self.density(name, used) if effective is None else effective
        use.output_shape = use.output_shape or _shape(out)
        use.calls += 1
        if self.node is not None:
            self.node.weights[name] = self.node.weights.get(name, 0) + int(dense)

    def add_other(self, name: str, op: str, macs: int, out: Any) -> None:
        if macs:
            self.count.other.append(OtherOp(name, op, int(macs), _shape(out)))
            if self.node is not None:
                self.node.other += int(macs)

    def add_matmul(self, label: str, op: str, a: Tensor, b: Tensor, out: Tensor) -> None:
        """A product contracting ``a``'s last dim; charged to a weight operand if any."""
        k = a.shape[-1] if a.dim() else 1
        macs = out.numel() * k if out.dim() else k
        for operand in (b, a):
            name = self.name_of(operand)
            if name is not None:
                kind = "attention_in_proj" if name.endswith(ATTENTION_IN) else "linear"
                self.add_weight(name, kind, macs, out, used=operand)
                return
        self.add_other(label, op, macs, out)

    def add_conv(self, label: str, x: Tensor, w: Tensor, out: Tensor, groups: int,
                 transposed: bool) -> None:
        per = math.prod(w.shape[1:])
        macs = (x.numel() if transposed else out.numel()) * per
        name = self.name_of(w)
        if name is None:
            self.add_other(label, "conv", macs, out)
        else:
            self.add_weight(name, conv_kind(w.shape, groups, transposed), macs, out, groups)

    def add_attention(self, label: str, q: Tensor, k: Tensor, v: Tensor, out: Any) -> None:
        """Both attention matmuls (q k^T and attn v) of SDPA-shaped tensors."""
        length, e = q.shape[-2], q.shape[-1]
        batch = q.numel() // max(length * e, 1)
        macs = batch * length * k.shape[-2] * (e + v.shape[-1])
        self.add_other(label, "attention", macs, out)

    def add_mha(self, label: str, embed: int, heads: int, q_tokens: int, k_tokens: int,
                v_tokens: int, src_len: int, in_w: list[Tensor | None],
                out_w: Tensor | None, out: Any) -> None:
        """nn.MultiheadAttention from shapes; ``in_w`` is [packed] or [q, k, v] weights."""
        tokens = (q_tokens, k_tokens, v_tokens)
        if len(in_w) == 1 and in_w[0] is not None:
            name = self.name_of(in_w[0])
            dense = sum(t * embed * in_w[0].shape[1] for t in tokens)
            if name is None:
                self.add_other(f"{label}.in_proj", "linear", dense, out)
            else:
                eff = sum(t * self.nonzeros(name, i * embed, (i + 1) * embed)
                          for i, t in enumerate(tokens))
                self.add_weight(name, "attention_in_proj", dense, out, effective=eff)
        else:
            for t, w in zip(tokens, in_w):
                if w is None:
                    continue
                name = self.name_of(w)
                if name is None:
                    self.add_other(f"{label}.in_proj", "linear", t * w.numel(), out)
                else:
                    self.add_weight(name, "attention_in_proj", t * w.numel(), out)
        self.add_other(label, "attention", 2 * q_tokens * src_len * embed, out)
        if out_w is not None:
            name = self.name_of(out_w)
            dense = q_tokens * out_w.numel()
            if name is None:
                self.add_other(f"{label}.out_proj", "linear", dense, out)
            else:
                self.add_weight(name, "attention_out_proj", dense, out)


__all__ = ["WeightUse", "OtherOp", "NodeMacs", "MacCount", "Tally", "conv_kind", "ATTENTION_IN"]
