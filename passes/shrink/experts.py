"""Shrink of fused 3-D expert weights (mixture-of-experts; read by
:mod:`sparsify_fx.passes.shrink.to_source`).

A producer of kind ``"experts"`` (:mod:`sparsify_fx.passes.aten.experts`) is a
parameter ``(E, out, in)`` (``weight_layout`` ``"oi"``) or ``(E, in, out)`` (``"io"``)
whose channel ids are shared by every expert: the kept units are the same in every
expert, so the sliced tensor stays one ``(E, kept out, kept in)`` tensor and the
experts module keeps one width. Its integer width attributes named like an MLP width
(``intermediate_dim``, ``intermediate_size``, ``expert_dim``, ...) follow; the check
against the hard-masked capture (in ``to_source``) catches any other.

Grouped-matmul kernels (``torch._grouped_mm`` on CPU) need every stride of the expert
operands a multiple of 16 bytes: :func:`pad_expert_units` keeps, per experts layer,
pruned units (exactly zero after the fold: zero gate and up rows, so a zero input to
the down projection) until the kept count is a multiple of ``16 / itemsize``. The
output is unchanged; the shrunk layer is at most ``16 / itemsize - 1`` units wider
than the cut.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsify_fx.passes.aten.experts import EXPERTS
from sparsify_fx.passes.channels.graph_types import ChannelGraph, Producer

#: substrings of an experts module's attribute names that hold its unit count
WIDTH_NAMES = ("intermediate", "expert_dim", "ffn_dim", "moe_dim")
#: the width attribute ``to_source`` scales on every group's owner itself
SCALED_ELSEWHERE = ("intermediate_size",)


def _set(src: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = src.get_submodule(owner_path) if owner_path else src
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _sync_widths(owner: nn.Module, old: int, new: int) -> None:
    if old == new:
        return
    for attr, value in list(vars(owner).items()):
        if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value == old and attr not in SCALED_ELSEWHERE and any(w in attr for w in WIDTH_NAMES):
            setattr(owner, attr, int(new))


def pad_expert_units(src: nn.Module, cg: ChannelGraph, keep_id: np.ndarray) -> np.ndarray:
    """``keep_id`` with pruned units added to each expert producer until its kept units
    are 16-byte aligned (see module doc); the input unchanged when nothing is added."""
    out = keep_id
    for prod in cg.producers.values():
        if prod.kind != EXPERTS:
            continue
        align = max(1, 16 // src.get_parameter(prod.weight).element_size())
        comps = cg.component[prod.out_ids]
        units = len(np.unique(comps))  # a gated unit: a gate row and an up row
        kept = np.unique(comps[out[prod.out_ids]])
        missing = (-len(kept)) % align
        if not missing or len(kept) == units:
            continue
        pruned = [c for c in dict.fromkeys(comps.tolist()) if c not in set(kept.tolist())]
        if out is keep_id:
            out = keep_id.copy()
        out[np.isin(cg.component, pruned[:missing])] = True
    return out


def slice_experts(src: nn.Module, prod: Producer, keep_id: np.ndarray,
                  done: dict[str, tuple]) -> None:
    """Slice one expert weight of ``src`` to its kept outputs and inputs (mutates ``src``;
    records ``(kept out, total out)`` in ``done`` as ``to_source`` does for a linear)."""
    if prod.kind != EXPERTS or prod.weight in done:
        return
    out_keep = torch.from_numpy(keep_id[prod.out_ids])
    in_keep = torch.from_numpy(keep_id[prod.in_ids]) if prod.in_ids is not None else None
    done[prod.weight] = (int(out_keep.sum()), len(out_keep))
    if bool(out_keep.all()) and (in_keep is None or bool(in_keep.all())):
        return
    out_dim, in_dim = (1, 2) if prod.weight_layout == "oi" else (2, 1)
    w = src.get_parameter(prod.weight).detach()
    w = w.index_select(out_dim, out_keep.nonzero().reshape(-1))
    if in_keep is not None:
        w = w.index_select(in_dim, in_keep.nonzero().reshape(-1))
    _set(src, prod.weight, w)
    if prod.bias is not None:  # an expert bias (E, out)
        _set(src, prod.bias, src.get_parameter(prod.bias).detach()[:, out_keep])
    owner = src.get_submodule(prod.weight.rpartition(".")[0])
    _sync_widths(owner, len(out_keep), int(out_keep.sum()))
    if in_keep is not None:
        _sync_widths(owner, len(in_keep), int(in_keep.sum()))


__all__ = ["slice_experts", "pad_expert_units", "WIDTH_NAMES"]
