"""Probes of a Hugging Face config (read-only): which config fields size which weights,
found by building the model's class on the meta device from a copy of its config with
one field changed (:func:`halved_fields`, :func:`mlp_fields`; one KV group of heads
fewer at the same ``head_dim``), and what they cannot hold (:func:`config_cannot_hold`:
the channel groups whose shrunk width no field holds, to keep whole with
``transform(..., exclude=config_cannot_hold(gm))`` when the model must round-trip
through ``save_pretrained``). :mod:`~sparsify_fx.passes.shrink.hf_config` writes the
widths into the config from these probes.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

from torch import nn

from sparsify_fx.mask_index import main_graph, unwrap
from sparsify_fx.passes.shrink.config_search import changes_one_dim, class_shapes, saved_form
from sparsify_fx.passes.stored_analysis import channel_graph_of


def config_attr(config: Any, name: str) -> Any:
    """``config.name``, None when absent or refused (a per-layer field of a heterogeneous
    config raises on global access: no global value describes it)."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001
        return None


def config_has(config: Any, name: str) -> bool:
    try:
        return hasattr(config, name)
    except Exception:  # noqa: BLE001
        return False


def holds_width(value: int | float, width: int) -> bool:
    """Whether a config field of ``value`` can hold a group of ``width`` units at any kept
    count: the field is the width, half of it (a fused gate/up of ``2 x value``), a whole
    multiple of it (an MLP built with ``value // 2`` units), or a float ratio (set to
    ``value x kept / total``; the config search and its reload check decide). An integer
    field coarser than a unit (``expansion_ratio x hidden`` units) cannot."""
    return isinstance(value, float) or width in (value, 2 * value) or \
        (width > 0 and value % width == 0)


def config_cannot_hold(model: nn.Module) -> list[str]:
    """Producer weights of the channel groups a Hugging Face config cannot describe once
    shrunk: attention whose heads the config cannot hold at the same ``head_dim`` and no
    field of their own holds, and other groups whose width no config field holds (found by
    building the class from a config with that field halved: a field holds a group when
    the group's weights and its readers', and only MLP weights, change shape; a pooler,
    a classifier's hidden layer hold none). Empty for a model without an HF config. Read-only."""
    gm = main_graph(model)
    source = unwrap(model).__dict__.get("source_module")
    found = config_owner(source) if source is not None else None
    if gm is None or found is None:
        return []
    path, hf_model = found
    cg = channel_graph_of(gm)
    attention = {int(g) for p in cg.producers.values() if p.kind == "attention_matmul"
                 for g in cg.slots(p.out_ids)[0] if g >= 0}
    heads = _fewer_heads_changes(hf_model, path)
    owners = {_owner(_owner(w)) for g in cg.groups for w in _group_weights(cg, g, consumers=True)}
    fields = mlp_fields(hf_model, path, owners)
    out = []
    for group in cg.groups:
        mine, both = set(_group_weights(cg, group)), set(_group_weights(cg, group, consumers=True))
        both |= _sliced_params(cg, group)  # a position table sliced with it must follow too
        width = len(group.components)
        # a field holds a group only when its readers change with it (a bottleneck whose
        # readers' input width another field sets is held by none); heads also by their
        # own count field (a linear attention's ``linear_num_heads``)
        holds = any(both <= changed and holds_width(value, width)
                    for value, changed in fields.values()) or (
            group.index in attention and heads is not None and both <= heads)
        if not holds:
            out += sorted(mine)
    return sorted(set(out))


def _sliced_params(cg: Any, group: Any) -> set[str]:
    """Parameters read element by element that shrink slices with ``group`` (a per-head
    bias table, a position table added to its channels: sites with a ``dim``)."""
    return {p for site in cg.norms.values() if site.dim is not None and site.params
            and (cg.slots(site.ids)[0] == group.index).any() for p in site.params if p}


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _group_weights(cg: Any, group: Any, consumers: bool = False) -> list[str]:
    """Weights of a group's producers (and, with ``consumers``, of the layers reading it)."""
    out = [cg.producers[p].weight for p in group.producers
           if cg.producers[p].kind in ("linear", "conv", "experts")]
    if consumers:
        out += [p.weight for p in cg.producers.values() if p.kind in ("linear", "conv", "experts")
                and p.in_ids is not None and group.index in set(cg.slots(p.in_ids)[0].tolist())]
    return out


def mlp_fields(hf_model: nn.Module, prefix: str, owners: set[str]) -> dict[str, tuple]:
    """Config fields holding an MLP width: ``{field: (value, changed weights)}`` for every
    integer field whose halving makes the class (built on the meta device) change the
    shape of weights only under ``owners`` (the modules holding the MLP producers and
    their consumers, with their per-unit parameters; ``prefix``: ``hf_model``'s path),
    each along one dimension (a unit width). Field names are whatever the
    config calls them (``intermediate_size``, ``decoder_ffn_dim``, ``n_inner`` ...)."""
    out = {}
    for attr, value, dense, small in halved_fields(hf_model):
        changed = {f"{prefix}.{k}" if prefix else k for k, v in dense.items() if small.get(k) != v}
        if not all(changes_one_dim(v, small.get(k)) for k, v in dense.items() if small.get(k) != v):
            continue  # a weight changing in and out width (a pooler's square dense): no unit width
        if changed and all(any(_owner(c) == o or _owner(c).startswith(o + ".") for o in owners)
                           for c in changed):
            out[attr] = (value, frozenset(changed))
    return out


def _int_fields(config: Any) -> dict[str, int | float]:
    """The config's integer fields (>= 2), GPT-2's unset ``n_inner`` as four times ``n_embd``,
    and its positive float fields (a ratio: ``width = round_up(hidden x ratio, multiple)``)."""
    out = {k: v for k, v in config.to_dict().items() if not isinstance(v, bool) and (
        isinstance(v, int) and v >= 2 or isinstance(v, float) and v > 0)}
    out.update(inner_widths(config))
    return out


def config_owner(src: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of the first module holding a Hugging Face config."""
    return next(((p, m) for p, m in src.named_modules()
                 if hasattr(getattr(m, "config", None), "to_dict")), None)


def halved_fields(hf_model: nn.Module
                  ) -> Iterator[tuple[str, int | float, dict[str, tuple], dict[str, tuple]]]:
    """``(field, value, dense shapes, shapes with the field halved)`` for every integer
    or float field of ``hf_model.config`` the class accepts at half its value (parameter shapes by
    name, the class built on the meta device once per field, from the config as a saved
    folder gives it back: a width recomputed from a ratio at init is no field, the ratio
    is). Reads ``hf_model`` only."""
    config = hf_model.config
    dense = class_shapes(hf_model, config)
    if dense is None:
        return
    for attr, value in _int_fields(config).items():
        trial = saved_form(config, {attr: value / 2 if isinstance(value, float) else value // 2})
        if trial is None:  # a field the config refuses to change
            continue
        small = class_shapes(hf_model, trial)
        if small is not None:
            yield attr, value, dense, small


def _fewer_heads_changes(hf_model: nn.Module, prefix: str) -> frozenset[str] | None:
    """The weights (full names, ``prefix``: ``hf_model``'s path) whose shape changes when
    the config describes one KV group fewer at the same ``head_dim``, each losing exactly
    one group of heads; None when it cannot (models that derive ``head_dim`` from
    ``hidden_size / heads``, such as BERT or GPT-2). An attention group is held only when
    all its weights are among them: an output projection built ``hidden x hidden``
    (whatever the heads) does not follow the heads."""
    if not _config_holds_fewer_heads(hf_model):
        return None
    config = hf_model.config
    dense, small = class_shapes(hf_model, config), class_shapes(hf_model, _fewer_heads_config(config))
    return frozenset(f"{prefix}.{k}" if prefix else k for k in dense if small.get(k) != dense[k])


def _fewer_heads_config(config: Any) -> Any:
    """A copy of ``config`` with one KV group of heads fewer, ``head_dim`` pinned."""
    heads, hidden = config_attr(config, "num_attention_heads"), config_attr(config, "hidden_size")
    kv = config_attr(config, "num_key_value_heads") or heads
    trial = copy.deepcopy(config)
    if not isinstance(getattr(type(config), "head_dim", None), property):  # Falcon derives it
        trial.head_dim = config_attr(config, "head_dim") or hidden // heads
    trial.num_attention_heads = heads - heads // kv
    if config_has(config, "num_key_value_heads"):
        trial.num_key_value_heads = kv - 1
    return trial


def _config_holds_fewer_heads(hf_model: nn.Module) -> bool:
    """Whether the config can describe one KV group fewer at the same ``head_dim``: the
    class built from it has smaller query projections (models that derive ``head_dim``
    from ``hidden_size / heads``, such as BERT or GPT-2, cannot)."""
    config = hf_model.config
    heads = config_attr(config, "num_attention_heads")
    hidden = config_attr(config, "hidden_size")
    if not isinstance(heads, int) or not isinstance(hidden, int) or heads < 2:
        return False
    kv = config_attr(config, "num_key_value_heads") or heads
    dense, small = class_shapes(hf_model, config), class_shapes(hf_model, _fewer_heads_config(config))
    if dense is None or small is None:
        return False
    shrunk = [k for k in dense if small.get(k) != dense[k]]
    # each changed dim must lose exactly one KV group of heads (q, o: heads // kv of
    # ``heads``; k, v: one of ``kv``); BERT-like classes re-derive head_dim instead
    ratios = {(heads - heads // kv, heads), (kv - 1, kv)}
    return bool(shrunk) and all(
        len(small.get(k, ())) == len(dense[k]) and all(
            a == b or any(b * num == a * den for num, den in ratios)
            for a, b in zip(small[k], dense[k])) for k in shrunk)


def inner_widths(config: Any) -> dict[str, int]:
    """The config's MLP width fields and their values (an unset ``n_inner`` means four
    times ``n_embd``, GPT-2's, or ``hidden_size``, CLVP's decoder's: the probes keep it
    only where setting it reshapes the MLP)."""
    out = {}
    for attr in ("intermediate_size", "n_inner"):
        value = config_attr(config, attr)
        hidden = config_attr(config, "n_embd") or config_attr(config, "hidden_size")
        if attr == "n_inner" and value is None and config_has(config, "n_inner") and \
                isinstance(hidden, int):
            value = 4 * hidden
        if isinstance(value, int):
            out[attr] = value
    return out


__all__ = ["config_attr", "config_has", "config_cannot_hold", "config_owner", "halved_fields",
           "holds_width", "inner_widths", "mlp_fields"]
