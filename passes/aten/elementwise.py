"""Elementwise, reduction and normalisation rules of the ATen channel walk (read-only).

A mixin of :class:`~sparsify_fx.passes.aten.channel_walk.AtenChannelWalk`: each rule
reads the walk's values and ties or keeps whole its channel ids (see that module's
doc for the rules); nothing here touches the graph.

* ``binary``: ids that meet position by position are tied; zero flags follow the op
  (``mul``: either operand zero; ``add``: both; ``div``: the numerator);
* ``check_untracked_operand``: an operand without ids that varies along a dim holding
  several tied sets keeps them whole;
* ``reduce`` / ``normalize``: a reduction over one tied set is fine, over several it
  keeps them whole (``sum`` ties them);
* ``batch_norm``: a per-channel affine whose parameters shrink slices and gates.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import fx

from sparsify_fx.passes.aten.gathered import gathered_operand
from sparsify_fx.passes.aten.expanded import varying_shape
from sparsify_fx.passes.aten.grouped import one_set_laid_along, softmax_ties
from sparsify_fx.passes.aten.values import (DerivedParam, ParamRef, Tracked, Uniform,
                                            channel_dim, concrete_shape, hint, op_name,
                                            varying_dims, vector_split_dims)
from sparsify_fx.passes.channels.graph_types import NormSite


class ElementwiseRules:
    """Rules that read ``self.value`` / ``self.shape`` and tie through the walk's DSU."""

    def check_untracked_operand(self, t: Tracked, other_shape: tuple[int, ...],
                                node: fx.Node, param: bool) -> None:
        """An operand without ids that varies along a dim holding several tied sets would
        need slicing at shrink: keep those channels whole (a parameter, e.g. a per-channel
        scale, is named in ``unsupported``; an activation, e.g. the residual stream, is not)."""
        if self.all_whole(t.ids):
            return  # already whole (e.g. the residual stream under its LayerNorm)
        out_rank = t.ids.dim()
        shape = (1,) * (out_rank - len(other_shape)) + tuple(other_shape)
        for d, size in enumerate(shape):
            if size == 1 or t.ids.shape[d] == 1:
                continue
            moved = t.ids.movedim(d, -1).reshape(-1, t.ids.shape[d])
            for row in torch.unique(moved, dim=0):
                if self.n_components(row) > 1:
                    if param:
                        self.unsupported.append(f"{node.name} ({op_name(node.target)}): a "
                                                "parameter varies along a channel dim")
                    self.make_whole(t)
                    return

    def binary(self, node: fx.Node, name: str) -> Any:
        out_shape = self.shape(node)
        operands = list(node.args[:2]) if name != "where" else list(node.args[1:3])
        cond = self.value(node.args[0]) if name == "where" else None
        if isinstance(cond, Tracked):  # where(x > 0, f(x), g(x)): the condition's ids tie too
            cond = self.broadcast(cond, out_shape)
            out = self._binary(node, name, operands, out_shape)
            if out is None:
                return Tracked(cond.ids, torch.zeros_like(cond.zero))
            self.tie_pairs(cond.ids, out.ids)
            return Tracked(torch.where(out.ids >= 0, out.ids, cond.ids), out.zero)
        return self._binary(node, name, operands, out_shape)

    def _binary(self, node: fx.Node, name: str, operands: list, out_shape: tuple[int, ...]
                ) -> Tracked | None:
        vals = [self.value(a) for a in operands]
        ts = [self.broadcast(v, out_shape) if isinstance(v, Tracked) else None for v in vals]
        per_channel = self._per_channel_param(node, name, operands, vals, ts) or \
            gathered_operand(self, node, name, vals, ts)
        if per_channel is not None:
            return per_channel
        for i, t in enumerate(ts):
            other = operands[1 - i] if len(operands) > 1 else None
            if t is not None and ts[1 - i] is None and isinstance(other, fx.Node) \
                    and not isinstance(self.value(other), Uniform):
                varying = varying_shape(other)  # dims an expand broadcast: size 1
                if varying is not None:
                    self.check_untracked_operand(t, varying, node,
                                                 isinstance(self.value(other),
                                                            (ParamRef, DerivedParam)))
        a, b = ts[0], ts[1] if len(ts) > 1 else None
        if a is not None and b is not None and name == "mul":
            outer = self._outer_product(operands, out_shape)
            if outer is not None:  # a[c, :] * b[:, s]: no channel meets another
                keep, drop = (a, b) if outer == 0 else (b, a)
                self.make_whole(drop)
                return Tracked(keep.ids, a.zero | b.zero)
        if a is not None and b is not None:
            self.tie_pairs(a.ids, b.ids)
            ids = torch.where(a.ids >= 0, a.ids, b.ids)
            if name == "mul":
                zero = a.zero | b.zero
            elif name in ("div", "true_divide"):
                zero = a.zero
            else:
                zero = a.zero & b.zero
            return Tracked(ids, zero)
        t = a if a is not None else b
        if t is None:
            return None
        first = a is not None
        scalar_other = len(operands) < 2 or not isinstance(operands[1 if first else 0], fx.Node)
        if name == "mul" or (name in ("div", "true_divide") and first) or (
                name == "pow" and first and scalar_other and float(operands[1]) > 0) or (
                name == "masked_fill" and not isinstance(node.args[2], fx.Node)
                and float(node.args[2]) == 0.0):
            return t
        return Tracked(t.ids, torch.zeros_like(t.zero))

    def _outer_product(self, operands: list, out_shape: tuple[int, ...]) -> int | None:
        """``a * b`` where no dim has ids varying in both operands (``dt[:, :, None] *
        B[:, None, :]``, a selective scan's outer product; ``B * decay[..., None]`` with B
        repeated over heads): removing a channel of one slices a dim the other does not
        vary along, so nothing is tied. One id per element is tracked: the operand whose
        channels belong to the larger tied sets keeps its ids (its index, 0 or 1; a head
        of x, dt and z before a state channel of B) and the other's channels stay whole.
        None: not an outer product."""
        vary = []
        for arg in operands:
            t = self.value(arg)
            shape = concrete_shape(arg)
            if shape is None or not isinstance(t, Tracked):
                return None
            ids = t.ids.reshape((1,) * (len(out_shape) - t.ids.dim()) + tuple(t.ids.shape))
            vary.append(varying_dims(ids))
        if not vary[0] or not vary[1] or vary[0] & vary[1]:
            return None
        sizes = self.mean_set_sizes(*(self.value(arg).ids for arg in operands))
        counts = [len(torch.unique(self.value(arg).ids)) for arg in operands]
        return 0 if (sizes[0], counts[0]) >= (sizes[1], counts[1]) else 1

    def mean_set_sizes(self, *ids: torch.Tensor) -> list[float]:
        """Per id tensor: the mean number of channel ids in the tied sets it holds (0: none
        tracked, or all whole already). The set sizes are counted once for all."""
        counts = None
        out = []
        for t in ids:
            mine = torch.unique(t[t >= 0]).numpy()
            if not len(mine) or set(mine.tolist()) <= self.whole:
                out.append(0.0)  # nothing prunable to keep
                continue
            if counts is None:
                counts = np.bincount(self.dsu.roots(np.arange(len(self.owner))),
                                     minlength=len(self.owner))
            out.append(float(counts[self.dsu.roots(mine)].mean()))
        return out

    def one_id_each(self, columns: Iterable[torch.Tensor]) -> torch.Tensor | None:
        """One channel id per column of ids (``-1`` for a column with none), or None when a
        column holds several tied sets: a per-channel parameter's index, a head's block."""
        per_index = []
        for col in columns:
            if self.n_components(col) > 1:
                return None
            tracked = col[col >= 0]
            per_index.append(int(tracked[0]) if len(tracked) else -1)
        return torch.tensor(per_index, dtype=torch.long)

    def _per_channel_param(self, node: fx.Node, name: str, operands: list, vals: list,
                           ts: list) -> Tracked | None:
        """``x * p``, ``x + p``, ``x - p`` with ``p`` a parameter whose dim 0 lies along one
        dim of ``x`` (``p`` as it is along the last dim, or a view that only inserts size-1
        dims: ``D[None, :, None]``, ``A[None, :, None, :]``), every index of that dim one
        tied set of ``x``'s channels (a learned per-channel scale, shift or decay): recorded
        as a site whose parameter shrink slices along dim 0. Read directly, a follower mask
        zeroes it with its channels, so the result is zero when they are pruned; read
        through a view or computed from it, only a product keeps ``x``'s zeros. None when the
        pattern does not hold (the general rules apply)."""
        if name not in ("mul", "add", "sub") or len(vals) < 2 or self.region:
            return None  # (a region's attributes are its own constants)
        params = (ParamRef, DerivedParam)
        i = 0 if isinstance(vals[0], params) else 1 if isinstance(vals[1], params) else None
        if i is None or ts[1 - i] is None:
            return None
        ref, t = vals[i], ts[1 - i]
        if isinstance(ref, DerivedParam) and name != "mul":
            return None  # no follower mask on a computed value: only a product stays 0
        try:  # read from the module: behind a mask node the operand has no meta value
            val = self.gm.get_parameter(ref.name)
        except AttributeError:
            return None
        dims = self._param_dims(val, concrete_shape(operands[i]), t.ids.dim())
        along = channel_dim(val.shape)
        if dims is None or int(np.prod([t.ids.shape[d] for d in dims])) != val.shape[along]:
            return None
        rest = [d for d in range(t.ids.dim()) if d not in dims]
        ids = self.one_id_each(t.ids.permute(*rest, *dims).reshape(-1, val.shape[along]).T)
        if ids is None:
            return None
        if self.all_whole(ids):
            return None  # nothing prunable flows here: the general rules
        direct = isinstance(operands[i], fx.Node) and along == 0 and operands[i].op in (
            "get_attr", "call_module")  # (a follower mask masks dim 0)
        self.norms[node.name] = NormSite(node.name, ref.name.rpartition(".")[0], self.emit(ids),
                                         (ref.name, None, None, None))
        if name != "mul" and not direct:  # no follower mask reaches a view: not zero
            return Tracked(t.ids, torch.zeros_like(t.zero))
        return Tracked(t.ids, t.zero.clone())

    @staticmethod
    def _param_dims(val: torch.Tensor, seen: tuple[int, ...] | None, rank: int
                    ) -> list[int] | None:
        """The dims of a rank-``rank`` result that ``val``'s first dim of size > 1 lies
        along (dim 0, or the only one: ``A_log`` of shape ``(1, 1, H, 1)``), when the
        operand (of shape ``seen``; None: ``val`` itself) is ``val`` with size-1 dims
        inserted or dropped only (one dim), or a 1-D ``val`` split row-major over
        consecutive dims (``dt_bias.view(1, 1, H, D)``: one dim per head and head
        channel); None otherwise."""
        seen = tuple(val.shape) if seen is None else seen
        sizes = [size for size in val.shape if size != 1]
        if not sizes or sizes[0] < 2 or not seen or len(seen) > rank:
            return None
        aligned = (1,) * (rank - len(seen)) + tuple(seen)
        big = [k for k, size in enumerate(aligned) if size != 1]
        if [aligned[k] for k in big] == sizes:
            return big[:1]
        return vector_split_dims(sizes[0], aligned) if len(sizes) == 1 else None

    def _dims(self, node: fx.Node, rank: int, default_all: bool = True) -> list[int]:
        at = 2 if op_name(node.target) in ("linalg_vector_norm", "norm") else 1  # (x, ord, dim)
        dims = node.args[at] if len(node.args) > at else node.kwargs.get("dim")
        if dims is None:
            return list(range(rank)) if default_all else []
        dims = [dims] if isinstance(dims, int) else list(dims)
        return sorted({d % rank for d in dims}) if dims else list(range(rank))

    def reduce(self, node: fx.Node, name: str) -> Any:
        x = self.value(node.args[0])
        if not isinstance(x, Tracked) or name in ("var_mean",):
            return self.reject(node, "reduction form not understood")
        dims = self._dims(node, x.ids.dim())
        keep = [d for d in range(x.ids.dim()) if d not in dims]
        fib = x.ids.permute(*keep, *dims).reshape(*[x.ids.shape[d] for d in keep], -1)
        zf = x.zero.permute(*keep, *dims).reshape(*[x.ids.shape[d] for d in keep], -1)
        ids, zero = fib.amax(-1), zf.all(-1)
        if self._sum_of_zeros(node, name, x):
            # a pruned channel adds exactly 0: nothing to tie; a fibre of several channels
            # carries none of them (an L2 norm over an MLP's units, x.pow(2).sum(-1)),
            # unless they are one tied set laid along a kept dim (a head's channels)
            single = (fib.amin(-1) == ids) | one_set_laid_along(self, x, fib, keep)
            ids, zero = torch.where(single, ids, torch.full_like(ids, -1)), zero & single
        else:
            self._mixing(node, x, dims, tie=(name == "sum"))
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)) and val and isinstance(val[0], torch.Tensor):
            # max.dim / min.dim: (values, indices); the values carry the ids
            shape = tuple(hint(s) for s in val[0].shape)
            return (Tracked(ids.reshape(shape), zero.reshape(shape)), None)
        out_shape = self.shape(node) if isinstance(val, torch.Tensor) else None
        if out_shape is None:
            return None
        return Tracked(ids.reshape(out_shape), zero.reshape(out_shape))

    def _sum_of_zeros(self, node: fx.Node, name: str, x: Tracked) -> bool:
        """A sum (or a p-norm, p > 0) whose every tracked element is exactly 0 when its
        channel is pruned: removing the channel leaves the result as it is."""
        if name == "linalg_vector_norm" or name == "norm":
            p = node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2)
            if not isinstance(p, (int, float)) or not p > 0:
                return False
        elif name != "sum":
            return False
        tracked = x.ids >= 0
        return bool(tracked.any()) and bool(x.zero[tracked].all())

    def _mixing(self, node: fx.Node, x: Tracked, dims: list[int], tie: bool) -> None:
        """Reduce over ``dims``: several tied sets in one fiber are tied (sum) or whole."""
        keep = [d for d in range(x.ids.dim()) if d not in dims]
        fibers = x.ids.permute(*keep, *dims).reshape(-1, int(np.prod([x.ids.shape[d] for d in dims])))
        for row in torch.unique(fibers, dim=0):
            if self.n_components(row) > 1:
                if tie:
                    self.tie_all(row)
                else:
                    self.whole.update(torch.unique(row[row >= 0]).tolist())

    def normalize(self, node: fx.Node, name: str) -> Any:
        x = self.value(node.args[0])
        if not isinstance(x, Tracked):
            return self.reject(node, "normalisation of a non-first operand")
        rank = x.ids.dim()
        if name in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"):
            n = len(node.args[1])
            dims = list(range(rank - n, rank))
        elif name in ("group_norm", "native_group_norm"):
            return self.reject(node, "group norm")
        else:
            dims = [int(node.args[1]) % rank]
        self._mixing(node, x, dims, tie=softmax_ties(name, x, dims))  # sinks from a linear
        for p in node.args[2:4] if name != "cumsum" else ():
            if isinstance(p, fx.Node) and isinstance(p.meta.get("val"), torch.Tensor):
                self.check_untracked_operand(x, tuple(hint(s) for s in p.meta["val"].shape), node,
                                             True)
        # an RMS norm of an all-zero fibre is zero (x / sqrt(mean(x^2) + eps)); others are not
        rms = name in ("rms_norm", "_fused_rms_norm")
        out = Tracked(x.ids, x.zero.clone() if rms else torch.zeros_like(x.zero))
        if name == "native_layer_norm":
            return (out, None, None)
        if name == "_fused_rms_norm":
            return (out, None)
        return out

    def batch_norm(self, node: fx.Node, name: str) -> Any:
        """Per-channel affine on dim 1: ids kept; zero when affine (shrink gates and slices
        its weight, bias and running statistics)."""
        x = self.value(node.args[0])
        if not isinstance(x, Tracked):
            return None
        params = [self.value(a) for a in node.args[1:5]]
        if any(p is not None and not isinstance(p, ParamRef) for p in params):
            return self.reject(node, "batch norm with computed statistics or affine")
        rows = x.ids.movedim(1, -1).reshape(-1, x.ids.shape[1])
        if not bool((rows == rows[0]).all()):
            return self.reject(node, "batch norm over channels that vary by position")
        names = tuple(p.name if isinstance(p, ParamRef) else None for p in params)
        owner = (names[0] or names[1] or "").rpartition(".")[0]
        self.norms[node.name] = NormSite(node.name, owner, self.emit(rows[0]), names)
        affine = names[0] is not None and names[1] is not None
        out = Tracked(x.ids, torch.full_like(x.zero, affine))
        return out if name == "batch_norm" else (out, None, None)
