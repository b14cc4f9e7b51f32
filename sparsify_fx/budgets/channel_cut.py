"""The coupled channel cut: shared channel groups cut whole, in blocks, against a budget.

Called by :func:`sparsify_fx.budgets.exact_cut.apply_budget` for coupled channel masks
(``transform(..., granularity="channel")``). Every group keeps at least its best slot
(its best block); slots are taken in blocks of ``round_to`` channels of a group's own
ranking (:func:`_blocks`); a sparsity budget counts the weights a slot gates, a cost
budget (MACs or latency) the :class:`~sparsify_fx.budgets.cost_model.ChannelCost` of what
``shrink`` leaves (:func:`_macs_prefix`). Mutates the group masks (``freeze``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsify_fx.budgets.cut_result import CutResult, cut_result, keep_top
from sparsify_fx.budgets.cost_model import ChannelCost, ChannelMacs, channel_macs
from sparsify_fx.errors import BudgetError
from sparsify_fx.mask_index import MaskEntry

if TYPE_CHECKING:
    from sparsify_fx.passes.shrink.uniform_fields import UniformPlan


def coupled_cut(model: nn.Module, entries: list[MaskEntry], target_sparsity: float | None,
                 target_macs: float | None, costs: Mapping[str, float] | None,
                 scores: Mapping[str, Tensor] | None, round_to: int = 1) -> CutResult:
    """Cut shared channel groups: keep the highest-ranked group slots (one score each)
    while the budget holds; every group keeps at least its best slot (its best block of
    ``round_to`` slots: see :func:`_blocks`). Sparsity: a slot
    costs the weights of every channel it gates, summed over its follower masks (channels
    kept whole are fixed). MACs: the MACs
    :func:`shrink` would leave, counted by :func:`channel_macs` (a removed channel also
    removes the next layer's input channel), so the shrunk model meets the budget."""
    from sparsify_fx.passes.channels.couple import group_masks
    groups = group_masks(model)
    order = list(groups)
    start, offset = _group_starts(groups)
    slot_units = torch.zeros(offset, dtype=torch.float64)  # weights gated per slot
    fixed = dense = 0.0
    slots_of = _slots_of(entries, start)
    for e in entries:
        unit = float(e.mask.weights_per_score)
        dense += unit * math.prod(e.mask.score_shape)
        glob = slots_of[e.name]
        fixed += unit * int((glob < 0).sum())
        slot_units.index_add_(0, glob[glob >= 0], torch.full((int((glob >= 0).sum()),), unit,
                                                              dtype=torch.float64))
    if _by_weight(scores, order, entries):
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
        from sparsify_fx.budgets.cost_model import slot_widths
        widths = slot_widths(model)
        spans = [(first, n, max(1, round_to // int(widths[first:first + n].min())))
                 for first, n, _ in spans]
    order_slots, ends, block_scores = _blocks(ranking, spans, round_to)
    n_floor = int(torch.isinf(block_scores).sum())
    floor_slots = int(ends[n_floor - 1]) if n_floor else 0
    if target_macs is not None:
        assert costs is not None
        try:
            keep = _macs_prefix(costs if isinstance(costs, ChannelCost) else
                                channel_macs(model, costs), order_slots, ends,
                                float(target_macs), n_floor)
        except BudgetError as exc:
            raise BudgetError(f"{exc}{_export_hint(model)}") from None
    else:
        fraction = 1.0 - float(target_sparsity)  # type: ignore[arg-type]
        budget = fraction * dense - fixed
        floor_units = float(slot_units[order_slots[:floor_slots]].sum())
        if budget < floor_units:
            raise BudgetError(f"the budget keeps {fraction:.3f} of the masked weights, but "
                              "channels that must stay whole and one channel per group already "
                              f"take {(fixed + floor_units) / dense:.3f}; raise the budget"
                              + _export_hint(model))
        if round_to == 1:
            keep = keep_top(ranking, slot_units, budget)
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
    return cut_result(entries, changed)


def _group_starts(groups: Mapping[str, object]) -> tuple[dict[int, int], int]:
    """Each group mask's first slot in the slots of all groups laid end to end, in the
    mapping's order (``{id(mask): start}``), and the total slot count."""
    start, offset = {}, 0
    for mask in groups.values():
        start[id(mask)] = offset
        offset += math.prod(mask.score_shape)
    return start, offset


def _by_weight(scores: Mapping[str, Tensor] | None, order: Sequence[str],
               entries: list[MaskEntry]) -> bool:
    """``scores`` are keyed by weight name (``{weight: |w| or (C, ...) scores}``, summed
    into group slots by :func:`_slot_scores`), not by group key."""
    return scores is not None and not any(k in scores for k in order) and any(
        e.name in scores for e in entries)


def _slots_of(entries: list[MaskEntry], start: Mapping[int, int]) -> dict[str, Tensor]:
    """Per mask entry: the global slot (``start[id(group mask)]`` + slot) each of its
    channels follows, -1 for channels kept whole."""
    out = {}
    for e in entries:
        glob = torch.full((e.mask.index.numel(),), -1, dtype=torch.long)
        for src, sel, slot in e.mask.source_slots():
            glob[sel.cpu()] = slot.cpu() + start[id(src)]
        out[e.name] = glob
    return out


def _slot_scores(entries: list[MaskEntry], scores: Mapping[str, Tensor],
                 slots_of: Mapping[str, Tensor], n_slots: int) -> Tensor:
    """Per-weight scores (``{weight name: |w| or (C, ...) scores}``) summed into group
    slots: a channel's score is the sum of ``|scores|`` over its row, and a slot's the sum
    over every producer channel it gates (the L1 norm for ``|w|``)."""
    out = torch.zeros(n_slots, dtype=torch.float64)
    for e in entries:
        if e.name not in scores:
            continue
        per_channel = _channel_sums(scores[e.name].detach().double().cpu(), e.mask.score_shape)
        glob = slots_of[e.name]
        out.index_add_(0, glob[glob >= 0], per_channel[glob >= 0])
    return out.float()


def _channel_sums(s: Tensor, score_shape: Sequence[int]) -> Tensor:
    """``|s|`` summed per channel of a channel mask of ``score_shape``: ``s`` is either
    score-shaped or weight-shaped. The channel axis is the mask's one non-1 axis when the
    mask has the weight's rank (``(1, C)`` on a ``Conv1D`` weight ``(in, C)``), else 0."""
    n = math.prod(score_shape)
    axis = 0
    if len(score_shape) == s.dim() and sum(d != 1 for d in score_shape) == 1:
        axis = next(i for i, d in enumerate(score_shape) if d != 1)
    return s.abs().movedim(axis, 0).reshape(n, -1).sum(1)


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
                          f"{cm.macs(top(floor)) / cm.dense:.3f} ({_holders(cm, top(floor))}); "
                          "raise the budget")
    lo, hi = floor, len(ends)  # macs(top(lo)) fits; find the largest n that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cm.macs(top(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return top(lo)


def _holders(cm: ChannelMacs, keep: Tensor, top: int = 4) -> str:
    """The layers holding most of the cost of ``keep`` (fractions of the dense cost) and
    the ops that kept channels whole (from the channel analysis), for a BudgetError."""
    per = sorted(cm.layer_costs(keep).items(), key=lambda kv: -kv[1])[:top]
    text = "most in " + ", ".join(f"{name} {cost / cm.dense:.2f}" for name, cost in per)
    ops = cm.meta.get("unsupported") or []
    if ops:
        text += f"; kept whole at {'; '.join(o[:80] for o in ops[:3])}" + \
            (f" and {len(ops) - 3} more" if len(ops) > 3 else "")
    return text


def macs_floor(model: nn.Module, costs: Mapping[str, float]) -> float:
    """Fraction of the dense MACs a MACs cut of the coupled channel model ``model`` cannot go
    below: every channel that must stay whole plus each group's best-ranked slot, counted by
    :func:`channel_macs` on ``costs`` (``weight_costs``): the "already take X" that
    :func:`coupled_cut` refuses with. Read-only."""
    cost = channel_macs(model, costs)
    keep = torch.zeros(cost.n_slots, dtype=torch.bool)
    first = 0
    for mask in cost.group_masks:
        keep[first + int(torch.argmax(mask.ranking_scores().detach().reshape(-1).cpu()))] = True
        first += math.prod(mask.score_shape)
    return cost.cost(keep) / cost.dense


def _export_hint(model: nn.Module) -> str:
    """On a torch.fx module graph: point at the ATen-level analysis, which reads the ops
    inside modules it does not know (a BatchNorm subclass with its activation, own pooling
    or squeeze-excitation modules)."""
    from torch import fx
    from sparsify_fx.mask_index import unwrap
    if not isinstance(unwrap(model), fx.GraphModule):
        return ""
    return (", or transform with capture='export' and example_inputs=: the channel analysis "
            "then reads the ATen ops inside modules it does not know (capture='auto' with "
            "example_inputs= and no target_latency switches to it by itself when that keeps "
            "fewer channels whole)")


def uniform_plan(model: nn.Module) -> "UniformPlan":
    """The classes of channel groups one uniform width covers
    (:func:`~sparsify_fx.passes.shrink.uniform_fields.uniform_plan`): groups of one
    structure (slot count and producer weight shapes, each weight once however often a
    loop calls it), the experts with the MLPs their config field also holds, merged
    where one Hugging Face config field sizes groups of several structures, ``whole``
    where a field also sizes channels kept whole. Read-only."""
    from sparsify_fx.mask_index import main_graph
    from sparsify_fx.passes.shrink.uniform_fields import uniform_plan as plan_of
    from sparsify_fx.passes.stored_analysis import channel_graph_of
    graph = main_graph(model)
    if graph is None:
        raise BudgetError("uniform widths need a coupled channel model from transform")
    cg = channel_graph_of(graph)

    def structure(g) -> tuple:  # noqa: ANN001
        shapes = {cg.producers[p].weight: tuple(cg.producers[p].shape) for p in g.producers}
        return len(g.components), tuple(sorted(shapes.values()))
    return plan_of(model, graph, cg, structure)


def pin_whole(model: nn.Module, entries: list[MaskEntry], scores: Mapping[str, Tensor] | None,
              plan: "UniformPlan") -> Mapping[str, Tensor] | None:
    """Scores for a uniform cut: ``scores`` as ``{group key: (K,) scores}`` (weight-name
    scores summed into group slots as :func:`coupled_cut` does) with every slot of a
    ``plan.whole`` class at ``inf``, so the cut keeps those groups whole and fits the
    rest of the budget around them. ``scores`` itself when no class must stay whole."""
    from sparsify_fx.passes.channels.couple import GROUP_PREFIX, group_masks
    whole = {f"{GROUP_PREFIX}{i}" for key in plan.whole for i in plan.classes[key]}
    if not whole:
        return scores
    groups = group_masks(model)
    order = list(groups)
    if _by_weight(scores, order, entries):
        start, offset = _group_starts(groups)
        flat = _slot_scores(entries, scores, _slots_of(entries, start), offset)
        out = {k: flat[start[id(groups[k])]:start[id(groups[k])] + math.prod(
            groups[k].score_shape)].reshape(groups[k].score_shape) for k in order}
    else:
        out = {k: (scores[k] if scores is not None and k in scores
                   else groups[k].ranking_scores()).detach().float().clone() for k in order}
    for k in whole & set(out):
        out[k] = torch.full_like(out[k], float("inf"))
    return out


def _why_not(plan: "UniformPlan") -> str:
    """What holds a uniform cut's cost up (for its BudgetError)."""
    text = "every class already keeps one step (experts: the grouped-matmul alignment"
    ratios = sorted({f for fields in plan.ratio.values() for f in fields})
    if ratios:
        text += "; groups sized by " + ", ".join(ratios) + ": a whole value of the field"
    text += ")"
    if plan.whole:
        text += "; the groups sized by config fields " + ", ".join(sorted({
            f for s in plan.whole for f in plan.fields.get(s, ())})) + " stay whole (" + \
            ", ".join(sorted({w for ws in plan.whole.values() for w in ws})[:3]) + \
            ": the config cannot describe a smaller count)"
    return text


def equalize_groups(model: nn.Module, scores: Mapping[str, Tensor] | None = None,
                    fits: Callable[[], bool] | None = None,
                    plan: "UniformPlan | None" = None) -> dict[tuple, int]:
    """Uniform widths: the groups of one class of :func:`uniform_plan` (one structure, or
    one config field across layer kinds) keep the same number of slots (``m`` per
    counted slot for a group of ``m`` times the class's units), the smallest count any of
    them kept, each its own best ones (kept slots first, then by ``scores[group key]``
    when given, else the mask's ranking); a class whose config field also sizes
    channels kept whole keeps every slot. Fewer kept slots only lower a budget's cost;
    ``fits`` (the budget still holds under the current hard masks): when whole classes or
    a class raised to its step (an experts class keeps at least the alignment) broke it,
    the class with the largest kept fraction gives up a step in turn until it holds
    (BudgetError if it cannot); then one step per group is given back to the class
    with the smallest kept fraction, in turn, while it fits. Counts of an experts class
    are multiples of the grouped-matmul alignment. Returns ``{class: slots kept}``.
    ``plan``: :func:`uniform_plan` of ``model`` when the caller has it. Mutates the group
    masks (``freeze``)."""
    from sparsify_fx.passes.channels.couple import GROUP_PREFIX, group_masks
    plan = plan if plan is not None else uniform_plan(model)
    groups = group_masks(model)
    classes = {sig: [f"{GROUP_PREFIX}{i}" for i in ids] for sig, ids in plan.classes.items()}
    steps = plan.steps
    mult = {f"{GROUP_PREFIX}{i}": m for i, m in plan.multiples.items()}  # slots per counted slot
    order: dict[str, Tensor] = {}  # per group: slots best first (kept by the cut, then score)
    for keys in classes.values():
        for k in keys:
            rank = (scores[k] if scores is not None and k in scores
                    else groups[k].ranking_scores()).detach().float().reshape(-1).cpu()
            kept = groups[k].hard_mask().reshape(-1).cpu()
            by_score = torch.sort(rank, descending=True, stable=True).indices
            order[k] = by_score[torch.sort((~kept[by_score]).to(torch.uint8), stable=True).indices]

    def keep_n(keys: list[str], n: int | None) -> None:  # None: every slot
        for k in keys:
            keep = torch.zeros(order[k].numel(), dtype=torch.bool)
            keep[order[k][:None if n is None else n * mult.get(k, 1)]] = True
            groups[k].freeze(keep.reshape(groups[k].score_shape))

    width = {sig: min(int(groups[k].hard_mask().numel()) // mult.get(k, 1) for k in keys)
             for sig, keys in classes.items()}
    kept_n: dict[tuple, int] = {}
    for signature, keys in classes.items():
        if signature in plan.whole:  # a config field also sizes channels kept whole
            kept_n[signature] = width[signature]
            keep_n(keys, None)
            continue
        kept_n[signature] = min(int(groups[k].hard_mask().sum()) // mult.get(k, 1) for k in keys)
        # a multiple of the class's step, at least one step (shrink pads experts to it)
        kept_n[signature] = min(width[signature], max(steps[signature], kept_n[signature] -
                                                      kept_n[signature] % steps[signature]))
        keep_n(keys, kept_n[signature])
    free = [sig for sig in classes if sig not in plan.whole]
    while fits is not None and not fits():  # whole classes or a step raised the cost
        over = [s for s in free if kept_n[s] > min(steps[s], width[s])]
        if not over:
            raise BudgetError("uniform widths cannot meet the budget: " + _why_not(plan) +
                              "; raise the budget")
        sig = max(over, key=lambda s: (kept_n[s] / width[s], -free.index(s)))
        kept_n[sig] -= (kept_n[sig] % steps[sig]) or steps[sig]
        keep_n(classes[sig], kept_n[sig])
    growing = {sig for sig in free if kept_n[sig] < width[sig]} if fits is not None else set()
    while growing:
        sig = min(growing, key=lambda s: (kept_n[s] / width[s], list(classes).index(s)))
        step = min(steps[sig] - kept_n[sig] % steps[sig], width[sig] - kept_n[sig])
        keep_n(classes[sig], kept_n[sig] + step)
        if fits():
            kept_n[sig] += step
            if kept_n[sig] >= width[sig]:
                growing.discard(sig)
        else:
            keep_n(classes[sig], kept_n[sig])
            growing.discard(sig)
    return kept_n
