"""Exact budgets: cut masks to a target sparsity or MACs fraction, and weight costs.

``weight_costs`` gives, per masked weight, the MACs one weight takes part in for
one input sample (shape propagation over the graph with ``example_inputs``).
``apply_budget`` freezes every mask to exactly the top-scored weights that fit.
Both only read the model, except ``apply_budget`` which freezes the masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import BudgetError, ConfigError
from .mask import Mask
from .mask_index import MaskEntry, hard_masks, masks, unwrap


def _out_meta(node: fx.Node) -> Tensor | None:
    meta = node.meta.get("tensor_meta")
    return meta if meta is not None and hasattr(meta, "shape") else None


def weight_costs(model: nn.Module, example_inputs: Sequence[Tensor] | Tensor) -> dict[str, float]:
    """MACs per weight per sample for every masked weight (name -> float).

    Conv/Linear: output elements per output channel (``out.numel() / (N * out_ch)``);
    ConvTranspose: input elements per input channel; weights inside leaf modules
    (attention projections): the leaf's input tokens per sample. Mutates nothing.
    """
    model = unwrap(model)
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    costs: dict[str, float] = {}
    graphs = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    with torch.no_grad(), hard_masks(model, False):
        for gm in graphs:
            if gm is model:
                ShapeProp(gm).propagate(*inputs)
    entries = masks(model)
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1
    for e in entries:
        cost = _graph_cost(e, batch) if e.route == "graph" else None
        if cost is None:
            cost = _leaf_cost(model, e, inputs, batch)
        costs[e.name] = cost
    return costs


def _graph_cost(e: MaskEntry, batch: int) -> float | None:
    assert e.node is not None
    for user in e.node.users:
        out = _out_meta(user)
        if out is None:
            continue
        if e.kind == "conv_transpose":
            x = _out_meta(user.args[0]) if isinstance(user.args[0], fx.Node) else None
            if x is None:
                return None
            return math.prod(x.shape) / (batch * x.shape[1])
        channels = e.mask.weight_shape[0]
        return math.prod(out.shape) / (batch * channels)
    return None


def _leaf_cost(model: nn.Module, e: MaskEntry, inputs: tuple, batch: int) -> float:
    """Tokens (or spatial positions) per sample seen by a weight inside a leaf module."""
    seen: list[tuple[int, ...]] = []

    def hook(_m: nn.Module, args: tuple, _out: object) -> None:
        if args and isinstance(args[0], Tensor):
            seen.append(tuple(args[0].shape))

    handle = e.host.register_forward_hook(hook)
    try:
        with torch.no_grad(), hard_masks(model, False):
            model(*inputs)
    finally:
        handle.remove()
    if not seen:
        return 1.0  # never called on these inputs: costs like a single token
    shape = seen[0]
    if e.kind in ("conv", "depthwise_conv", "grouped_conv", "conv_transpose"):
        return float(math.prod(shape[2:])) if len(shape) > 2 else 1.0
    return math.prod(shape[:-1]) / batch


@dataclass
class CutResult:
    """Outcome of an exact cut: weights kept, total, and bits changed vs the learned rule."""

    kept: int
    total: int
    changed_bits: int
    per_layer: dict[str, float]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total


def _keep_top(scores: Tensor, units: Tensor, budget: float) -> Tensor:
    """Keep highest scores first while the sum of ``units`` stays within ``budget``.

    With unit costs this keeps exactly ``round(budget)`` entries. Ties are broken
    by position (stable sort), so the cut is deterministic.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    cum = torch.cumsum(units[order].double(), 0)
    n_keep = int(torch.searchsorted(cum, torch.tensor(budget + 1e-6, dtype=torch.float64),
                                    right=True))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def apply_budget(model: nn.Module, target_sparsity: float | Mapping[str, float] | None = None,
                 *, target_macs: float | None = None, costs: Mapping[str, float] | None = None,
                 per_layer: bool = False, scores: Mapping[str, Tensor] | None = None) -> CutResult:
    """Freeze every mask to the top-scored weights that fit the budget; mutates masks.

    ``target_sparsity``: fraction of masked weights to zero, global (default),
    per layer (``per_layer=True``) or a ``{weight name: fraction}`` dict.
    Element masks hit it to one weight, channel masks to one channel.
    ``target_macs``: fraction of the masked layers' dense MACs to keep (needs
    ``costs`` from :func:`weight_costs`). ``scores`` overrides each mask's own
    ranking (e.g. ``|w|`` for magnitude pruning).
    """
    entries = [e for e in masks(model) if not e.mask.auxiliary]
    if not entries:
        raise BudgetError("model has no masks to cut; call sparsify_fx.transform first")
    if (target_sparsity is None) == (target_macs is None):
        raise ConfigError("apply_budget needs exactly one of target_sparsity or target_macs")
    if target_macs is not None and costs is None:
        raise ConfigError("target_macs needs per-weight costs: pass "
                          "costs=sparsify_fx.budget.weight_costs(model, example_inputs)")
    if any(hasattr(e.mask, "sources") for e in entries):
        if isinstance(target_sparsity, Mapping) or per_layer:
            raise ConfigError("coupled channel masks take one global target (sparsity or "
                              "MACs); per-layer targets would split coupled channels")
        return _coupled_cut(model, entries, target_sparsity, target_macs, costs, scores)

    def ranking(e: MaskEntry) -> Tensor:
        s = scores[e.name] if scores is not None and e.name in scores else e.mask.ranking_scores()
        s = s.detach().float()
        if s.shape != e.mask.score_shape:  # e.g. |w| for a channel mask: sum per channel
            s = s.reshape(e.mask.score_shape[0], -1).abs().sum(1).reshape(e.mask.score_shape)
        return s.reshape(-1).cpu()

    before = {e.name: e.mask.learned_keep().reshape(-1).cpu().clone() for e in entries}
    if isinstance(target_sparsity, Mapping) or (per_layer and target_sparsity is not None):
        groups = [[e] for e in entries]
    else:
        groups = [entries]
    for group in groups:
        flat = torch.cat([ranking(e) for e in group])
        per_unit = torch.cat([torch.full((e.mask.hard_mask().numel(),),
                                         float(e.mask.weights_per_score)) for e in group])
        if target_macs is not None:
            units = torch.cat([torch.full((e.mask.hard_mask().numel(),),
                                          e.mask.weights_per_score * costs[e.name]) for e in group])
            budget = float(target_macs) * float(units.sum())
        else:
            t = (target_sparsity.get(group[0].name) if isinstance(target_sparsity, Mapping)
                 else target_sparsity)
            if t is None:
                continue
            units = per_unit
            budget = float(round((1.0 - float(t)) * float(per_unit.sum())))
        keep = _keep_top(flat, units, budget)
        offset = 0
        for e in group:
            n = e.mask.hard_mask().numel()
            e.mask.freeze(keep[offset:offset + n].reshape(e.mask.score_shape))
            offset += n
    kept = sum(e.mask.kept_weights() for e in entries)
    total = sum(e.mask.numel() for e in entries)
    changed = sum(int((before[e.name] != e.mask.hard_mask().reshape(-1).cpu()).sum())
                  * e.mask.weights_per_score
                  for e in entries)
    per = {e.name: 1.0 - e.mask.kept_weights() / e.mask.numel() for e in entries}
    return CutResult(kept, total, changed, per)


def _coupled_cut(model: nn.Module, entries: list[MaskEntry], target_sparsity: float | None,
                 target_macs: float | None, costs: Mapping[str, float] | None,
                 scores: Mapping[str, Tensor] | None) -> CutResult:
    """Cut shared channel groups: each group slot costs the weights (or MACs) of every
    channel it gates, summed over its follower masks; channels kept whole are fixed."""
    sources: dict[int, Mask] = {}
    for e in entries:
        for src in e.mask.sources:
            sources.setdefault(id(src), src)
    order = list(sources)
    offset, start = 0, {}
    for sid in order:
        start[sid] = offset
        offset += math.prod(sources[sid].score_shape)
    slot_units = torch.zeros(offset, dtype=torch.float64)
    fixed = dense = 0.0
    for e in entries:
        unit = e.mask.weights_per_score * (costs[e.name] if target_macs is not None else 1.0)
        dense += unit * e.mask.score_shape[0]
        local = e.mask.index.cpu()
        glob = torch.full_like(local, -1)
        pos = 0
        for src in e.mask.sources:
            n = math.prod(src.score_shape)
            sel = (local >= pos) & (local < pos + n)
            glob[sel] = local[sel] - pos + start[id(src)]
            pos += n
        fixed += unit * int((glob < 0).sum())
        slot_units.index_add_(0, glob[glob >= 0], torch.full((int((glob >= 0).sum()),), unit,
                                                              dtype=torch.float64))
    from sparsify_fx.passes.couple_channels import group_masks
    by_key = {id(m): k for k, m in group_masks(model).items()}
    ranking = torch.cat([
        (scores[by_key[sid]] if scores is not None and by_key.get(sid) in scores
         else sources[sid].ranking_scores()).detach().float().reshape(-1).cpu() for sid in order])
    fraction = float(target_macs) if target_macs is not None else 1.0 - float(target_sparsity)
    budget = fraction * dense - fixed
    if budget < 0:
        raise BudgetError(f"the budget keeps {fraction:.3f} of the masked layers, but channels that "
                          f"must stay whole already take {fixed / dense:.3f}; raise the budget")
    before = {sid: sources[sid].learned_keep().reshape(-1).cpu().clone() for sid in order}
    keep = _keep_top(ranking, slot_units, budget)
    changed = 0
    for sid in order:
        n = math.prod(sources[sid].score_shape)
        piece = keep[start[sid]:start[sid] + n]
        changed += int((slot_units[start[sid]:start[sid] + n][before[sid] != piece]).sum())
        sources[sid].freeze(piece.reshape(sources[sid].score_shape))
    kept = sum(e.mask.kept_weights() for e in entries)
    total = sum(e.mask.numel() for e in entries)
    per = {e.name: 1.0 - e.mask.kept_weights() / e.mask.numel() for e in entries}
    return CutResult(kept, total, changed, per)


def macs_fraction(model: nn.Module, costs: Mapping[str, float]) -> float:
    """Kept MACs / dense MACs over the masked layers, from the hard masks."""
    entries = [e for e in masks(model) if not e.mask.auxiliary]
    dense = sum(e.mask.numel() * costs[e.name] for e in entries)
    kept = sum(e.mask.kept_weights() * costs[e.name] for e in entries)
    return kept / dense
