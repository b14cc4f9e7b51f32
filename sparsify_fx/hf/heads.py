"""Attention heads and MLP units of Hugging Face encoders as prunable slots (issue 14).

Superseded by the general structured path: ``transform(model,
granularity="channel", example_inputs=..., capture="export")`` reads heads, KV
groups and MLP units of any captured model from its ATen graph, lets CS learn
them, and ``shrink`` returns the smaller source class (docs/transformers.md).
This module stays for code written against it (a one-shot L1 plan of BERT-family
encoder layers, found on the source ``nn.Module`` by attribute names):

* :func:`find_hf_layers` finds every layer shaped like ``BertLayer``: a
  self-attention module with ``query``/``key``/``value`` ``nn.Linear`` children
  and ``num_attention_heads``/``attention_head_size`` attributes, its sibling
  ``output.dense`` (the attention out-projection), and the layer's
  ``intermediate.dense`` / ``output.dense`` MLP pair (BERT, RoBERTa, HF ViT
  and other models copied from ``modeling_bert``).
* :func:`plan_hf` scores each head (its q, k, v rows and out-projection
  columns) and each MLP unit (its intermediate row and output column) by L1
  magnitude and cuts them to a MACs budget: an :class:`HFPlan`.
* :func:`freeze_plan` writes a plan into the element masks of a model that
  ``transform`` captured (torch.export or fx): the *hard-masked* model.
  ``sparsify_fx.hf.shrink.shrink_hf`` builds the smaller source model; the two
  compute the same function (tested to 1e-5).

MACs (one sample, ``seq_len`` tokens ``L``, hidden ``H``, head size ``d``) of
one layer keeping ``h`` heads and ``u`` units: ``h d L (4H + 2L) + 2 u L H``
(q, k, v and out projections, ``q k^T`` and ``attn v``, the MLP pair). The
budget is a fraction of these encoder-layer MACs; embeddings, pooler and
classifier are not pruned (BERT-base at L=128: 0.005 % of the MACs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparsify_fx.errors import ConfigError, SelectionError
from sparsify_fx.mask_index import masks

SELECTIONS = ("uniform", "global")
STRUCTURES = ("both", "heads", "units")


@dataclass(frozen=True)
class HFLayer:
    """One BERT-style encoder layer of a source model (qualified module names)."""

    name: str               #: the layer, e.g. ``bert.encoder.layer.0``
    self_attention: str     #: module with ``query``/``key``/``value``
    attn_out: str           #: the attention out-projection ``nn.Linear``
    intermediate: str       #: MLP first ``nn.Linear`` (hidden -> units)
    mlp_out: str            #: MLP second ``nn.Linear`` (units -> hidden)
    heads: int
    head_dim: int
    units: int
    hidden: int

    def macs(self, heads: int, units: int, seq_len: int) -> int:
        """MACs of this layer for one sample keeping ``heads`` and ``units``."""
        L, H = seq_len, self.hidden
        return heads * self.head_dim * L * (4 * H + 2 * L) + 2 * units * L * H


@dataclass(frozen=True)
class HFLayerKeep:
    """Kept head and unit indices (sorted) of one layer."""

    layer: HFLayer
    heads: tuple[int, ...]
    units: tuple[int, ...]


@dataclass(frozen=True)
class HFPlan:
    """Which heads and units every layer keeps, and the MACs it leaves.

    ``dense_macs`` / ``macs``: encoder-layer MACs for one sample of ``seq_len``
    tokens, before and after (see module doc)."""

    layers: tuple[HFLayerKeep, ...]
    seq_len: int

    @property
    def dense_macs(self) -> int:
        return sum(k.layer.macs(k.layer.heads, k.layer.units, self.seq_len) for k in self.layers)

    @property
    def macs(self) -> int:
        return sum(k.layer.macs(len(k.heads), len(k.units), self.seq_len) for k in self.layers)

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.dense_macs

    def summary(self) -> str:
        """``heads kept 72 / 144, MLP units kept 18,000 / 36,864, MACs ratio 0.5000``."""
        h = sum(len(k.heads) for k in self.layers)
        u = sum(len(k.units) for k in self.layers)
        return (f"heads kept {h} / {sum(k.layer.heads for k in self.layers)}, MLP units kept "
                f"{u:,} / {sum(k.layer.units for k in self.layers):,}, "
                f"MACs ratio {self.macs_ratio:.4f}")


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return None
    return mod if isinstance(mod, nn.Linear) else None


def find_hf_layers(model: nn.Module) -> list[HFLayer]:
    """Every BERT-style encoder layer of ``model`` in module order (read-only).

    Raises :class:`SelectionError` when there is none, naming what is looked for."""
    found = []
    for name, mod in model.named_modules():
        if not all(isinstance(getattr(mod, p, None), nn.Linear) for p in ("query", "key", "value")):
            continue
        heads = getattr(mod, "num_attention_heads", None)
        d = getattr(mod, "attention_head_size", None)
        block, _, _ = name.rpartition(".")
        layer, _, _ = block.rpartition(".")
        attn_out = _linear(model, f"{block}.output.dense")
        inter = _linear(model, f"{layer}.intermediate.dense")
        mlp_out = _linear(model, f"{layer}.output.dense")
        if (not isinstance(heads, int) or not isinstance(d, int) or not block
                or attn_out is None or inter is None or mlp_out is None
                or attn_out.in_features != heads * d or mlp_out.in_features != inter.out_features
                or getattr(mod, "is_decoder", False)):
            continue
        found.append(HFLayer(layer, name, f"{block}.output.dense", f"{layer}.intermediate.dense",
                             f"{layer}.output.dense", heads, d, inter.out_features,
                             attn_out.out_features))
    if not found:
        raise SelectionError(
            f"{type(model).__name__} has no BERT-style encoder layer (a self-attention module with "
            "query/key/value nn.Linear and num_attention_heads/attention_head_size, its "
            "sibling output.dense, and the layer's intermediate.dense/output.dense). For any "
            "other model (decoders with grouped-query attention, gated or fused MLPs) use the "
            "general path: transform(model, granularity='channel', example_inputs=..., "
            "capture='export'), apply_budget, shrink (docs/transformers.md)")
    return found


def slot_scores(model: nn.Module, layer: HFLayer, per_weight: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 scores ``(heads, units)`` of one layer: sum of |w| over the q, k, v rows and
    out-projection columns of a head, over the intermediate row and output column of
    a unit; ``per_weight``: divided by the number of weights (mean |w|)."""
    with torch.no_grad():
        d = layer.head_dim
        sa = model.get_submodule(layer.self_attention)
        rows = sum(getattr(sa, p).weight.abs().sum(1) for p in ("query", "key", "value"))
        cols = model.get_submodule(layer.attn_out).weight.abs().sum(0)
        heads = (rows + cols).reshape(layer.heads, d).sum(1).float()
        units = (model.get_submodule(layer.intermediate).weight.abs().sum(1)
                 + model.get_submodule(layer.mlp_out).weight.abs().sum(0)).float()
        if per_weight:
            heads = heads / (4 * d * layer.hidden)
            units = units / (2 * layer.hidden)
    return heads.cpu(), units.cpu()


def _top(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    return tuple(sorted(torch.argsort(scores, descending=True, stable=True)[:k].tolist()))


def plan_hf(model: nn.Module, *, target_macs: float, seq_len: int, selection: str = "uniform",
            structure: str = "both") -> HFPlan:
    """Choose the heads and units to keep so that encoder-layer MACs <= ``target_macs`` x dense.

    ``selection="uniform"``: every layer keeps ``round(target_macs x heads)`` heads
    (``structure="units"``: all) by L1 score, then the same number of MLP units
    per layer, the largest that fits the budget. ``"global"``: one ranking of all
    heads and units by mean |w|, the lowest removed one at a time until the budget
    holds (each layer keeps >= 1 head and >= 1 unit), then the best removed slots
    that still fit are put back (a removed head can overshoot by its MACs).
    ``structure``: ``"both"``, ``"heads"`` (units kept; uniform: the largest
    equal head count that fits) or ``"units"`` (heads kept). Read-only; raises
    :class:`ConfigError` for bad options or a budget the structure cannot reach."""
    if selection not in SELECTIONS or structure not in STRUCTURES:
        raise ConfigError(f"selection must be one of {SELECTIONS} and structure one of "
                          f"{STRUCTURES}; got {selection!r}, {structure!r}")
    if not (isinstance(target_macs, (int, float)) and 0.0 < target_macs <= 1.0):
        raise ConfigError(f"target_macs must be a fraction in (0, 1], got {target_macs!r}")
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ConfigError(f"seq_len must be a positive int, got {seq_len!r}")
    layers = find_hf_layers(model)
    scores = [slot_scores(model, ly) for ly in layers]
    budget = target_macs * sum(ly.macs(ly.heads, ly.units, seq_len) for ly in layers)
    if selection == "uniform":
        keeps = _uniform(layers, scores, budget, seq_len, structure)
    else:
        keeps = _global(layers, scores, budget, seq_len, structure)
    plan = HFPlan(tuple(keeps), seq_len)
    if plan.macs > budget:
        raise ConfigError(f"target_macs={target_macs} is below what structure={structure!r} "
                          f"can reach ({plan.summary()}); raise it or prune heads and units")
    return plan


def _uniform(layers: list[HFLayer], scores: list, budget: float, seq_len: int,
             structure: str) -> list[HFLayerKeep]:
    frac = budget / sum(ly.macs(ly.heads, ly.units, seq_len) for ly in layers)
    n_heads = [ly.heads if structure == "units" else max(1, min(ly.heads, round(frac * ly.heads)))
               for ly in layers]
    if structure == "heads":
        # the largest per-layer head fraction that fits (heads are coarse)
        k = max(1, math.floor(frac * layers[0].heads))
        while k > 1 and sum(ly.macs(min(ly.heads, k), ly.units, seq_len) for ly in layers) > budget:
            k -= 1
        n_heads = [min(ly.heads, k) for ly in layers]
        n_units = [ly.units for ly in layers]
    else:
        head_cost = sum(ly.macs(h, 0, seq_len) for ly, h in zip(layers, n_heads))
        unit_cost = sum(ly.macs(0, 1, seq_len) for ly in layers)  # one unit in every layer
        per_layer = max(1, math.floor((budget - head_cost) / unit_cost))
        n_units = [min(ly.units, per_layer) for ly in layers]
    return [HFLayerKeep(ly, _top(h, nh), _top(u, nu))
            for ly, (h, u), nh, nu in zip(layers, scores, n_heads, n_units)]


def _global(layers: list[HFLayer], scores: list, budget: float, seq_len: int,
            structure: str) -> list[HFLayerKeep]:
    slots = []  # (score, layer index, "h"/"u", slot index, MACs)
    for i, (ly, (h, u)) in enumerate(zip(layers, scores)):
        if structure != "units":
            slots += [(float(s), i, "h", j, ly.macs(1, 0, seq_len)) for j, s in enumerate(h)]
        if structure != "heads":
            slots += [(float(s), i, "u", j, ly.macs(0, 1, seq_len)) for j, s in enumerate(u)]
    slots.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
    kept = [{"h": set(range(ly.heads)), "u": set(range(ly.units))} for ly in layers]
    cost = sum(ly.macs(ly.heads, ly.units, seq_len) for ly in layers)
    removed = []
    for slot in slots:
        if cost <= budget:
            break
        _, i, kind, j, macs = slot
        if len(kept[i][kind]) > 1:
            kept[i][kind].discard(j)
            cost -= macs
            removed.append(slot)
    for _, i, kind, j, macs in reversed(removed):  # refill: best removed slots that still fit
        if cost + macs <= budget:
            kept[i][kind].add(j)
            cost += macs
    return [HFLayerKeep(ly, tuple(sorted(k["h"])), tuple(sorted(k["u"])))
            for ly, k in zip(layers, kept)]


def plan_masks(plan: HFPlan) -> dict[str, torch.Tensor]:
    """Bool keep tensors per weight name (source names) that gate exactly the plan's
    pruned heads and units: q/k/v rows, out-projection columns, MLP rows/columns."""
    out: dict[str, torch.Tensor] = {}
    for keep in plan.layers:
        ly = keep.layer
        ch = torch.zeros(ly.heads, ly.head_dim, dtype=torch.bool)
        ch[list(keep.heads)] = True
        ch = ch.reshape(-1)
        unit = torch.zeros(ly.units, dtype=torch.bool)
        unit[list(keep.units)] = True
        for p in ("query", "key", "value"):
            out[f"{ly.self_attention}.{p}.weight"] = ch[:, None].expand(-1, ly.hidden)
        out[f"{ly.attn_out}.weight"] = ch[None, :].expand(ly.hidden, -1)
        out[f"{ly.intermediate}.weight"] = unit[:, None].expand(-1, ly.hidden)
        out[f"{ly.mlp_out}.weight"] = unit[None, :].expand(ly.hidden, -1)
    return out


def freeze_plan(transformed: nn.Module, plan: HFPlan) -> None:
    """Freeze the element masks of a ``transform``-ed model to ``plan`` (mutates its masks).

    Every weight the plan gates must have a mask (``granularity="element"``, the
    default; names as in the source model); other masks are left as they are.
    Raises :class:`SelectionError` naming a missing mask or a shape mismatch."""
    by_name = {e.name: e for e in masks(transformed)}
    for name, keep in plan_masks(plan).items():
        entry = by_name.get(name)
        if entry is None:
            raise SelectionError(f"{name} has no mask in the transformed model; transform it "
                                 "with granularity='element' and include= covering the encoder")
        if tuple(entry.mask.score_shape) != tuple(keep.shape):
            raise SelectionError(f"{name}: mask scores have shape {tuple(entry.mask.score_shape)}"
                                 f", the plan needs element masks of shape {tuple(keep.shape)}")
        entry.mask.freeze(keep)
        entry.mask.at_target.fill_(True)


__all__ = ["HFLayer", "HFLayerKeep", "HFPlan", "find_hf_layers", "slot_scores", "plan_hf",
           "plan_masks", "freeze_plan"]
