"""One cost model for coupled channel budgets: MACs today, onnxruntime latency too.

What :func:`~sparsify_fx.passes.shrink.shrink_graph.shrink` leaves: a removed channel takes its
producer's output row and every consumer's input column with it. So the cost of a
channel model is ``remainder + sum over Conv/Linear calls of layer_cost(kept
outputs, kept inputs)`` (per conv group), a function of the kept channel-group
slots (the group masks' slots concatenated in ``group_masks`` order).
:class:`ChannelCost` is that function; :func:`channel_macs` fills it with MACs
(``unit x kept outputs x kept inputs``, remainder 0) and :func:`channel_latency`
with milliseconds from the onnxruntime table of :mod:`sparsify_fx.latency.table`.
The exact cut (:mod:`sparsify_fx.budgets.exact_cut`), the CS controller and ``report`` all
read a :class:`ChannelCost`, so they agree by construction. Read-only.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor, fx, nn

from sparsify_fx.errors import BudgetError, ConfigError
from sparsify_fx.mask import Mask
from sparsify_fx.mask_index import MaskEntry, main_graph, masks, unwrap


def is_coupled(entries: list[MaskEntry]) -> bool:
    return any(hasattr(e.mask, "sources") for e in entries)


def channel_graph(gm: fx.GraphModule):  # -> ChannelGraph (passes imported lazily: no cycle)
    """The channel analysis ``shrink`` uses, stored on the graph at transform
    (:func:`sparsify_fx.passes.stored_analysis.channel_graph_of`)."""
    from sparsify_fx.passes.stored_analysis import channel_graph_of
    coupled = frozenset(str(e.node.args[0].target) for e in masks(gm)
                        if hasattr(e.mask, "sources") and not e.mask.auxiliary
                        and e.route == "graph" and e.node is not None)
    return channel_graph_of(gm, coupled)


class LayerCost(Protocol):
    """A layer's cost from its kept outputs and inputs per conv group (float64, ``(groups,)``)."""

    def __call__(self, kept_out: Tensor, kept_in: Tensor) -> float: ...


@dataclass(frozen=True)
class MacsCost:
    """MACs per sample: ``unit * sum over conv groups of kept outputs x kept inputs``."""

    unit: float  # MACs per sample of one (output channel, input channel) pair

    def __call__(self, kept_out: Tensor, kept_in: Tensor) -> float:
        return self.unit * float((kept_out * kept_in).sum())


@dataclass(frozen=True)
class TableCost:
    """Milliseconds from an interpolated :class:`~sparsify_fx.latency.table.OpTable`
    (a grouped conv's table is indexed by kept output channels, inputs follow)."""

    table: Callable[[float, float], float]
    grouped: bool
    signature: object = None  # the OpSignature the table was timed for

    def __call__(self, kept_out: Tensor, kept_in: Tensor) -> float:
        o = float(kept_out.sum())
        return self.table(o, 1.0 if self.grouped else float(kept_in.sum()))


@dataclass
class CostLayer:
    """One Conv/Linear call: its weight, conv groups, which slot gates each output / input
    channel (``n_slots`` means "kept whole") and its cost function."""

    weight: str
    groups: int
    out_slot: Tensor
    in_slot: Tensor
    cost: LayerCost


@dataclass
class ChannelCost:
    """Cost of a coupled channel model as a function of the kept group slots.

    ``cost(keep) = remainder + scale x sum of layer costs``; ``unit`` names what is
    counted (``"MACs"`` or ``"ms"``). ``keep``: bool, ``(n_slots,)``. ``scale`` (1 for
    MACs) carries isolated op timings over to the whole model (see ``channel_latency``).
    ``round_to``: the channel rounding a cut against this cost uses (every group keeps a
    multiple of it; :func:`~sparsify_fx.budgets.exact_cut.apply_budget`), 1 for MACs.
    """

    layers: list[CostLayer]
    group_masks: list[Mask]
    n_slots: int
    remainder: float = 0.0
    unit: str = "MACs"
    scale: float = 1.0
    meta: dict = field(default_factory=dict)
    round_to: int = 1
    #: ``measure(model) -> fraction``: the model's shrunk latency over the dense one,
    #: measured (latency costs built with ``verify=True``); final cuts are checked with it
    measure: Callable[[nn.Module], float] | None = field(default=None, repr=False,
                                                          compare=False)

    def _kept(self, keep: Tensor) -> Tensor:
        return torch.cat([keep.reshape(-1).bool().cpu(), torch.ones(1, dtype=torch.bool)])

    def layer_costs(self, keep: Tensor) -> dict[str, float]:
        """Cost of every layer (by weight name) when the slots ``keep`` are kept."""
        ext = self._kept(keep)
        out: dict[str, float] = {}
        for lay in self.layers:
            o = ext[lay.out_slot].reshape(lay.groups, -1).sum(1).double()
            i = ext[lay.in_slot].reshape(lay.groups, -1).sum(1).double()
            out[lay.weight] = out.get(lay.weight, 0.0) + self.scale * lay.cost(o, i)
        return out

    def cost(self, keep: Tensor) -> float:
        """Model cost (remainder included) when the slots ``keep`` are kept."""
        return self.remainder + sum(self.layer_costs(keep).values())

    macs = cost  # the name the MACs-only bookkeeping had

    @cached_property
    def dense(self) -> float:
        """Cost with every slot kept (computed once: the layers never change)."""
        return self.cost(torch.ones(self.n_slots, dtype=torch.bool))

    def hard_keep(self) -> Tensor:
        """The group masks' current hard decisions, concatenated."""
        return torch.cat([m.hard_mask().reshape(-1).cpu() for m in self.group_masks])

    def hard_fraction(self) -> float:
        """Kept / dense cost under the group masks' current hard decisions."""
        return self.cost(self.hard_keep()) / self.dense

    def fraction_of(self, model: nn.Module) -> float:
        """Kept / dense cost under the hard decisions of ``model``'s group masks (a copy
        of the model this cost was built for: same groups, same order)."""
        from sparsify_fx.passes.channels.couple import group_masks
        groups = list(group_masks(model).values())
        if len(groups) != len(self.group_masks):
            raise BudgetError("this cost was built for another model (its channel groups "
                              "differ); build the cost on this model")
        return self.cost(torch.cat([m.hard_mask().reshape(-1).cpu() for m in groups])) / self.dense


ChannelMacs = ChannelCost  # the MACs instance keeps its old name


def _cost_layers(gm: fx.GraphModule, make: Callable[[object, bool, bool], LayerCost]
                 ) -> tuple[list[CostLayer], list[Mask], int, object]:
    """Slot bookkeeping shared by every cost: one :class:`CostLayer` per producer of the
    channel analysis, its cost from ``make(producer, outputs prunable, inputs prunable)``."""
    from sparsify_fx.passes.channels.couple import GROUP_PREFIX, group_masks
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
        shape = prod.shape  # (out, in, *kernel); attention matmuls have no parameter
        n_in = shape[1] * prod.groups
        in_slot = (slots(prod.in_ids) if prod.in_ids is not None
                   else torch.full((n_in,), n_slots, dtype=torch.long))
        out_slot = slots(prod.out_ids)
        cost = make(prod, bool((out_slot < n_slots).any()), bool((in_slot < n_slots).any()))
        layers.append(CostLayer(prod.weight, prod.groups, out_slot, in_slot, cost))
    return layers, [groups[k] for k in ordered], n_slots, cg


def slot_widths(model: nn.Module) -> Tensor:
    """Channels one slot takes from the narrowest layer it gates (int64, ``(n_slots,)``, in
    ``group_masks`` order): 1 for a channel, ``head_dim`` for an attention head. Channel
    rounding (``round_to``) counts channels, so a head group rounds in whole heads."""
    layers, _, n_slots, _ = _cost_layers(_graph(model), lambda *_: None)  # type: ignore[arg-type]
    big = torch.iinfo(torch.long).max
    width = torch.full((n_slots,), big, dtype=torch.long)
    for lay in layers:
        counts = torch.bincount(lay.out_slot, minlength=n_slots + 1)[:n_slots]
        width = torch.where(counts > 0, torch.minimum(width, counts), width)
    return torch.where(width == big, torch.ones_like(width), width)


def _graph(model: nn.Module) -> fx.GraphModule:
    gm = main_graph(model)
    if gm is None:
        raise BudgetError("coupled channel budgets need one fully traced GraphModule or a "
                          "torch.export capture")
    return gm


def channel_macs(model: nn.Module, costs: Mapping[str, float]) -> ChannelCost:
    """MACs bookkeeping of a coupled channel model (read-only).

    Covers every Conv/Linear call of the traced graph, masked or not (an unmasked
    layer loses input channels when its producer is pruned). ``costs``: from
    :func:`~sparsify_fx.budgets.exact_cut.weight_costs` on this model (it includes the unmasked layers).
    """
    gm = _graph(model)

    def make(prod, _out: bool, _in: bool) -> LayerCost:
        if prod.macs_unit is not None:  # attention: MACs per channel pair from the analysis
            return MacsCost(prod.macs_unit)
        if prod.weight not in costs:
            raise ConfigError(f"no MACs cost for {prod.weight}; compute the costs with "
                              "sparsify_fx.budgets.exact_cut.weight_costs(model, example_inputs) on this "
                              "coupled model")
        return MacsCost(float(costs[prod.weight]) * math.prod(prod.shape[2:]))

    layers, group_list, n_slots, cg = _cost_layers(gm, make)
    return ChannelCost(layers, group_list, n_slots,
                       meta={"unsupported": list(getattr(cg, "unsupported", []))})


def channel_latency(model: nn.Module, example_inputs: Sequence[Tensor] | Tensor, *,
                    threads: int = 2, cache_dir: str | os.PathLike | None = None,
                    timer: Callable | None = None, model_timer: Callable | None = None,
                    progress: bool = True, round_to: int = 8,
                    verify: bool = True) -> ChannelCost:
    """onnxruntime latency (ms, batch of ``example_inputs``) of a coupled channel model
    as shrink will leave it.

    Each Conv/Linear call reads its op's table, timed at several kept widths by
    ``timer(signature, kept_out, kept_in) -> ms`` (default
    :func:`~sparsify_fx.latency.table.ort_timer`). ``remainder`` and ``scale`` come from
    :func:`_calibrate` (``model_timer([dense, probe], inputs) -> [ms, ms]``, default:
    onnxruntime on the exported models). Both are cached
    (:class:`~sparsify_fx.latency.table.LatencyTable`, under ``cache_dir``): a second
    call on the same machine measures nothing (``meta["timings"] == 0``). Read-only
    (shape metadata on nodes aside).

    ``round_to`` (default 8): cuts against this cost keep a multiple of ``round_to``
    channels per group, and the table is timed at such widths. onnxruntime's blocked
    conv kernels run ragged widths far slower: a mobilenet_v2 cut with arbitrary counts
    measured 0.98 of the dense latency where the same cut rounded up to multiples of 8
    (more channels) measured 0.72 (docs/latency.md). ``round_to=1`` turns it off.

    ``verify`` (default): the cost can measure (``ChannelCost.measure``, with
    ``model_timer``), and a final :func:`~sparsify_fx.budgets.exact_cut.apply_budget` against it
    checks its cut in onnxruntime and corrects it.

    A torch.export capture is refused (:class:`ConfigError`): its latency is measured for
    a stated workload by :func:`~sparsify_fx.latency.capture_latency.capture_latency`.
    """
    from tqdm.auto import tqdm

    from sparsify_fx.latency.probe import attention_signature, model_key, op_signatures
    from sparsify_fx.latency.table import LatencyTable, ort_timer
    gm = _graph(model)
    if gm is not unwrap(model):
        raise ConfigError(
            "target_latency on a torch.export capture is measured for a stated workload: "
            "pass cost=sparsify_fx.capture_latency(model, sparsify_fx.DecodeStep("
            "past_length=128)) (one generated token with a cache) or sparsify_fx.ForwardPass("
            "sequence_length=128) (a forward pass) to apply_budget")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    table = LatencyTable.load(threads, cache_dir)
    sigs = op_signatures(gm, inputs)
    attention = channel_graph(gm).attention
    state: dict = {"timer": timer, "timings": 0, "model_timed": False}

    def make(prod, out_prunable: bool, in_prunable: bool) -> LayerCost:
        if prod.kind.startswith("attention"):
            sig = attention_signature(gm, prod, attention[prod.node].num_heads)
            if sig is None and prod.kind == "attention_matmul":
                return MacsCost(0.0)  # attn v: timed with q k^T as one attention op
        else:
            sig = sigs.get(prod.node)
        if sig is None:
            raise ConfigError(f"the latency table times Conv/Linear/attention calls with known "
                              f"shapes; {prod.weight} ({prod.kind}) has none: budget it with "
                              "target_macs, or exclude its weights")
        return (sig, out_prunable, in_prunable)  # type: ignore[return-value]  # timed below

    layers, group_list, n_slots, _ = _cost_layers(gm, make)
    timed_layers = [lay for lay in layers if isinstance(lay.cost, tuple)]
    if int(round_to) < 1:
        raise ConfigError(f"round_to must be a positive channel count, got {round_to!r}")
    todo = {lay.cost[0].key(): table.missing(*lay.cost, round_to)  # type: ignore[index]
            for lay in timed_layers}
    bar = tqdm(total=sum(todo.values()), desc="latency table", unit="timing",
               disable=not progress or not sum(todo.values()), leave=False)

    def timed(sig, kept_out: int, kept_in: int) -> float:
        if state["timer"] is None:
            state["timer"] = ort_timer(threads)
        bar.update(1)
        state["timings"] += 1
        return state["timer"](sig, kept_out, kept_in)

    def timed_many(sig, pairs: list[tuple[int, int]]) -> list[float]:
        if state["timer"] is None:
            state["timer"] = ort_timer(threads)
        many = getattr(state["timer"], "many", None)
        if many is None:
            return [timed(sig, o, i) for o, i in pairs]
        bar.update(len(pairs))
        state["timings"] += len(pairs)
        return many(sig, pairs)

    timed.many = timed_many  # type: ignore[attr-defined]

    try:
        for lay in timed_layers:
            sig, out_p, in_p = lay.cost  # type: ignore[misc]
            lay.cost = TableCost(table.measure(sig, out_p, in_p, timed, round_to),
                                 sig.groups > 1, sig)
    finally:
        bar.close()
    ops = ChannelCost(layers, group_list, n_slots, unit="ms", round_to=int(round_to))
    key = f"{model_key(gm, inputs)}|r{int(round_to)}"
    if key not in table.remainders:
        table.remainders[key] = _calibrate(gm, inputs, ops, threads, model_timer)
        state["model_timed"] = True
    if state["timings"] or state["model_timed"]:
        table.save()
    cal = table.remainders[key]
    return ChannelCost(layers, group_list, n_slots, remainder=cal["remainder"], unit="ms",
                       scale=cal["scale"],
                       meta={"table": str(table.path), "env": dict(table.env), **cal,
                             "timings": state["timings"], "model_timed": state["model_timed"]},
                       round_to=int(round_to),
                       measure=_measurer(gm, inputs, threads, model_timer) if verify else None)


def _measurer(gm: fx.GraphModule, inputs: tuple, threads: int,
              model_timer: Callable | None) -> Callable[[nn.Module], float]:
    """``measure(model) -> fraction``: ``model``'s shrunk copy timed against ``gm``'s dense
    graph (``model_timer([dense, pruned], inputs)``; default: both exported to ONNX, the
    median over 3 windows of fresh interleaved onnxruntime sessions,
    :func:`~sparsify_fx.latency.probe.windowed_fractions`)."""
    from sparsify_fx.passes.shrink.shrink_graph import shrink

    from sparsify_fx.latency.probe import onnx_bytes, strip_masks, windowed_fractions
    dense: list = []  # the dense model (model_timer) or its ONNX bytes, made once

    def measure(model: nn.Module) -> float:
        if model_timer is not None:
            if not dense:
                dense.append(strip_masks(gm))
            dense_ms, pruned_ms = model_timer([dense[0], shrink(model)], inputs)
            return pruned_ms / dense_ms
        if not dense:
            dense.append(onnx_bytes(strip_masks(gm), inputs))
        pruned = onnx_bytes(shrink(model), inputs)  # shrink copies: the model stays put
        cpu = tuple(t.detach().cpu() for t in inputs)
        _, fractions = windowed_fractions([dense[0], pruned], cpu, threads)
        return statistics.median(fractions[1])

    return measure


def _calibrate(gm: fx.GraphModule, inputs: tuple, ops: ChannelCost, threads: int,
               model_timer: Callable | None) -> dict[str, float]:
    """Fit ``latency = remainder + scale x sum of op entries`` from the dense model and a
    probe with about half of every group's channels (the top half of its current ranking,
    rounded to the cost's ``round_to``), timed interleaved by
    ``model_timer([dense, probe], inputs) -> [ms, ms]`` (default: onnxruntime on the
    exported models). Interleaving makes the fit immune to
    load changes between the two; ``scale`` absorbs a systematic ratio between ops timed
    alone (earlier, maybe under another load) and in the model. Falls back to scale 1
    and ``remainder = dense - ops`` when the fit is degenerate. Leaves ``gm`` unchanged."""
    import copy as _copy

    from sparsify_fx.passes.channels.couple import group_masks, select_channels
    from sparsify_fx.passes.shrink.shrink_graph import shrink

    from sparsify_fx.latency.probe import measure_models, strip_masks
    probe_gm = _copy.deepcopy(gm)
    select_channels(probe_gm, 0.5, round_to=ops.round_to)
    for m in probe_gm.modules():
        if isinstance(m, Mask) and hasattr(m, "at_target"):  # a probe, not a budget
            m.at_target.fill_(True)
    keep = torch.cat([m.hard_mask().reshape(-1).cpu() for m in group_masks(probe_gm).values()])
    models = [strip_masks(gm), shrink(probe_gm)]
    dense_ms, probe_ms = (model_timer(models, inputs) if model_timer is not None
                          else measure_models(models, inputs, threads))
    s_dense, s_probe = ops.dense, ops.cost(keep)
    scale = (dense_ms - probe_ms) / (s_dense - s_probe) if s_dense > s_probe else 0.0
    remainder = dense_ms - scale * s_dense
    if not (scale > 0 and remainder >= 0):
        scale, remainder = 1.0, max(0.0, dense_ms - s_dense)
    return {"remainder": float(remainder), "scale": float(scale), "dense_ms": float(dense_ms),
            "probe_ms": float(probe_ms), "ops_dense_ms": float(s_dense),
            "ops_probe_ms": float(s_probe)}


def kept_widths(cost: ChannelCost, keep: Tensor) -> dict[str, tuple[int, int]]:
    """(kept outputs, kept inputs) of every layer when the slots ``keep`` are kept."""
    ext = cost._kept(keep)
    return {lay.weight: (int(ext[lay.out_slot].sum()), int(ext[lay.in_slot].sum()))
            for lay in cost.layers}


def measure_layers(cost: ChannelCost, keep: Tensor | None = None,
                   timer: Callable | None = None) -> dict[str, float]:
    """Each layer of a latency cost timed alone in onnxruntime at its exact kept widths
    (``keep`` defaults to the masks' hard decisions): the table's estimate, checked."""
    from sparsify_fx.latency.table import ort_timer
    keep = cost.hard_keep() if keep is None else keep
    threads = int(cost.meta.get("env", {}).get("threads", 2))
    timer = timer or ort_timer(threads)
    widths = kept_widths(cost, keep)
    out: dict[str, float] = {}
    for lay in cost.layers:
        sig = getattr(lay.cost, "signature", None)
        if isinstance(lay.cost, MacsCost) and lay.cost.unit == 0.0:
            out[lay.weight] = out.get(lay.weight, 0.0)  # attn v: timed with q k^T
            continue
        if sig is None:
            raise ConfigError("measure_layers needs a latency cost from channel_latency(...)")
        o, i = widths[lay.weight]
        out[lay.weight] = out.get(lay.weight, 0.0) + (timer(sig, o, i) if o and i else 0.0)
    return out


def budget_cost(model: nn.Module, entries: list[MaskEntry], target_sparsity: object,
                target_macs: float | None, target_latency: float | None,
                cost: ChannelCost | None,
                example_inputs: Sequence[Tensor] | Tensor | None = None
                ) -> tuple[float, ChannelCost]:
    """(fraction to keep, cost model) for a coupled cut or controller against a
    :class:`ChannelCost`: ``target_latency`` (a fraction of the dense onnxruntime latency;
    the latency table is built from ``example_inputs`` or those given to ``transform``
    unless ``cost`` is passed), or ``target_macs`` with an explicit ``cost``. Read-only."""
    from sparsify_fx.config import config_of
    given = [n for n, v in (("target_sparsity", target_sparsity), ("target_macs", target_macs),
                            ("target_latency", target_latency)) if v is not None]
    if len(given) != 1 or given[0] == "target_sparsity":
        raise ConfigError(f"a cost model budget takes exactly one of target_macs or "
                          f"target_latency, got {given or 'none'}")
    fraction = float(target_latency if target_latency is not None else target_macs)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{given[0]} must be a fraction in (0, 1], got {fraction!r}")
    if not is_coupled(entries):
        raise ConfigError(f"{given[0]} with a cost model needs coupled channel masks: "
                          "transform(..., granularity='channel') on a fully traced model")
    if cost is None:
        cfg = config_of(unwrap(model))
        inputs = example_inputs if example_inputs is not None else getattr(
            cfg, "example_inputs", None)
        if inputs is None:
            raise ConfigError("target_latency needs example inputs to build the latency table: "
                              "pass example_inputs= to transform, or cost=sparsify_fx.budgets.cost_model."
                              "channel_latency(model, example_inputs)")
        cost = channel_latency(model, inputs)
    if target_latency is not None and cost.unit != "ms":
        raise ConfigError("target_latency needs a latency cost (channel_latency), got a "
                          f"{cost.unit} cost")
    return fraction, cost
