"""Exact budgets: cut masks to a target sparsity or MACs fraction, and weight costs.

``weight_costs`` gives, per masked weight, the MACs one weight takes part in for
one input sample, read from the one MAC counter
(:mod:`sparsify_fx.passes.count_macs`, stored per node at transform).
``apply_budget`` freezes every mask to exactly the top-scored weights that fit.
For coupled channel masks the MACs budget is counted as :func:`channel_macs`
does: the MACs of every Conv/Linear call after shrink (a removed channel also
removes the next layer's input channel). Both only read the model, except
``apply_budget`` which freezes the masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, fx, nn

from sparsify_fx.passes.stored_analysis import weight_macs_of

from .config import config_of
from .errors import BudgetError, ConfigError
from .granularity import parse_granularity
from .cost_model import (ChannelCost, ChannelMacs, budget_cost, channel_graph, channel_macs,
                         is_coupled)
from .mask_index import MaskEntry, masks, unwrap


def weight_costs(model: nn.Module, example_inputs: Sequence[Tensor] | Tensor) -> dict[str, float]:
    """MACs per weight per sample for every masked weight (name -> float).

    A weight's cost is the dense MACs the one counter charges to it on
    ``example_inputs`` (masks seen as identity, every call summed), divided by the
    batch size (dim 0 of the first input) and the weight's element count:
    Conv/Linear: output positions (tokens) per sample; ConvTranspose: input
    positions; attention projections: the tokens they project. A weight the forward
    never multiplies with costs 1 (like one token); auxiliary masks (biases,
    BatchNorm affine of coupled channels) cost 0: they take part in no MACs. A
    coupled channel model also gets the cost of every unmasked Conv/Linear weight
    of its graph (their input channels shrink too; see :func:`channel_macs`).

    Runs the model at most once: on a model transformed with ``example_inputs`` of
    these shapes it reads the per-node MACs stored there and runs nothing. Writes
    graph nodes' ``meta`` only (``tensor_meta`` and MACs, as ShapeProp would).
    """
    model = unwrap(model)
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1
    dense = weight_macs_of(model, inputs)

    def per_sample(name: str, shape: Sequence[int]) -> float | None:
        macs = dense.get(name, 0)
        return macs / (batch * math.prod(shape)) if macs else None

    entries = masks(model)
    costs: dict[str, float] = {}
    for e in entries:
        cost = 0.0 if e.mask.auxiliary else per_sample(e.name, e.mask.weight_shape)
        costs[e.name] = 1.0 if cost is None else cost  # None: never used on these inputs
    if isinstance(model, fx.GraphModule) and is_coupled(entries):
        for prod in channel_graph(model).producers.values():
            if prod.weight in costs or prod.macs_unit is not None:  # attention: own MACs unit
                continue
            cost = per_sample(prod.weight, prod.shape)
            if cost is not None:
                costs[prod.weight] = cost
    return costs


@dataclass
class CutResult:
    """Outcome of an exact cut: weights kept, total, and bits changed vs the learned rule."""

    kept: int
    total: int
    changed_bits: int
    per_layer: dict[str, float]
    #: a verified latency cut's rounds (aimed, estimated, measured fractions), else empty
    latency: list = field(default_factory=list)

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
                 target_latency: float | None = None, cost: ChannelCost | None = None,
                 per_layer: bool = False, scores: Mapping[str, Tensor] | None = None,
                 final: bool = True, round_to: int | None = None) -> CutResult:
    """Freeze every mask to the top-scored weights that fit the budget; mutates masks.

    ``target_sparsity``: fraction of masked weights to zero, global (default),
    per layer (``per_layer=True``) or a ``{weight name: fraction}`` dict.
    Element masks hit it to one weight, channel masks to one channel.
    ``target_macs``: fraction of the masked layers' dense MACs to keep (needs
    ``costs`` from :func:`weight_costs`); for coupled channel masks, of every
    Conv/Linear call's MACs as the shrunk model computes them (kept MACs stay
    within one channel slot's cost below the budget). ``scores`` overrides each
    mask's own ranking (e.g. ``|w|`` for magnitude pruning; for coupled masks either
    ``{group key: (K,) scores}`` such as ``channel_l1_scores`` or ``{weight name:
    scores}``, summed per channel and over the channels a slot gates).
    ``target_latency`` (coupled channel masks): fraction of the dense onnxruntime
    latency to keep, counted by ``cost`` (default: ``cost_model.channel_latency`` on
    ``transform``'s example inputs); ``cost`` with ``target_macs`` budgets that cost.
    ``final``: this cut delivers the budget asked for (sets every mask's
    ``at_target``, which ``fold``/``shrink``/``export_onnx`` require when
    ``transform`` was given a target); schedules pass ``final=False`` for their
    intermediate cuts. Without ``costs``, a MACs budget counts them on the
    ``example_inputs`` given to ``transform``.
    ``round_to`` (coupled channel masks): every channel group keeps a multiple of
    ``round_to`` channels (or all of them), taken in whole blocks of its ranking; onnxruntime
    runs ragged widths much slower (see docs/latency.md). Default: the cost model's
    ``round_to`` (8 for latency costs), else 1.
    A final cut against a latency cost that can measure (``channel_latency(...,
    verify=True)``, the default) is verified in onnxruntime: the shrunk model is timed
    against the dense one and the cut corrected until they agree within 5 %
    (:func:`~sparsify_fx.latency_verify.verified_cut`; rounds in ``CutResult.latency``).
    """
    entries = [e for e in masks(model) if not e.mask.auxiliary]
    if target_latency is not None or cost is not None:  # one ChannelCost carries the budget
        target_macs, costs = budget_cost(model, entries, target_sparsity, target_macs,
                                         target_latency, cost)
    if round_to is None:
        round_to = getattr(costs, "round_to", 1)
    if int(round_to) < 1:
        raise ConfigError(f"round_to must be a positive channel count, got {round_to!r}")
    verify = (final and isinstance(costs, ChannelCost) and costs.unit == "ms"
              and costs.measure is not None)
    if verify and scores is None:  # every round ranks as the first did (a cut freezes masks)
        from sparsify_fx.passes.couple_channels import group_masks
        scores = {k: m.ranking_scores().detach().clone() for k, m in group_masks(model).items()}

    def cut(fraction: float | None) -> CutResult:
        result = _cut(model, entries, target_sparsity, fraction, costs, per_layer, scores,
                      int(round_to))
        for e in entries:
            e.mask.at_target.fill_(bool(final))
        return result

    if not verify:
        return cut(target_macs)
    from .latency_verify import verified_cut
    assert isinstance(costs, ChannelCost) and costs.measure is not None
    result, checks = verified_cut(float(target_macs), cut, lambda: costs.fraction_of(model),
                                  lambda: costs.measure(model))
    result.latency = checks
    costs.meta["verified"] = [c.to_dict() for c in checks]
    return result


def _cut(model: nn.Module, entries: list[MaskEntry],
         target_sparsity: float | Mapping[str, float] | None, target_macs: float | None,
         costs: Mapping[str, float] | None, per_layer: bool,
         scores: Mapping[str, Tensor] | None, round_to: int = 1) -> CutResult:
    if not entries:
        raise BudgetError("model has no masks to cut; call sparsify_fx.transform first")
    if (target_sparsity is None) == (target_macs is None):
        raise ConfigError("apply_budget needs exactly one of target_sparsity or target_macs")
    if target_macs is not None and costs is None:
        cfg = config_of(unwrap(model))
        if cfg is None or cfg.example_inputs is None:
            raise ConfigError("target_macs needs per-weight costs: pass example_inputs= to "
                              "transform, or costs=sparsify_fx.budget.weight_costs(model, "
                              "example_inputs)")
        costs = weight_costs(model, cfg.example_inputs)
    if is_coupled(entries):
        if isinstance(target_sparsity, Mapping) or per_layer:
            raise ConfigError("coupled channel masks take one global target (sparsity or "
                              "MACs); per-layer targets would split coupled channels")
        return _coupled_cut(model, entries, target_sparsity, target_macs, costs, scores,
                            round_to)
    if round_to > 1:
        raise ConfigError("round_to applies to coupled channel masks (transform(..., "
                          "granularity='channel') on a fully traced model)")

    def ranking(e: MaskEntry) -> Tensor:
        s = scores[e.name] if scores is not None and e.name in scores else e.mask.ranking_scores()
        s = s.detach().float()
        if s.shape != e.mask.score_shape:  # e.g. |w| for a channel mask: sum per channel
            s = s.reshape(e.mask.score_shape[0], -1).abs().sum(1).reshape(e.mask.score_shape)
        return s.reshape(-1).cpu()

    before = {e.name: e.mask.learned_keep().reshape(-1).cpu().clone() for e in entries}
    # a granularity with a fixed pattern (N:M) is its own budget: each mask keeps its pattern
    free = []
    for e in entries:
        gran = parse_granularity(e.mask.granularity)
        if gran.is_pattern:
            e.mask.freeze(gran.pattern_keep(ranking(e).reshape(e.mask.score_shape),
                                            input_dim=0 if e.kind == "matmul" else 1))
        else:
            free.append(e)
    if isinstance(target_sparsity, Mapping) or (per_layer and target_sparsity is not None):
        groups = [[e] for e in free]
    else:
        groups = [free] if free else []
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
    changed = sum(int((before[e.name] != e.mask.hard_mask().reshape(-1).cpu()).sum())
                  * e.mask.weights_per_score
                  for e in entries)
    return _cut_result(entries, changed)


def _cut_result(entries: list[MaskEntry], changed_bits: int) -> CutResult:
    """Kept/total weights and per-layer sparsity of the (just frozen) masks."""
    kept = sum(e.mask.kept_weights() for e in entries)
    total = sum(e.mask.numel() for e in entries)
    per = {e.name: 1.0 - e.mask.kept_weights() / e.mask.numel() for e in entries}
    return CutResult(kept, total, changed_bits, per)


def _coupled_cut(model: nn.Module, entries: list[MaskEntry], target_sparsity: float | None,
                 target_macs: float | None, costs: Mapping[str, float] | None,
                 scores: Mapping[str, Tensor] | None, round_to: int = 1) -> CutResult:
    """Cut shared channel groups: keep the highest-ranked group slots (one score each)
    while the budget holds; every group keeps at least its best slot (its best block of
    ``round_to`` slots: see :func:`_blocks`). Sparsity: a slot
    costs the weights of every channel it gates, summed over its follower masks (channels
    kept whole are fixed). MACs: the MACs
    :func:`shrink` would leave, counted by :func:`channel_macs` (a removed channel also
    removes the next layer's input channel), so the shrunk model meets the budget."""
    from sparsify_fx.passes.couple_channels import group_masks
    groups = group_masks(model)
    order = list(groups)
    start, offset = {}, 0
    for key in order:
        start[id(groups[key])] = offset
        offset += math.prod(groups[key].score_shape)
    slot_units = torch.zeros(offset, dtype=torch.float64)  # weights gated per slot
    fixed = dense = 0.0
    slots_of: dict[str, Tensor] = {}
    for e in entries:
        unit = float(e.mask.weights_per_score)
        dense += unit * e.mask.score_shape[0]
        glob = torch.full((e.mask.index.numel(),), -1, dtype=torch.long)
        for src, sel, slot in e.mask.source_slots():
            glob[sel.cpu()] = slot.cpu() + start[id(src)]
        fixed += unit * int((glob < 0).sum())
        slots_of[e.name] = glob
        slot_units.index_add_(0, glob[glob >= 0], torch.full((int((glob >= 0).sum()),), unit,
                                                              dtype=torch.float64))
    if scores is not None and not any(k in scores for k in order) and any(
            e.name in scores for e in entries):
        ranking = _slot_scores(entries, scores, slots_of, offset)
    else:
        ranking = torch.cat([
            (scores[k] if scores is not None and k in scores else groups[k].ranking_scores())
            .detach().float().reshape(-1).cpu() for k in order])
    before = torch.cat([groups[k].learned_keep().reshape(-1).cpu() for k in order])
    floor = torch.zeros(offset, dtype=torch.bool)  # each group keeps its best slot
    for m in groups.values():
        first = start[id(m)]
        floor[first + int(torch.argmax(ranking[first:first + math.prod(m.score_shape)]))] = True
    ranking = torch.where(floor, torch.tensor(float("inf")), ranking)
    spans = [(start[id(groups[k])], math.prod(groups[k].score_shape), 1) for k in order]
    if round_to > 1:  # blocks of round_to channels: a head (head_dim channels) is one block
        from .cost_model import slot_widths
        widths = slot_widths(model)
        spans = [(first, n, max(1, round_to // int(widths[first:first + n].min())))
                 for first, n, _ in spans]
    order_slots, ends, block_scores = _blocks(ranking, spans, round_to)
    n_floor = int(torch.isinf(block_scores).sum())
    floor_slots = int(ends[n_floor - 1]) if n_floor else 0
    if target_macs is not None:
        assert costs is not None
        keep = _macs_prefix(costs if isinstance(costs, ChannelCost) else
                            channel_macs(model, costs), order_slots, ends, float(target_macs),
                            n_floor)
    else:
        fraction = 1.0 - float(target_sparsity)  # type: ignore[arg-type]
        budget = fraction * dense - fixed
        floor_units = float(slot_units[order_slots[:floor_slots]].sum())
        if budget < floor_units:
            raise BudgetError(f"the budget keeps {fraction:.3f} of the masked weights, but "
                              "channels that must stay whole and one channel per group already "
                              f"take {(fixed + floor_units) / dense:.3f}; raise the budget")
        if round_to == 1:
            keep = _keep_top(ranking, slot_units, budget)
        else:  # whole blocks, best first, while their weights fit
            block_units = torch.zeros(len(ends), dtype=torch.float64).index_add_(
                0, torch.repeat_interleave(torch.arange(len(ends)),
                                           torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))),
                slot_units[order_slots])
            cum = torch.cumsum(block_units, 0)
            n = int(torch.searchsorted(cum, torch.tensor(budget + 1e-6, dtype=torch.float64),
                                       right=True))
            keep = torch.zeros(offset, dtype=torch.bool)
            keep[order_slots[:int(ends[n - 1]) if n else 0]] = True
    changed = int(slot_units[before != keep].sum())
    for key in order:
        m = groups[key]
        n = math.prod(m.score_shape)
        m.freeze(keep[start[id(m)]:start[id(m)] + n].reshape(m.score_shape))
    return _cut_result(entries, changed)


def _slot_scores(entries: list[MaskEntry], scores: Mapping[str, Tensor],
                 slots_of: Mapping[str, Tensor], n_slots: int) -> Tensor:
    """Per-weight scores (``{weight name: |w| or (C, ...) scores}``) summed into group
    slots: a channel's score is the sum of ``|scores|`` over its row, and a slot's the sum
    over every producer channel it gates (the L1 norm for ``|w|``)."""
    out = torch.zeros(n_slots, dtype=torch.float64)
    for e in entries:
        if e.name not in scores:
            continue
        s = scores[e.name].detach().double().cpu()
        per_channel = s.reshape(e.mask.score_shape[0], -1).abs().sum(1)
        glob = slots_of[e.name]
        out.index_add_(0, glob[glob >= 0], per_channel[glob >= 0])
    return out.float()


def _blocks(ranking: Tensor, spans: Sequence[tuple[int, int, int]], round_to: int
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Slots in cut order, taken in blocks: ``(slot order, block ends, block scores)``.

    Each group (``(first slot, n slots, block size)`` in ``spans``) is split, in its own
    descending ranking, into blocks of that many slots (the last one smaller when ``n``
    is not a multiple); a block scores as its weakest slot (inf if it holds a floor slot), blocks are sorted by descending score
    (stable: a group's blocks stay in order). ``ends[b]``: slots in the first ``b + 1``
    blocks. With ``round_to == 1`` this is every slot by descending score."""
    if round_to == 1:
        order = torch.sort(ranking, descending=True, stable=True).indices
        return order, torch.arange(1, len(order) + 1), ranking[order]
    blocks: list[Tensor] = []
    for first, n, size in spans:
        local = torch.sort(ranking[first:first + n], descending=True, stable=True).indices + first
        blocks += list(torch.split(local, size))
    # a block holding a floor slot (score inf) is a floor block: kept whole
    scores = torch.stack([ranking[b].max() if torch.isinf(ranking[b]).any() else
                          ranking[b].min() for b in blocks])
    by_score = torch.sort(scores, descending=True, stable=True).indices.tolist()
    order = torch.cat([blocks[b] for b in by_score])
    ends = torch.cumsum(torch.tensor([len(blocks[b]) for b in by_score]), 0)
    return order, ends, scores[by_score]


def _macs_prefix(cm: ChannelMacs, order: Tensor, ends: Tensor, fraction: float,
                 floor: int) -> Tensor:
    """Keep the longest prefix of whole blocks (at least ``floor`` blocks; ``order`` and
    ``ends`` from :func:`_blocks`) whose cost fits ``fraction`` of the dense cost (cost
    grows with the prefix: binary search)."""
    budget = fraction * cm.dense * (1.0 + 1e-12)  # float64 rounding only

    def top(n: int) -> Tensor:
        keep = torch.zeros(cm.n_slots, dtype=torch.bool)
        keep[order[:int(ends[n - 1]) if n else 0]] = True
        return keep

    if cm.macs(top(floor)) > budget:
        raise BudgetError(f"the MACs budget keeps {fraction:.3f} of the dense MACs, but channels "
                          "that must stay whole and one channel per group already take "
                          f"{cm.macs(top(floor)) / cm.dense:.3f}; raise the budget")
    lo, hi = floor, len(ends)  # macs(top(lo)) fits; find the largest n that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cm.macs(top(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return top(lo)


def macs_fraction(model: nn.Module, costs: Mapping[str, float]) -> float:
    """Kept MACs / dense MACs, from the hard masks.

    Element and independent channel masks: over the masked layers. Coupled
    channel masks: over every Conv/Linear call, counting removed input channels
    too (:func:`channel_macs`), i.e. what the shrunk model computes.
    """
    entries = [e for e in masks(model) if not e.mask.auxiliary]
    if isinstance(costs, ChannelCost):
        return costs.hard_fraction()
    if is_coupled(entries):
        return channel_macs(model, costs).hard_fraction()
    return kept_fraction(entries, costs)


def kept_fraction(entries: Sequence[MaskEntry], costs: Mapping[str, float] | None = None) -> float:
    """Kept / total weights of ``entries`` under their hard masks; with ``costs``, each
    weight counts its MACs (so this is the kept MACs fraction of those layers)."""
    def cost(e: MaskEntry) -> float:
        return costs[e.name] if costs is not None else 1.0
    kept = sum(e.mask.kept_weights() * cost(e) for e in entries)
    return kept / sum(e.mask.numel() * cost(e) for e in entries)
