"""What a Hugging Face ``config`` can describe of a shrunk model (read by
:mod:`sparsify_fx.passes.shrink.to_source`).

* :func:`~sparsify_fx.passes.shrink.config_probes.config_cannot_hold` (re-exported
  here): the channel groups whose shrunk width no config field holds (a pooler; heads
  of a model deriving ``head_dim = hidden / heads``), to keep whole when the model must
  round-trip through ``save_pretrained``; it and the field probes live in
  :mod:`~sparsify_fx.passes.shrink.config_probes`;
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
from typing import Any, Callable

from torch import nn

from sparsify_fx.errors import ShrinkError
from sparsify_fx.passes.shrink.config_probes import (config_attr, config_cannot_hold, config_has,
                                                     config_owner, halved_fields, holds_width,
                                                     inner_widths, mlp_fields)
from sparsify_fx.passes.shrink.config_search import MAX_CHOICES, BlockSearch, class_shapes, saved_form


def scale_width(value: int, kept: int, total: int) -> int:
    """``value x kept / total``; ShrinkError unless it is a whole number."""
    if total == 0 or (value * kept) % total:
        raise ShrinkError(f"cannot scale a width attribute {value} by {kept}/{total}")
    return value * kept // total


def _uniform(blocks: dict[str, dict]) -> bool:
    """Every attention block keeps the same widths, and every MLP block."""
    for kind in ("attention", "mlp"):
        group = [b for b in blocks.values() if b["_kind"] == kind]
        if len({(b["_kept"], b["_total"], b["_kv_kept"]) for b in group}) > 1:
            return False
    return True


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
    found = config_owner(src)
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


def _mlp_fields_of(path: str, hf_model: nn.Module, blocks: dict[str, dict]) -> dict[str, tuple]:
    """:func:`mlp_fields` for the MLP blocks of a shrink (none when no MLP shrank)."""
    mlp = [b for b in blocks.values() if b["_kind"] == "mlp"]
    if all(b["_kept"] == b["_total"] for b in mlp):
        return {}
    owners = {w.rsplit(".", 2)[0] for b in mlp for w in b.get("_weights", ())}  # above each weight's module
    return mlp_fields(hf_model, path, owners)


def _block_fields(config: Any, block: dict, widths: dict[str, tuple]) -> dict[str, int]:
    """The config fields (and values) one shrunk block's widths give; empty when the
    config has no field for that kind of block (``widths``: :func:`mlp_fields`)."""
    out: dict[str, int] = {}
    if block["_kind"] == "attention":
        heads = config_attr(config, "num_attention_heads")
        if not isinstance(heads, int):
            return out
        hidden = config_attr(config, "hidden_size")
        head_dim = config_attr(config, "head_dim") or (hidden // heads if hidden else None)
        if head_dim and not isinstance(getattr(type(config), "head_dim", None), property):
            out["head_dim"] = int(head_dim)  # pinned, unless the class derives it (Falcon)
        out["num_attention_heads"] = scale_width(heads, block["_kept"], block["_total"])
        if config_has(config, "num_key_value_heads"):  # unset (None): as many as query heads
            kv = config_attr(config, "num_key_value_heads") or heads
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
    found = config_owner(src)
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
                 if config_has(config, a)]
        return ", ".join(f"`{a}`" for a in names) or "no attention field"
    names = [a for a, v in inner_widths(config).items() if v and block["_total"] % v == 0]
    return ", ".join(f"`{a}`" for a in names) or \
        f"no config field (its {block['_total']} units are no MLP width the config stores)"


def config_gaps(src: nn.Module, blocks: dict[str, dict] | None = None) -> list[str]:
    """Parameters of ``src`` (a model holding an HF config) whose shape its class, built
    from that config as a saved folder gives it back (``from_dict(to_dict())``), would
    not have (so ``from_pretrained`` of a saved folder fails),
    each as ``"name (shape; the config builds shape) held by <field>"``; ``blocks``: the
    shrunk blocks (``{path: widths}``) naming the field. Empty without an HF config.
    Read-only."""
    found = config_owner(src)
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


__all__ = ["config_cannot_hold", "update_config", "layer_configs", "scale_width",
           "config_gaps", "record_gaps", "unsaveable", "RefuseSave", "GAPS_ATTRIBUTE",
           "config_owner", "halved_fields"]
