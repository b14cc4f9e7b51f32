"""Exact budgets: cut masks to a target sparsity or MACs fraction, and weight costs.

``weight_costs`` gives, per masked weight, the MACs one weight takes part in for
one input sample, read from the one MAC counter
(:mod:`sparsify_fx.passes.macs.count`, stored per node at transform).
``apply_budget`` freezes every mask to exactly the top-scored weights that fit.
For coupled channel masks (the cut itself: :mod:`sparsify_fx.budgets.channel_cut`) a MACs
or latency budget is counted by the one :class:`~sparsify_fx.budgets.cost_model.ChannelCost`:
what ``shrink`` leaves (a removed channel also removes the next layer's input
channel); a latency cut is then measured in onnxruntime and corrected
(:mod:`sparsify_fx.latency.verify`). Both only read the model, except
``apply_budget`` which freezes the masks.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, fx, nn

from sparsify_fx.passes.stored_analysis import weight_macs_of

from sparsify_fx.config import config_of
from sparsify_fx.capture.inputs import as_model_inputs
from sparsify_fx.errors import BudgetError, ConfigError, InputError
from sparsify_fx.granularity import parse_granularity
from sparsify_fx.budgets.cost_model import (ChannelCost, budget_cost, channel_graph, channel_macs,
                         is_coupled)
from sparsify_fx.budgets.channel_cut import coupled_cut, equalize_groups, pin_whole, uniform_plan
from sparsify_fx.budgets.cut_result import CutResult, cut_result, keep_top
from sparsify_fx.mask_index import MaskEntry, main_graph, masks, unwrap
from sparsify_fx.passes.aten.values import concrete_shape


def weight_costs(model: nn.Module, example_inputs: Any) -> dict[str, float]:
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

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword
    tensors (bound to the model's positional parameters, as the captured graph takes
    them). Runs the model at most once: on a model transformed with ``example_inputs`` of
    these shapes it reads the per-node MACs stored there and runs nothing. Writes
    graph nodes' ``meta`` only (``tensor_meta`` and MACs, as ShapeProp would).
    """
    model = unwrap(model)
    given = as_model_inputs(example_inputs)
    if given is None:
        raise InputError("weight_costs needs example_inputs (a tensor, a tuple or a dict of "
                         "keyword tensors)")
    given.check_against(model)
    inputs = given.positional(model)
    batch = given.batch_size
    dense = weight_macs_of(model, inputs)

    def per_sample(name: str, shape: Sequence[int]) -> float | None:
        macs = dense.get(name, 0)
        return macs / (batch * math.prod(shape)) if macs else None

    entries = masks(model)
    costs: dict[str, float] = {}
    for e in entries:
        cost = 0.0 if e.mask.auxiliary else per_sample(e.name, e.mask.weight_shape)
        costs[e.name] = 1.0 if cost is None else cost  # None: never used on these inputs
    graph = main_graph(model)
    if graph is not None and is_coupled(entries):
        for prod in channel_graph(graph).producers.values():
            if prod.weight in costs or prod.macs_unit is not None:  # attention: own MACs unit
                continue
            prefix = getattr(model, "logical_name_prefix", "")  # unmasked weights of an export
            cost = per_sample(prod.weight, prod.shape) or per_sample(prefix + prod.weight, prod.shape)
            if cost is None:  # e.g. a tied weight counted under its other name
                cost = _positions_per_sample(graph, prod, batch)
            if cost is not None:
                costs[prod.weight] = cost
    return costs


def _positions_per_sample(graph: fx.GraphModule, prod, batch: int) -> float | None:
    """Output positions per sample of a producer call, from its node's recorded shape."""
    node = next((n for n in graph.graph.nodes if n.name == prod.node), None)
    shape = concrete_shape(node) if node is not None else None
    if not shape or prod.kind not in ("linear", "conv"):
        return None
    channels = shape[1] if prod.kind == "conv" else shape[-1]
    return math.prod(shape) / (channels * max(batch, 1))


def apply_budget(model: nn.Module, target_sparsity: float | Mapping[str, float] | None = None,
                 *, target_macs: float | None = None, costs: Mapping[str, float] | None = None,
                 target_latency: float | None = None, cost: ChannelCost | None = None,
                 per_layer: bool = False, scores: Mapping[str, Tensor] | None = None,
                 final: bool = True, round_to: int | None = None,
                 uniform: bool = False) -> CutResult:
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
    ``uniform`` (coupled channel masks): groups of one structure (every layer's attention,
    every layer's MLP), and groups of several structures that one Hugging Face config
    field sizes (sliding and full attention sharing ``num_attention_heads``, a dense MLP
    and experts sharing ``intermediate_size``), then keep the same number of slots, the
    fewest any kept (:func:`~sparsify_fx.budgets.channel_cut.equalize_groups`); groups
    whose field also sizes channels kept whole stay whole (the cut fits the budget
    around them): the config can describe the shrunk model, so ``save_pretrained`` /
    ``from_pretrained`` round-trip.
    ``round_to`` (coupled channel masks): every channel group keeps a multiple of
    ``round_to`` channels (or all of them), taken in whole blocks of its ranking; onnxruntime
    runs ragged widths much slower (see docs/latency.md). Default: the cost model's
    ``round_to`` (8 for latency costs), else 1.
    A final cut against a latency cost that can measure (``channel_latency(...,
    verify=True)``, the default) is verified in onnxruntime: the shrunk model is timed
    against the dense one and the cut corrected until they agree within 5 %
    (:func:`~sparsify_fx.latency.verify.verified_cut`; rounds in ``CutResult.latency``).
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
        from sparsify_fx.passes.channels.couple import group_masks
        scores = {k: m.ranking_scores().detach().clone() for k, m in group_masks(model).items()}

    def cut(fraction: float | None) -> CutResult:
        result = _cut(model, entries, target_sparsity, fraction, costs, per_layer, scores,
                      int(round_to))
        for e in entries:
            e.mask.at_target.fill_(bool(final))
        return result

    if uniform:  # same widths in every layer of one structure (HF configs hold one width)
        if not is_coupled(entries):
            raise ConfigError("uniform=True applies to coupled channel masks "
                              "(transform(..., granularity='channel'))")
        # classes a config field ties to channels kept whole stay whole: the cut fits
        # the budget around them (equalize only lowers the rest, then gives back)
        plan = uniform_plan(model)
        scores = pin_whole(model, entries, scores, plan)
        result = cut(target_macs)
        equalize_groups(model, scores, budget_holds(model, entries, target_sparsity,
                                                     target_macs, costs), plan)
        return result
    if not verify:
        return cut(target_macs)
    from sparsify_fx.latency.verify import closest, on_rank_zero, verified_cut
    assert isinstance(costs, ChannelCost) and costs.measure is not None
    checks = on_rank_zero(lambda: verified_cut(
        float(target_macs), cut, lambda: costs.fraction_of(model),
        lambda: costs.measure(model))[1])
    result = cut(closest(checks, float(target_macs)).aimed)  # every rank: the same masks
    result.latency = checks
    costs.meta["verified"] = [c.to_dict() for c in checks]
    return result


def budget_holds(model: nn.Module, entries: list[MaskEntry], target_sparsity: object,
                  target_macs: float | None, costs: Mapping[str, float] | None
                  ) -> Callable[[], bool] | None:
    """Whether the current hard masks still meet the one global budget (MACs as
    ``shrink`` leaves them, or the zeroed fraction of the masked weights); None for
    other budgets (a latency cost, per-layer targets)."""
    if isinstance(costs, ChannelCost):
        return (lambda: costs.hard_fraction() <= float(target_macs) + 1e-12) \
            if costs.unit != "ms" and target_macs is not None else None
    if target_macs is not None:
        cm = channel_macs(model, costs if costs is not None else _config_costs(model))
        return lambda: cm.hard_fraction() <= float(target_macs) + 1e-12
    if isinstance(target_sparsity, (int, float)):
        return lambda: 1.0 - kept_fraction(entries) >= float(target_sparsity) - 1e-12
    return None


def _config_costs(model: nn.Module) -> Mapping[str, float]:
    cfg = config_of(unwrap(model))
    if cfg is None or cfg.example_inputs is None:
        raise ConfigError("target_macs needs per-weight costs: pass example_inputs= to "
                          "transform, or costs=sparsify_fx.budgets.exact_cut.weight_costs(model, "
                          "example_inputs)")
    return weight_costs(model, cfg.example_inputs)


def _cut(model: nn.Module, entries: list[MaskEntry],
         target_sparsity: float | Mapping[str, float] | None, target_macs: float | None,
         costs: Mapping[str, float] | None, per_layer: bool,
         scores: Mapping[str, Tensor] | None, round_to: int = 1) -> CutResult:
    if not entries:
        if config_of(unwrap(model)) is not None:  # transformed: the analysis kept it all whole
            raise BudgetError(
                "no channel of this model can be removed: the channel analysis keeps every "
                "group whole (a norm over all of a layer's units, a model output, or ops "
                "transform warned it does not follow), so a structured cut has nothing to "
                "remove; transform(..., granularity='element') prunes single weights instead")
        raise BudgetError("model has no masks to cut; call sparsify_fx.transform first")
    if (target_sparsity is None) == (target_macs is None):
        raise ConfigError("apply_budget needs exactly one of target_sparsity or target_macs")
    if target_macs is not None and costs is None:
        costs = _config_costs(model)
    if is_coupled(entries):
        if isinstance(target_sparsity, Mapping) or per_layer:
            raise ConfigError("coupled channel masks take one global target (sparsity or "
                              "MACs); per-layer targets would split coupled channels")
        return coupled_cut(model, entries, target_sparsity, target_macs, costs, scores,
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
        keep = keep_top(flat, units, budget)
        offset = 0
        for e in group:
            n = e.mask.hard_mask().numel()
            e.mask.freeze(keep[offset:offset + n].reshape(e.mask.score_shape))
            offset += n
    changed = sum(int((before[e.name] != e.mask.hard_mask().reshape(-1).cpu()).sum())
                  * e.mask.weights_per_score
                  for e in entries)
    return cut_result(entries, changed)


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
