"""One uniform width per config field (read-only): which channel groups a uniform cut
must give the same kept count, read from the model's Hugging Face config.

A Hugging Face config holds one value per width field, whatever kind of layer reads
it: ``num_attention_heads`` sizes a sliding-window and a full-attention layer alike
(even with different ``head_dim`` fields), ``intermediate_size`` a dense MLP and the
experts of an MoE layer, a layer run once and a layer run in a loop. Groups of
different structure can therefore share one field. :func:`field_holds` finds, for each
integer or float config field, the producers whose channel dimension changes when the
field changes (the class built on the meta device from a copy with the field halved), and so
the channel groups the field holds and whether it also holds channels kept whole (a
layer whose channels the analysis cannot follow). :func:`uniform_plan` merges the
structure classes of :func:`~sparsify_fx.passes.aten.experts.uniform_classes` that a
field ties together (kept counts proportional to each group's units) and marks the
classes a field ties to whole-kept channels: those must stay whole, or the saved config
could not describe both. A group whose only fields are coarser than a unit
(``mamba_expand = 2`` sizing 128 units) is held in steps of ``units / value`` (64: the
field's whole values), its class's step; whole when the units are no multiple of it.

A field counts only when every weight it reshapes changes along one dimension: a
residual width (``hidden_size`` of a model deriving ``head_dim`` from it) changes
projections in both dims and holds no unit width. Heads are held only by the head-count
fields (:data:`HEAD_FIELDS`), the ones the shrink rewrites; a head width (``head_dim``)
stays. Without an HF config the plan is the structure classes alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import fx, nn

from sparsify_fx.mask_index import unwrap
from sparsify_fx.passes.aten.experts import EXPERTS, mask_channel_dim, uniform_classes
from sparsify_fx.passes.shrink.config_search import changes_one_dim
from sparsify_fx.passes.shrink.config_probes import config_owner, halved_fields, holds_width

#: producer kinds whose weight is a parameter of the source model
WEIGHT_KINDS = ("linear", "conv", EXPERTS)
#: the fields a cut of attention heads rewrites (``head_dim`` stays: the shrink pins it,
#: so a head width field such as ``head_dim`` / ``global_head_dim`` ties no heads)
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads")


@dataclass
class FieldHold:
    """What one config field sizes: the channel groups (indices) whose producers change
    along their channel dim with it, and the whole-kept producers that do (weights)."""

    value: int | float
    groups: set[int] = field(default_factory=set)
    whole: set[str] = field(default_factory=set)


@dataclass
class UniformPlan:
    """The classes one uniform width covers. ``classes``: key -> group indices;
    ``steps``: key -> kept-count step (grouped-matmul alignment); ``multiples``: group
    index -> slots per counted slot; ``fields``: key -> config fields tying the class;
    ``whole``: key -> why the class keeps every slot (the whole-kept weights a field ties
    it to, or a field coarser than its units); ``ratio``: key -> the ratio fields that
    set its step (a field coarser than a unit holds counts in steps of ``units / value``)."""

    classes: dict[tuple, list[int]]
    steps: dict[tuple, int]
    multiples: dict[int, int]
    fields: dict[tuple, list[str]] = field(default_factory=dict)
    whole: dict[tuple, list[str]] = field(default_factory=dict)
    ratio: dict[tuple, list[str]] = field(default_factory=dict)


def source_config_model(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of the module holding an HF config inside the capture's source
    model (``transform`` keeps it as ``source_module``); None without one."""
    source = unwrap(model).__dict__.get("source_module")
    return config_owner(source) if source is not None else None


def field_holds(hf_model: nn.Module, prefix: str, cg: Any) -> dict[str, FieldHold]:
    """``{field: FieldHold}`` for every integer or float field of ``hf_model.config`` that
    holds at least one channel group of ``cg`` (``prefix``: ``hf_model``'s path in the
    captured model; a float ratio holds any count, the config search writes it). A group
    a head-count field holds (:data:`HEAD_FIELDS`, the fields the shrink rewrites for
    fewer heads: :func:`~sparsify_fx.passes.shrink.hf_config.update_config`) counts as
    held by those only: another field reshaping it sizes each head (``head_dim``). Builds
    the class once per field on the meta device."""
    producers = [p for p in cg.producers.values() if p.kind in WEIGHT_KINDS]
    out: dict[str, FieldHold] = {}
    for attr, value, dense, small in halved_fields(hf_model):
        changed = {k: (v, small[k]) for k, v in dense.items() if k in small and small[k] != v}
        if not changed or not all(changes_one_dim(a, b) for a, b in changed.values()):
            continue  # no unit width: a residual width changes weights in two dims
        hold = FieldHold(value)
        for p in producers:
            key = p.weight[len(prefix) + 1:] if prefix and p.weight.startswith(prefix + ".") \
                else p.weight
            if key not in changed:
                continue
            before, after = changed[key]
            dim = mask_channel_dim(p)
            if dim >= len(before) or before[dim] == after[dim]:
                continue
            owners = cg.slots(p.out_ids)[0]
            hold.groups |= {int(g) for g in owners if g >= 0}
            if (owners < 0).any():
                hold.whole.add(p.weight)
        if hold.groups:
            out[attr] = hold
    heads = {g for a in HEAD_FIELDS if a in out for g in out[a].groups}
    for attr in [a for a in out if a not in HEAD_FIELDS]:  # a head width: no head count
        out[attr].groups -= heads
        if not out[attr].groups:
            del out[attr]
    return out


def uniform_plan(model: nn.Module, graph: fx.GraphModule, cg: Any,
                 signature: Callable[[Any], tuple]) -> UniformPlan:
    """The structure classes (:func:`~sparsify_fx.passes.aten.experts.uniform_classes`)
    merged where one config field holds groups of several (each group's kept count
    proportional to its units: ``multiples``), and marked ``whole`` where a field also
    holds channels kept whole; a class whose groups only fields coarser than a unit
    hold keeps counts in their step (``ratio``), or stays whole when no step divides its
    units. A merge whose unit counts are no whole multiples of each other is left undone
    (the shrink then records the gap and refuses the save)."""
    classes, steps, multiples = uniform_classes(graph, cg, signature)
    plan = UniformPlan(dict(classes), dict(steps), dict(multiples))
    found = source_config_model(model)
    if found is None:
        return plan
    holds = field_holds(found[1], found[0], cg)
    key_of = {g: key for key, ids in classes.items() for g in ids}
    parent = {key: key for key in classes}

    def root(key: tuple) -> tuple:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for hold in holds.values():
        keys = [key_of[g] for g in sorted(hold.groups) if g in key_of]
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    merged: dict[tuple, list[tuple]] = {}
    for key in classes:
        merged.setdefault(root(key), []).append(key)
    width = {g.index: len(g.components) for g in cg.groups}
    coarse, unit_steps = _coarse(holds, width)
    for keys in merged.values():
        ids = [g for key in keys for g in classes[key]]
        names = sorted(a for a, h in holds.items() if h.groups & set(ids))
        whole = sorted({w for a in names for w in holds[a].whole} |
                       {coarse[g] for g in ids if g in coarse})
        new_key = keys[0]
        if len(keys) > 1:
            units = {g: width[g] // multiples.get(g, 1) for g in ids}
            base = min(units.values())
            if base > 0 and all(u % base == 0 for u in units.values()):
                new_key = ("fields", tuple(names))
                for key in keys:
                    plan.classes.pop(key)
                    plan.steps.pop(key)
                plan.classes[new_key] = ids
                plan.steps[new_key] = max(steps[key] for key in keys)
                for g in ids:
                    plan.multiples[g] = multiples.get(g, 1) * (units[g] // base)
                    if plan.multiples[g] == 1:
                        plan.multiples.pop(g)
            elif whole:  # cannot be equalised, but the whole-kept tie still holds
                for key in keys:
                    plan.whole[key] = whole
                    plan.fields[key] = names
                continue
        if names:
            plan.fields[new_key] = names
        if whole:
            plan.whole[new_key] = whole
        elif any(g in unit_steps for g in ids):  # counts the ratio field can write
            step = plan.steps[new_key]
            for g in (g for g in ids if g in unit_steps):
                m = plan.multiples.get(g, 1)
                step = math.lcm(step, unit_steps[g] // math.gcd(unit_steps[g], m))
            plan.steps[new_key] = step
            plan.ratio[new_key] = sorted(a for a in names if holds[a].groups & set(unit_steps))
    return plan


def _coarse(holds: dict[str, FieldHold], width: dict[int, int]
            ) -> tuple[dict[int, str], dict[int, int]]:
    """Groups every holding field of which is coarser than a unit (no head-count field,
    and :func:`~sparsify_fx.passes.shrink.config_probes.holds_width` false: ``expand = 2``
    sizing 128 units). Such a field is a ratio: it holds counts in steps of ``units /
    value`` (``expand = 1``: 64 units). Returns ``({group: why it stays whole}, {group:
    its unit step})``: whole when the units are no whole multiple of the value (or the
    step is all of them), else the step (the config search writes the field, a reload
    checks it)."""
    held: dict[int, list[str]] = {}
    for attr, hold in holds.items():
        for g in hold.groups:
            held.setdefault(g, []).append(attr)
    whole: dict[int, str] = {}
    steps: dict[int, int] = {}
    for g, attrs in held.items():
        if not all(a not in HEAD_FIELDS and not holds_width(holds[a].value, width[g])
                   for a in attrs):
            continue
        step = math.lcm(*(width[g] // holds[a].value if width[g] % holds[a].value == 0
                          else width[g] for a in attrs))
        if step < width[g]:
            steps[g] = step
        else:
            whole[g] = "; ".join(f"{a} = {holds[a].value} cannot hold {width[g]} units"
                                 for a in attrs)
    return whole, steps


__all__ = ["HEAD_FIELDS", "FieldHold", "UniformPlan", "field_holds", "source_config_model", "uniform_plan"]
