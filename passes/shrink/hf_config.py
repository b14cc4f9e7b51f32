"""What a Hugging Face ``config`` can describe of a shrunk model (read by
:mod:`sparsify_fx.passes.shrink.to_source`).

* :func:`config_cannot_hold`: the channel groups whose shrunk width no config field
  holds (a pooler; heads of a model deriving ``head_dim = hidden / heads``), to keep
  whole when the model must round-trip through ``save_pretrained``;
* :func:`update_config`: uniform per-layer widths written into the model's config,
  kept only when the class built from it (on the meta device) has the shrunk shapes;
* :func:`layer_configs`: with ragged widths, each shrunk block that holds the shared
  config gets its own copy with its widths (code such as Phi-3's attention reads
  ``self.config.num_attention_heads`` in ``forward``);
* :func:`config_gaps`: the parameters whose shrunk shape the saved config would not
  rebuild, each with the config field that cannot hold it (``shrink`` records them on
  the shrunk model; ``safe_save`` and the shrunk model's ``save_pretrained`` refuse to
  write a folder that would not reload).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

from torch import nn

from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask_index import main_graph, unwrap
from sparsify_fx.passes.stored_analysis import channel_graph_of
from sparsify_fx.passes.shrink.config_search import (MAX_CHOICES, BlockSearch, changes_one_dim,
                                                   class_shapes, saved_form)


def _attr(config: Any, name: str) -> Any:
    """``config.name``, None when absent or refused (a per-layer field of a heterogeneous
    config raises on global access: no global value describes it)."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001
        return None


def _has(config: Any, name: str) -> bool:
    try:
        return hasattr(config, name)
    except Exception:  # noqa: BLE001
        return False


def scale_width(value: int, kept: int, total: int) -> int:
    """``value x kept / total``; ShrinkError unless it is a whole number."""
    if total == 0 or (value * kept) % total:
        raise ShrinkError(f"cannot scale a width attribute {value} by {kept}/{total}")
    return value * kept // total


def holds_width(value: int | float, width: int) -> bool:
    """Whether a config field of ``value`` can hold a group of ``width`` units at any kept
    count: the field is the width, half of it (a fused gate/up of ``2 x value``), a whole
    multiple of it (an MLP built with ``value // 2`` units), or a float ratio (set to
    ``value x kept / total``; the config search and its reload check decide). An integer
    field coarser than a unit (``expansion_ratio x hidden`` units) cannot."""
    return isinstance(value, float) or width in (value, 2 * value) or \
        (width > 0 and value % width == 0)


def _uniform(blocks: dict[str, dict]) -> bool:
    """Every attention block keeps the same widths, and every MLP block."""
    for kind in ("attention", "mlp"):
        group = [b for b in blocks.values() if b["_kind"] == kind]
        if len({(b["_kept"], b["_total"], b["_kv_kept"]) for b in group}) > 1:
            return False
    return True


def config_cannot_hold(model: nn.Module) -> list[str]:
    """Producer weights of the channel groups a Hugging Face config cannot describe once
    shrunk: attention whose heads the config cannot hold at the same ``head_dim`` and no
    field of their own holds, and other groups whose width no config field holds (found by
    building the class from a config with that field halved: a field holds a group when
    the group's weights and its readers', and only MLP weights, change shape; a pooler,
    a classifier's hidden layer hold none). Empty for a model without an HF config. Read-only."""
    gm = main_graph(model)
    source = unwrap(model).__dict__.get("source_module")
    found = _config_owner(source) if source is not None else None
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
    out.update(_inner_widths(config))
    return out


def _config_owner(src: nn.Module) -> tuple[str, nn.Module] | None:
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
    heads, hidden = _attr(config, "num_attention_heads"), _attr(config, "hidden_size")
    kv = _attr(config, "num_key_value_heads") or heads
    trial = copy.deepcopy(config)
    if not isinstance(getattr(type(config), "head_dim", None), property):  # Falcon derives it
        trial.head_dim = _attr(config, "head_dim") or hidden // heads
    trial.num_attention_heads = heads - heads // kv
    if _has(config, "num_key_value_heads"):
        trial.num_key_value_heads = kv - 1
    return trial


def _config_holds_fewer_heads(hf_model: nn.Module) -> bool:
    """Whether the config can describe one KV group fewer at the same ``head_dim``: the
    class built from it has smaller query projections (models that derive ``head_dim``
    from ``hidden_size / heads``, such as BERT or GPT-2, cannot)."""
    config = hf_model.config
    heads = _attr(config, "num_attention_heads")
    hidden = _attr(config, "hidden_size")
    if not isinstance(heads, int) or not isinstance(hidden, int) or heads < 2:
        return False
    kv = _attr(config, "num_key_value_heads") or heads
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


def update_config(src: nn.Module, blocks: dict[str, dict],
                  reloads: Callable[[Any], bool] | None = None) -> bool:
    """Write uniform per-layer widths into the HF ``config`` (in place, so every module
    sharing it sees them) when the class built from the new config has the shrunk
    shapes; False (config untouched) when ragged or not buildable.

    A block the named rules (head counts, MLP width fields) do not describe gets the
    fields a :class:`~sparsify_fx.passes.shrink.config_search.BlockSearch` finds, kept
    only when ``reloads(config)`` says the class built from that config with the shrunk
    weights computes what the shrunk model does (without ``reloads``: not kept)."""
    # the model's own config, or that of the first submodule holding one (a wrapper's model)
    found = _config_owner(src)
    if found is None or not blocks:
        return found is None and bool(blocks) and _uniform(blocks)
    hf_path, hf_model = found
    config = hf_model.config
    widths = _mlp_fields_of(hf_path, hf_model, blocks)
    search = BlockSearch(hf_model, hf_path, blocks, halved_fields)
    for choice in range(MAX_CHOICES):
        fields, searched = search.assign(lambda block: _block_fields(config, block, widths),
                                         choice)
        if fields is None or not search.describes(fields):
            return False  # ragged, or the class cannot be rebuilt from it
        trial = saved_form(config, fields)
        if trial is None or searched and (reloads is None or not reloads(trial)):
            continue  # shapes agree, the computation does not: the next candidate
        before = config.to_dict()
        for attr, value in trial.to_dict().items():  # with the widths a ratio recomputes
            if attr in fields:
                setattr(config, attr, fields[attr])
            elif before.get(attr, value) != value:
                setattr(config, attr, getattr(trial, attr))
        return True
    return False


def _inner_widths(config: Any) -> dict[str, int]:
    """The config's MLP width fields and their values (an unset ``n_inner`` means four
    times ``n_embd``, GPT-2's, or ``hidden_size``, CLVP's decoder's: the probes keep it
    only where setting it reshapes the MLP)."""
    out = {}
    for attr in ("intermediate_size", "n_inner"):
        value = _attr(config, attr)
        hidden = _attr(config, "n_embd") or _attr(config, "hidden_size")
        if attr == "n_inner" and value is None and _has(config, "n_inner") and \
                isinstance(hidden, int):
            value = 4 * hidden
        if isinstance(value, int):
            out[attr] = value
    return out


def _mlp_fields_of(path: str, hf_model: nn.Module, blocks: dict[str, dict]) -> dict[str, tuple]:
    """:func:`mlp_fields` for the MLP blocks of a shrink (none when no MLP shrank)."""
    mlp = [b for b in blocks.values() if b["_kind"] == "mlp"]
    if all(b["_kept"] == b["_total"] for b in mlp):
        return {}
    owners = {_owner(_owner(w)) for b in mlp for w in b.get("_weights", ())}
    return mlp_fields(hf_model, path, owners)


def _block_fields(config: Any, block: dict, widths: dict[str, tuple]) -> dict[str, int]:
    """The config fields (and values) one shrunk block's widths give; empty when the
    config has no field for that kind of block (``widths``: :func:`mlp_fields`)."""
    out: dict[str, int] = {}
    if block["_kind"] == "attention":
        heads = _attr(config, "num_attention_heads")
        if not isinstance(heads, int):
            return out
        hidden = _attr(config, "hidden_size")
        head_dim = _attr(config, "head_dim") or (hidden // heads if hidden else None)
        if head_dim and not isinstance(getattr(type(config), "head_dim", None), property):
            out["head_dim"] = int(head_dim)  # pinned, unless the class derives it (Falcon)
        out["num_attention_heads"] = scale_width(heads, block["_kept"], block["_total"])
        if _has(config, "num_key_value_heads"):  # unset (None): as many as query heads
            kv = _attr(config, "num_key_value_heads") or heads
            out["num_key_value_heads"] = scale_width(kv, block["_kv_kept"], block["_kv_total"])
        return out
    # only a field holding this group's width (or a fused multiple) describes it: a
    # pooler is no MLP
    return {attr: scale_width(value, block["_kept"], block["_total"])
            for attr, value in _holding(block, widths).items()}


def _holding(block: dict, widths: dict[str, tuple]) -> dict[str, int]:
    """The MLP width fields whose change reshapes this block's producers, at a value its
    width is (or a fused gate/up of 2 x value); integers only (a float ratio: the search)."""
    producers = set(block.get("_producers", ()))
    return {attr: value for attr, (value, changed) in widths.items() if producers and
            producers <= changed and isinstance(value, int) and holds_width(value, block["_total"])}


def layer_configs(src: nn.Module, blocks: dict[str, dict]) -> None:
    """Give every shrunk block's modules that hold the model's shared HF config a copy
    with that block's widths (ragged widths: one config cannot hold them). Mutates
    ``src``; the top-level config stays as it was."""
    found = _config_owner(src)
    if found is None:
        return
    shared = found[1].config
    widths = _mlp_fields_of(found[0], found[1], blocks)
    for key, block in blocks.items():
        path = block.get("_path", key)
        if block["_kept"] == block["_total"] and block["_kv_kept"] == block["_kv_total"]:
            continue  # this block kept its widths: the shared config describes it
        try:
            fields = _block_fields(shared, block, widths)
        except ShrinkError:
            continue  # no whole field value: the block's own attributes (checked after)
        root = src.get_submodule(path) if path else src
        own = None
        for _, module in root.named_modules():
            if getattr(module, "config", None) is shared:
                if own is None:
                    own = copy.deepcopy(shared)
                    for attr, value in fields.items():
                        setattr(own, attr, value)
                module.config = own


def _fields_of(config: Any, block: dict | None) -> str:
    """The config field(s) meant to hold a block's widths, for messages."""
    if block is None:
        return "no config field (a width the config does not store)"
    if block["_kind"] == "attention":
        names = [a for a in ("num_attention_heads", "num_key_value_heads", "head_dim")
                 if _has(config, a)]
        return ", ".join(f"`{a}`" for a in names) or "no attention field"
    names = [a for a, v in _inner_widths(config).items() if v and block["_total"] % v == 0]
    return ", ".join(f"`{a}`" for a in names) or \
        f"no config field (its {block['_total']} units are no MLP width the config stores)"


def config_gaps(src: nn.Module, blocks: dict[str, dict] | None = None) -> list[str]:
    """Parameters of ``src`` (a model holding an HF config) whose shape its class, built
    from that config as a saved folder gives it back (``from_dict(to_dict())``), would
    not have (so ``from_pretrained`` of a saved folder fails),
    each as ``"name (shape; the config builds shape) held by <field>"``; ``blocks``: the
    shrunk blocks (``{path: widths}``) naming the field. Empty without an HF config.
    Read-only."""
    found = _config_owner(src)
    if found is None:
        return []
    prefix, hf_model = found
    config = hf_model.config
    try:  # as from_pretrained reads it: a field recomputed at init (Mamba's
        # intermediate_size from expand) takes its recomputed value
        config = type(config).from_dict(config.to_dict())
    except Exception as exc:  # noqa: BLE001  a saved config.json that does not load
        return [f"the saved config of {type(hf_model).__name__} does not load ({exc})"]
    built = class_shapes(hf_model, config)
    if built is None:
        return [f"{type(hf_model).__name__}(config) refuses its own config"]
    gaps = []
    for name, tensor in hf_model.state_dict().items():
        want = built.get(name)
        if want is None or want == tuple(tensor.shape):
            continue
        full = f"{prefix}.{name}" if prefix else name
        block = max(((b.get("_path", p), b) for p, b in (blocks or {}).items()
                     if full.startswith(b.get("_path", p) + ".") or not b.get("_path", p)),
                    key=lambda pb: len(pb[0]), default=(None, None))[1]
        gaps.append(f"{full} {tuple(tensor.shape)} (the saved config builds {want}; "
                    f"held by {_fields_of(hf_model.config, block)})")
    return gaps


GAPS_ATTRIBUTE = "sparsify_config_gaps"


def unsaveable(model: nn.Module | str, gaps: list[str]) -> ShrinkError:
    """The error refusing to save ``model`` (or a class name) whose config cannot hold
    ``gaps``."""
    name = model if isinstance(model, str) else type(model).__name__
    more = f" (and {len(gaps) - 1} more)" if len(gaps) > 1 else ""
    return ShrinkError(
        f"save_pretrained of this shrunk {name} would write a folder that "
        f"from_pretrained cannot load: {gaps[0]}{more}; nothing was written. Cut with one "
        "width per kind of layer (apply_budget(gm, ..., uniform=True)) or keep the groups "
        "the config cannot describe whole (transform(model, ..., "
        "exclude=config_cannot_hold(gm))), then shrink again")


class RefuseSave:
    """A shrunk model's ``save_pretrained`` when its config cannot describe it: raises
    :func:`unsaveable` before anything is written (picklable: holds no model)."""

    def __init__(self, name: str, gaps: list[str]) -> None:
        self.name, self.gaps = name, list(gaps)

    def __call__(self, *_args: Any, **_kwargs: Any) -> None:
        raise unsaveable(self.name, self.gaps)


def record_gaps(src: nn.Module, blocks: dict[str, dict]) -> list[str]:
    """Record on ``src`` (``src.sparsify_config_gaps``) whether its config describes it;
    when it does not, its ``save_pretrained`` raises :func:`unsaveable` before writing.
    Mutates ``src``."""
    gaps = config_gaps(src, blocks)
    src.__dict__[GAPS_ATTRIBUTE] = gaps
    if gaps and callable(getattr(src, "save_pretrained", None)):
        src.__dict__["save_pretrained"] = RefuseSave(type(src).__name__, gaps)
    return gaps


#: public name of the config probe read by :mod:`sparsify_fx.passes.shrink.uniform_fields`
#: (with :func:`halved_fields`): the first module holding an HF config
config_owner = _config_owner

__all__ = ["config_cannot_hold", "update_config", "layer_configs", "scale_width",
           "config_gaps", "record_gaps", "unsaveable", "RefuseSave", "GAPS_ATTRIBUTE",
           "config_owner", "halved_fields"]
