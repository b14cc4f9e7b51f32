"""MACs of a channel-coupled model as a function of the kept channel-group slots.

What :func:`~sparsify_fx.passes.shrink.shrink` leaves: a removed channel takes its
producer's output row and every consumer's input column with it, so a layer's MACs
are ``per-weight cost x kernel x kept outputs x kept inputs`` (per conv group).
Used by :mod:`sparsify_fx.budget` for ``target_macs`` cuts and ``macs_fraction``.
Read-only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

import torch
from torch import Tensor, fx, nn

from .errors import BudgetError, ConfigError
from .mask import Mask
from .mask_index import MaskEntry, masks, unwrap


def is_coupled(entries: list[MaskEntry]) -> bool:
    return any(hasattr(e.mask, "sources") for e in entries)


def channel_graph(gm: fx.GraphModule):  # -> ChannelGraph (passes imported lazily: no cycle)
    """The channel analysis ``shrink`` uses: coupled producer weights may lose channels."""
    from sparsify_fx.passes.channel_groups import analyze_channels
    coupled = {str(e.node.args[0].target) for e in masks(gm)
               if hasattr(e.mask, "sources") and not e.mask.auxiliary and e.route == "graph"
               and e.node is not None}
    return analyze_channels(gm, coupled)


@dataclass
class _ChannelLayer:
    weight: str
    unit: float  # MACs per sample of one (output channel, input channel) pair
    groups: int
    out_slot: Tensor  # global slot of each output channel; n_slots means "whole"
    in_slot: Tensor  # global slot of each input channel (all conv groups)


@dataclass
class ChannelMacs:
    """MACs of every Conv/Linear call of a coupled channel model as a function of the
    kept group slots (the group masks' slots concatenated in ``group_masks`` order).

    A layer's MACs are ``unit * sum over conv groups of kept outputs x kept inputs``:
    exactly the MACs of the layer :func:`~sparsify_fx.passes.shrink.shrink` leaves.
    """

    layers: list[_ChannelLayer]
    group_masks: list[Mask]
    n_slots: int

    def macs(self, keep: Tensor) -> float:
        """MACs per sample when the slots ``keep`` (bool, ``(n_slots,)``) are kept."""
        ext = torch.cat([keep.reshape(-1).bool().cpu(), torch.ones(1, dtype=torch.bool)])
        total = 0.0
        for lay in self.layers:
            o = ext[lay.out_slot].reshape(lay.groups, -1).sum(1).double()
            i = ext[lay.in_slot].reshape(lay.groups, -1).sum(1).double()
            total += lay.unit * float((o * i).sum())
        return total

    @cached_property
    def dense(self) -> float:
        """MACs per sample with every slot kept (computed once: the layers never change)."""
        return self.macs(torch.ones(self.n_slots, dtype=torch.bool))

    def hard_keep(self) -> Tensor:
        """The group masks' current hard decisions, concatenated."""
        return torch.cat([m.hard_mask().reshape(-1).cpu() for m in self.group_masks])

    def hard_fraction(self) -> float:
        """Kept / dense MACs under the group masks' current hard decisions."""
        return self.macs(self.hard_keep()) / self.dense


def channel_macs(model: nn.Module, costs: Mapping[str, float]) -> ChannelMacs:
    """MACs bookkeeping of a coupled channel model (read-only).

    Covers every Conv/Linear call of the traced graph, masked or not (an unmasked
    layer loses input channels when its producer is pruned). ``costs``: from
    :func:`weight_costs` on this model (it includes the unmasked layers).
    """
    from sparsify_fx.passes.couple_channels import GROUP_PREFIX, group_masks
    gm = unwrap(model)
    if not isinstance(gm, fx.GraphModule):
        raise BudgetError("coupled channel budgets need one fully traced GraphModule")
    cg = channel_graph(gm)
    groups = group_masks(gm)
    keys = [f"{GROUP_PREFIX}{g.index}" for g in cg.groups]
    if sorted(keys) != sorted(groups) or any(
            math.prod(groups[k].score_shape) != len(g.components) for k, g in zip(keys, cg.groups)):
        raise BudgetError("the model's channel groups no longer match its graph (edited after "
                          "transform?); re-run sparsify_fx.transform(..., granularity='channel')")
    ordered = [k for k in groups]  # slot order: group_masks order
    base = {k: sum(math.prod(groups[j].score_shape) for j in ordered[:i])
            for i, k in enumerate(ordered)}
    n_slots = sum(math.prod(m.score_shape) for m in groups.values())
    first = torch.tensor([base[k] for k in keys] + [n_slots], dtype=torch.long)

    def slots(ids) -> Tensor:
        g, s = cg.slots(ids)
        g = torch.from_numpy(g).long()
        s = torch.from_numpy(s).long()
        return torch.where(g >= 0, first[g.clamp(min=0)] + s, torch.full_like(g, n_slots))

    layers = []
    for prod in cg.producers.values():
        if prod.weight not in costs:
            raise ConfigError(f"no MACs cost for {prod.weight}; compute the costs with "
                              "sparsify_fx.budget.weight_costs(model, example_inputs) on this "
                              "coupled model")
        shape = tuple(gm.get_parameter(prod.weight).shape)
        n_in = shape[1] * prod.groups
        in_slot = (slots(prod.in_ids) if prod.in_ids is not None
                   else torch.full((n_in,), n_slots, dtype=torch.long))
        layers.append(_ChannelLayer(prod.weight, float(costs[prod.weight]) * math.prod(shape[2:]),
                                    prod.groups, slots(prod.out_ids), in_slot))
    return ChannelMacs(layers, [groups[k] for k in ordered], n_slots)
