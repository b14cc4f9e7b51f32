"""Channel coupling pass: coupled channel masks share one score vector.

Run after ``transform(..., granularity="channel")`` has put one channel mask on
every Conv/Linear weight. Mutates the GraphModule it is given:

* one *group mask* per :class:`~sparsify_fx.passes.channels.analysis.ChannelGroup`
  (built by ``make_group_mask(K, name)``, score shape ``(K,)``) is stored as
  ``sparsify_masks.channel_group_<i>``;
* every producer weight mask is replaced by a :class:`SharedChannelMask` that
  gathers its channels' values from the group mask(s) (same key, so
  ``sparsify_fx.masks`` still lists one entry per weight);
* the producer's bias gets a mask node too, and every BatchNorm on the group's
  channels gets its weight and bias parametrized with the same gate
  (``kind`` "bias" / "batchnorm", ``auxiliary=True``): a pruned channel is then
  exactly zero wherever it flows, in soft and hard mode, and removing it
  (:func:`sparsify_fx.passes.shrink.shrink_graph.shrink`) is exact;
* attention heads (:mod:`sparsify_fx.passes.channels.attention_heads`) are groups too: a
  ``nn.MultiheadAttention``'s ``in_proj_weight`` / ``in_proj_bias`` get a
  :class:`SharedChannelMask` parametrization (one slot per head), a windowed
  attention's ``qkv`` weight and bias mask nodes;
* masks on channels that must stay whole (model outputs, unsupported
  patterns, other weights inside leaf modules, ConvTranspose) are removed; a
  :class:`ChannelCouplingWarning` names the nodes of unsupported patterns
  (``strict=True`` raises :class:`ShrinkError` instead).
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask import Mask, MaskSet, SharedChannelMask
from sparsify_fx.mask_index import MaskEntry, masks, unwrap

from sparsify_fx.passes.pass_base import PassResult, SparsifyPass
from sparsify_fx.passes.stored_analysis import channel_graph_of
from sparsify_fx.passes.aten.experts import mask_channel_dim, mask_expert_bias
from sparsify_fx.passes.channels.analysis import COLUMNS, ChannelGraph, analyze_channels, is_aten

GROUP_PREFIX = "channel_group_"
PRODUCER_KINDS = ("conv", "linear", "depthwise_conv", "grouped_conv", "matmul", "experts")
GroupMaskFactory = Callable[[int, str], Mask]


class ChannelCouplingWarning(UserWarning):
    """Some channels stay whole because the coupling analysis did not understand an op."""


def _index_for(cg: ChannelGraph, ids: np.ndarray, group_masks: list[Mask],
               only: np.ndarray | None = None) -> tuple[list[Mask], Tensor] | None:
    """Sources and gather index for channels ``ids`` (``only``: bool per entry, the others
    read as whole); None when every channel is whole."""
    g, s = cg.slots(ids)
    if only is not None:
        g = np.where(only, g, -1)
    used = sorted(set(g[g >= 0].tolist()))
    if not used:
        return None
    offsets, total = {}, 0
    for gi in used:
        offsets[gi] = total
        total += len(cg.groups[gi].components)
    index = np.full(len(ids), total, dtype=np.int64)
    for gi in used:
        sel = g == gi
        index[sel] = offsets[gi] + s[sel]
    return [group_masks[gi] for gi in used], torch.from_numpy(index)


def _remove_graph_mask(gm: fx.GraphModule, key: str) -> None:
    target = f"{MaskSet.ATTRIBUTE}.{key}"
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == target:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    del getattr(gm, MaskSet.ATTRIBUTE)[key]


def _key_of(entry: MaskEntry) -> str:
    assert entry.node is not None
    return str(entry.node.target).split(".", 1)[1]


def couple_channels(gm: nn.Module, make_group_mask: GroupMaskFactory, *,
                    strict: bool = False) -> ChannelGraph | None:
    """Make coupled channel masks of ``gm`` share one score vector per group.

    Returns the :class:`ChannelGraph` used, or None (with a warning) when
    ``gm`` is not one fully traced GraphModule. Mutates ``gm``.
    """
    if isinstance(gm, fx.GraphModule) and not hasattr(gm, MaskSet.ATTRIBUTE) and masks(gm):
        gm.add_module(MaskSet.ATTRIBUTE, MaskSet())  # only leaf masks (attention heads)
    if not isinstance(gm, fx.GraphModule) or not hasattr(gm, MaskSet.ATTRIBUTE):
        warnings.warn(ChannelCouplingWarning(
            "channel coupling needs a fully traced model; the channel masks of this "
            "partially traced model stay independent and shrink() will refuse it"), stacklevel=3)
        return None
    entries = masks(gm)
    leaf_entries = [e for e in entries if e.route == "parametrize"
                    and e.mask.granularity == "channel"]
    graph_entries = [e for e in entries if e.route == "graph" and e.mask.granularity == "channel"]
    by_weight = {str(e.node.args[0].target): e for e in graph_entries
                 if e.kind in PRODUCER_KINDS and e.node is not None}
    masked = set(by_weight) | {e.name for e in leaf_entries if e.kind == "attention_in_proj"}
    cg = _analyze_gating_columns(gm, masked)
    uses: dict[str, int] = {}
    for p in cg.producers.values():
        uses[p.weight] = uses.get(p.weight, 0) + 1
    # the fx walk cannot tie a weight's several uses: keep such weights whole (the ATen
    # walk ties them, see passes.aten.producers)
    shared = set() if is_aten(gm) else {w for w, n in uses.items() if n > 1 and w in masked}
    if shared:
        masked -= shared
        cg = analyze_channels(gm, masked)
    if cg.unsupported:
        message = ("channel coupling does not understand these ops; the channels they touch "
                   "stay whole:\n  " + "\n  ".join(cg.unsupported))
        if strict:
            raise ShrinkError(message + "\nPass strict=False to keep those channels whole, or "
                              "exclude the layers around them.")
        warnings.warn(ChannelCouplingWarning(message), stacklevel=3)

    mask_set = getattr(gm, MaskSet.ATTRIBUTE)
    device = next((e.weight.device for e in graph_entries + leaf_entries), torch.device("cpu"))
    group_masks: list[Mask] = []
    for group in cg.groups:
        gmask = make_group_mask(len(group.components), f"{GROUP_PREFIX}{group.index}")
        gmask.kind = "channel_group"
        gmask.to(device)
        mask_set[f"{GROUP_PREFIX}{group.index}"] = gmask
        group_masks.append(gmask)

    producers = {p.weight: p for p in cg.producers.values() if p.weight in masked}
    for e in graph_entries:
        weight = str(e.node.args[0].target)
        prod = producers.get(weight)
        made = None if prod is None else _index_for(cg, prod.out_ids, group_masks)
        if made is None:
            _remove_graph_mask(gm, _key_of(e))
            continue
        sources, index = made
        mask_set[_key_of(e)] = SharedChannelMask(
            e.mask.weight_shape, sources, index.to(device), e.name, e.kind,
            channel_dim=mask_channel_dim(prod)).to(device)
        if prod.bias is not None:
            (mask_expert_bias if prod.kind == "experts" else _mask_bias)(gm, prod, sources, index,
                                                                      device)
    for e in leaf_entries:  # inside leaf modules: attention heads, else kept whole
        prod = producers.get(e.name)
        made = None if prod is None else _index_for(cg, prod.out_ids, group_masks)
        parametrize.remove_parametrizations(e.host, e.attr, leave_parametrized=False)
        if made is None:
            if not _is_attention_out(cg, e.name):
                warnings.warn(ChannelCouplingWarning(
                    f"{e.name} lives inside a leaf module; its channels stay whole"), stacklevel=3)
            continue
        sources, index = made
        parametrize.register_parametrization(e.host, e.attr, SharedChannelMask(
            e.mask.weight_shape, sources, index.to(device), e.name, e.kind).to(device), unsafe=True)
        bias_attr = e.attr.replace("weight", "bias")
        if prod.bias is not None and getattr(e.host, bias_attr, None) is not None:
            shape = tuple(getattr(e.host, bias_attr).shape)
            parametrize.register_parametrization(e.host, bias_attr, SharedChannelMask(
                shape, sources, index.to(device), prod.bias, "bias", auxiliary=True).to(device),
                unsafe=True)
    for prod in cg.producers.values():
        made = _column_index(cg, prod, group_masks)
        if made is not None:
            _mask_columns(gm, prod, made[0], made[1], device)
    for norm in cg.norms.values():
        made = _index_for(cg, norm.ids, group_masks)
        if made is None:
            continue
        if norm.params:  # an ATen batch_norm call: mask nodes after its weight and bias inputs
            for param in norm.params[:2]:
                if param is not None:
                    _mask_input(gm, norm.node, param, made[0], made[1], device, "batchnorm")
            continue
        bn = gm.get_submodule(norm.module)
        for attr in ("weight", "bias"):
            follower = SharedChannelMask(tuple(getattr(bn, attr).shape), made[0],
                                         made[1].to(device), f"{norm.module}.{attr}",
                                         "batchnorm", auxiliary=True).to(device)
            parametrize.register_parametrization(bn, attr, follower, unsafe=True)
    gm.graph.lint()
    gm.recompile()
    channel_graph_of(gm)  # the analysis of the coupled model, stored once on the graph
    return cg


def _gated_prunable(cg: ChannelGraph, prod) -> bool:
    """``prod`` gates input columns of which some channel may be removed."""
    if prod.gated_in is None or not prod.gated_in.any():
        return False
    return bool((cg.slots(prod.in_ids[prod.gated_in])[0] >= 0).any())


def _analyze_gating_columns(gm: fx.GraphModule, masked: set[str]) -> ChannelGraph:
    """The analysis with input columns gated wherever that lets a channel go, except on
    weights whose own rows may go too (one mask node per weight): those are analysed
    again with their not-exactly-zero inputs kept whole."""
    keep_whole: set[str] = set()
    while True:
        cg = analyze_channels(gm, masked, gated=lambda w: w not in keep_whole)
        rows = {p.weight for p in cg.producers.values()
                if p.weight in masked and (cg.slots(p.out_ids)[0] >= 0).any()}
        clash = {p.weight for p in cg.producers.values()
                 if p.weight in rows and _gated_prunable(cg, p)} - keep_whole
        if not clash:
            return cg
        keep_whole |= clash


def _column_index(cg: ChannelGraph, prod, group_masks: list[Mask]) -> tuple[list[Mask], Tensor] | None:
    """Sources and gather index of ``prod``'s input-column gate (one entry per input
    column; positions that need no gate point at "whole"), or None."""
    if not _gated_prunable(cg, prod):
        return None
    return _index_for(cg, prod.in_ids, group_masks, only=prod.gated_in)


def _mask_columns(gm: fx.GraphModule, prod, sources: list[Mask], index: Tensor,
                  device: torch.device) -> None:
    """Put a ``"columns"`` follower mask node after every ``get_attr`` of ``prod.weight``
    (all its uses: a shared weight's uses read the same input channels)."""
    mask_set = getattr(gm, MaskSet.ATTRIBUTE)
    key = MaskSet.key_for(prod.weight) + "_columns"
    if key in mask_set:
        return  # a weight read by several calls: gated once
    shape = tuple(gm.get_parameter(prod.weight).shape)
    dim = 0 if prod.weight_layout == "io" else 1
    mask_set[key] = SharedChannelMask(shape, sources, index.to(device), prod.weight, COLUMNS,
                                      auxiliary=True, channel_dim=dim).to(device)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and str(node.target) == prod.weight:
            users = list(node.users)
            with gm.graph.inserting_after(node):
                masked = gm.graph.call_module(f"{MaskSet.ATTRIBUTE}.{key}", (node,))
            for user in users:
                user.replace_input_with(node, masked)


def _is_attention_out(cg: ChannelGraph, weight: str) -> bool:
    """``weight`` is the out-projection of an attention whose heads are groups."""
    return any(cg.producers[s.out].weight == weight for s in cg.attention.values())


def _mask_bias(gm: fx.GraphModule, prod, sources: list[Mask], index: Tensor,
               device: torch.device) -> None:
    """Put a follower mask node after the producer's bias ``get_attr`` input."""
    _mask_input(gm, prod.node, prod.bias, sources, index, device, "bias")


def _mask_input(gm: fx.GraphModule, node_name: str, param: str, sources: list[Mask],
                index: Tensor, device: torch.device, kind: str) -> None:
    """Put a follower mask node between ``param``'s ``get_attr`` and the call ``node_name``."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    arg = next((a for a in node.all_input_nodes
                if a.op == "get_attr" and str(a.target) == param), None)
    if arg is None:
        return  # already behind a mask node
    key = MaskSet.key_for(param)
    mask_set = getattr(gm, MaskSet.ATTRIBUTE)
    while key in mask_set:
        key += "_"
    shape = tuple(gm.get_parameter(param).shape)
    mask_set[key] = SharedChannelMask(shape, sources, index.to(device), param, kind,
                                      auxiliary=True).to(device)
    with gm.graph.inserting_after(arg):
        masked = gm.graph.call_module(f"{MaskSet.ATTRIBUTE}.{key}", (arg,))
    node.replace_input_with(arg, masked)


# -- working with groups after coupling ------------------------------------------------
def group_masks(model: nn.Module) -> dict[str, Mask]:
    """The shared group masks of a coupled model, ``{key: mask}`` (score shape ``(K,)``)."""
    model = unwrap(model)
    out: dict[str, Mask] = {}
    for module in model.modules():  # the model itself, or an exported model's graphs
        mask_set = getattr(module, MaskSet.ATTRIBUTE, None) if isinstance(module, fx.GraphModule) \
            else None
        if isinstance(mask_set, MaskSet):
            out.update((k, m) for k, m in mask_set.items() if k.startswith(GROUP_PREFIX))
    return out


def channel_l1_scores(model: nn.Module, per_weight: bool = False) -> dict[str, Tensor]:
    """L1-norm channel scores per group: sum over the group's producer weights of
    ``|w[c]|.sum()`` for every score slot (the magnitude baseline). ``per_weight=True``
    divides each slot's sum by the number of weights it gates (mean ``|w|``), so slots
    of different sizes (an attention head's ``3 x head_dim`` rows, one MLP unit) rank
    on one scale. Read-only."""
    groups = group_masks(model)
    ids = {id(m): k for k, m in groups.items()}
    scores = {k: torch.zeros(m.score_shape, dtype=torch.float64) for k, m in groups.items()}
    counts = {k: torch.zeros(m.score_shape, dtype=torch.float64) for k, m in groups.items()}
    # a group no weight's rows belong to (an embedding table's columns, cut through its
    # readers' column gates) is ranked by the input columns it gates
    gates = {k: torch.zeros(m.score_shape, dtype=torch.float64) for k, m in groups.items()}
    with torch.no_grad():
        for e in masks(model):
            m = e.mask
            columns = getattr(m, "kind", "") == COLUMNS
            if not isinstance(m, SharedChannelMask) or (m.auxiliary and not columns):
                continue
            w = e.weight.detach().abs().movedim(getattr(m, "channel_dim", 0), 0)
            per_channel = w.reshape(w.shape[0], -1).sum(1).double()
            for src, sel, slot in m.source_slots():
                if columns:
                    gates[ids[id(src)]].index_add_(0, slot.cpu(), per_channel[sel].cpu())
                    continue
                scores[ids[id(src)]].index_add_(0, slot.cpu(), per_channel[sel].cpu())
                counts[ids[id(src)]].index_add_(0, slot.cpu(), torch.full(
                    (int(sel.sum()),), float(m.weights_per_score), dtype=torch.float64))
    for k in scores:
        if not counts[k].any():
            scores[k] = gates[k]
    if per_weight:
        scores = {k: v / counts[k].clamp(min=1.0) for k, v in scores.items()}
    return {k: v.float() for k, v in scores.items()}


def select_channels(model: nn.Module, keep_fraction: float | Mapping[str, float],
                    scores: Mapping[str, Tensor] | None = None,
                    round_to: int = 1) -> dict[str, int]:
    """Freeze every group to its top ``keep_fraction`` of slots (at least one), the count
    rounded to a multiple of ``round_to`` (at least ``round_to``, at most all slots).

    Ranked by ``scores[key]`` if given (e.g. :func:`channel_l1_scores`), else by
    each group mask's ``ranking_scores()``. Returns ``{key: slots kept}``.
    Mutates the group masks (``freeze``).
    """
    kept: dict[str, int] = {}
    for key, m in group_masks(model).items():
        frac = keep_fraction[key] if isinstance(keep_fraction, Mapping) else keep_fraction
        if not 0.0 < float(frac) <= 1.0:
            raise ShrinkError(f"keep fraction for {key} must be in (0, 1], got {frac!r}")
        s = (scores[key] if scores is not None else m.ranking_scores()).detach().reshape(-1)
        step = max(1, int(round_to))
        n = min(s.numel(), max(step, int(round(float(frac) * s.numel() / step)) * step))
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[torch.sort(s.cpu().float(), descending=True, stable=True).indices[:n]] = True
        m.freeze(keep.reshape(m.score_shape))
        kept[key] = n
    return kept


class CoupleChannels(SparsifyPass):
    """``CoupleChannels(make_group_mask)(model) -> PassResult``: :func:`couple_channels`
    as a pass; the :class:`ChannelGraph` it used is in ``.graph`` (None: not coupled)."""

    def __init__(self, make_group_mask: GroupMaskFactory, strict: bool = False) -> None:
        self.make_group_mask = make_group_mask
        self.strict = strict
        self.graph: ChannelGraph | None = None

    def call(self, graph_module: nn.Module) -> PassResult:  # type: ignore[override]
        self.graph = couple_channels(graph_module, self.make_group_mask, strict=self.strict)
        return PassResult(graph_module, self.graph is not None)
