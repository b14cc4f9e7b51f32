"""Shrink a torch.export capture back into its *source* class (read-only on the input).

``shrink_to_source(model, plan)``: ``model`` is a channel-coupled
:class:`~sparsify_fx.capture.exported_module.ExportedModule` (it keeps the module it
was captured from as ``source_module``, tensors shared), ``plan`` the
:class:`~sparsify_fx.passes.shrink.shrink_graph.ShrinkPlan` of its train graph. Returns a deep
copy of the source module (e.g. a smaller ``LlamaForCausalLM``, so ``forward``,
``generate()`` and ``save_pretrained`` are the class's own) where

* every parameter holds the folded value of the capture (masks multiplied in);
* each producer keeps its kept output rows (weight and bias) and every consumer its
  kept input columns: ``(out, in)`` weights (Linear, Conv) and ``(in, out)`` weights
  (HF ``Conv1D``); the owner's shape attributes follow (``in_features`` /
  ``out_features``, ``nf``, ``in_channels`` / ``out_channels`` / ``groups``);
* the module that owns a channel group's producers gets its width attributes
  scaled by what the group kept, for the attribute names of :data:`HEAD_ATTRS`,
  :data:`KV_HEAD_ATTRS`, :data:`WIDTH_ATTRS`, :data:`UNIT_ATTRS` (Hugging Face
  conventions; models that reshape with ``-1`` heads need none);
* a Hugging Face ``config`` is updated (``num_attention_heads``,
  ``num_key_value_heads``, ``intermediate_size``, ``head_dim`` pinned) only when every
  layer kept the same widths, so ``save_pretrained`` / ``from_pretrained``
  round-trip; with ragged widths the top-level config stays as it was and each shrunk
  block holding it gets its own copy with its widths (code that reads
  ``self.config.num_attention_heads`` in ``forward`` runs); see
  :mod:`sparsify_fx.passes.shrink.hf_config` and docs/transformers.md.

The result is checked against the hard-masked capture on the capture's example
inputs; a difference raises :class:`ShrinkError` (never a silent wrong shrink).
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask_index import main_graph, unwrap

from sparsify_fx.passes.aten.values import channel_dim
from sparsify_fx.passes.channels.graph_types import ChannelGraph, Producer
from sparsify_fx.passes.shrink.config_search import split_by_layer
from sparsify_fx.passes.shrink.experts import pad_expert_units, slice_experts
from sparsify_fx.passes.shrink.source_check import (cannot_hold_error, check_against_capture,
                                                   failing_groups, reload_check, retry_widths)
from sparsify_fx.passes.shrink.hf_config import (config_cannot_hold, layer_configs, record_gaps,
                                               scale_width, update_config)
from sparsify_fx.passes.shrink.split_widths import split_piece_widths
from sparsify_fx.passes.stored_analysis import channel_graph_of

#: attributes holding a head count (scaled by the kept fraction of query rows)
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
#: attributes holding a key/value head count (scaled by the kept fraction of key rows)
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
#: attributes holding heads x head_dim (scaled like the query rows)
WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim")
#: attributes holding an MLP's unit count
UNIT_ATTRS = ("intermediate_size",)
#: an owner attribute equal to a group's unit count (or twice it: value heads per key
#: head) is tried as a count of those units when the shrunk model does not run
COUNT_MULTIPLES = (1, 2)
#: submodules of a group's owner whose attributes are tried too
MAX_INNER_OWNERS = 16


def _owner_path(name: str) -> str:
    return name.rpartition(".")[0]


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner = model.get_submodule(_owner_path(name))
    attr = name.rpartition(".")[2]
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:  # a non-persistent buffer (rotary inv_freq) stays out of the state dict
        owner.register_buffer(attr, value.contiguous(),
                              persistent=attr not in owner._non_persistent_buffers_set)


def _sync_shape_attrs(owner: nn.Module, prod: Producer, w: torch.Tensor, groups: int) -> None:
    out_ch, in_ch = (w.shape[1], w.shape[0]) if prod.weight_layout == "io" else w.shape[:2]
    if prod.kind == "linear":
        for attr, value in (("out_features", out_ch), ("in_features", in_ch), ("nf", out_ch)):
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, int(value))
        return
    for attr, value in (("out_channels", out_ch), ("in_channels", in_ch * groups),
                        ("groups", groups)):
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, int(value))


def _slice_producers(src: nn.Module, cg: ChannelGraph, keep_id: np.ndarray) -> dict[str, tuple]:
    """Slice every producer's weight/bias in ``src`` (mutates ``src``); returns per weight
    ``(kept out, total out)``."""
    done: dict[str, tuple] = {}
    for prod in cg.producers.values():
        slice_experts(src, prod, keep_id, done)  # fused 3-D expert weights
        if prod.kind not in ("linear", "conv") or prod.weight in done:
            continue
        out_keep = torch.from_numpy(keep_id[prod.out_ids])
        in_keep = torch.from_numpy(keep_id[prod.in_ids]) if prod.in_ids is not None else None
        done[prod.weight] = (int(out_keep.sum()), len(out_keep))
        if bool(out_keep.all()) and (in_keep is None or bool(in_keep.all())):
            continue
        w = src.get_parameter(prod.weight).detach()
        groups = prod.groups
        if prod.weight_layout == "io":
            w = w[:, out_keep] if in_keep is None else w[in_keep][:, out_keep]
        elif groups == 1:
            w = w[out_keep] if in_keep is None else w[out_keep][:, in_keep]
        else:
            per_group = out_keep.reshape(groups, -1)
            if not bool((per_group.all(1) | ~per_group.any(1)).all()):
                raise ShrinkError(f"{prod.weight}: grouped conv would lose part of a conv group")
            groups = int(per_group.all(1).sum())
            w = w[out_keep]
        _set_tensor(src, prod.weight, w)
        if prod.bias is not None:
            _set_tensor(src, prod.bias, src.get_parameter(prod.bias).detach()[out_keep])
        _sync_shape_attrs(src.get_submodule(_owner_path(prod.weight)), prod, w, groups)
    return done


def _slice_norms(src: nn.Module, cg: ChannelGraph, keep_id: np.ndarray) -> None:
    """Slice every ATen batch norm's weight, bias and running statistics, and every
    per-channel parameter, along its dim of the channels (its first dim over 1; mutates
    ``src``)."""
    done: set[str] = set()  # a parameter read at several sites (a loop) is sliced once
    for norm in cg.norms.values():
        keep = torch.from_numpy(keep_id[norm.ids])
        if not norm.params or bool(keep.all()):
            continue
        for name in norm.params:
            if name is not None and name not in done:
                done.add(name)
                value = src.get_parameter(name).detach() if name in dict(
                    src.named_parameters()) else src.get_buffer(name)
                along = channel_dim(value.shape) if norm.dim is None else norm.dim
                _set_tensor(src, name, value[(slice(None),) * along + (keep,)])
        owner = src.get_submodule(norm.module) if norm.module else src
        if isinstance(getattr(owner, "num_features", None), int):
            owner.num_features = int(keep.sum())
        if isinstance(owner, nn.Embedding) and norm.dim == 1:  # a table's columns
            owner.embedding_dim = int(keep.sum())


def _sync_block_attrs(src: nn.Module, cg: ChannelGraph, widths: dict[str, tuple],
                      keep_id: np.ndarray | None = None,
                      splits: dict[str, list[tuple[int, int]]] | None = None) -> dict:
    """Scale the width attributes of each group's owner module; returns per owner path
    (``path#group`` for a second group of one owner, ``_path`` the path)
    ``{attr: new value}`` (also the per-layer widths a uniform config needs)."""
    changed: dict[str, dict[str, int]] = {}
    attention_groups = {int(g) for p in cg.producers.values() if p.kind == "attention_matmul"
                        for g in cg.slots(p.out_ids)[0] if g >= 0}
    for group in cg.groups:
        weights = [cg.producers[p].weight for p in group.producers
                   if cg.producers[p].kind in ("linear", "conv", "experts")]
        if not weights:
            continue
        sizes = sorted((widths[w] for w in weights), key=lambda kt: kt[1])
        (kv_kept, kv_total), (q_kept, q_total) = sizes[0], sizes[-1]
        consumers = [p.weight for p in cg.producers.values() if p.kind in ("linear", "conv", "experts")
                     and p.in_ids is not None and group.index in set(cg.slots(p.in_ids)[0].tolist())]
        path = top = _common_prefix([_owner_path(w) for w in weights + consumers])
        owners, inner, tops = [], [], []
        for part in split_by_layer(top, weights + consumers):  # a group tied across layers,
            # each layer's owners scaled as a group of that layer alone
            mine = [w for w in weights if w in part]
            part_top = _common_prefix([_owner_path(w) for w in part])
            low = _common_prefix([_owner_path(w) for w in mine])
            if low in {_owner_path(w) for w in mine}:  # one projection: its owner holds it
                low = low.rpartition(".")[0] if len(low) > len(part_top) else low
            owners += [part_top] + [low[:i] for i in range(len(part_top) + 1, len(low) + 1)
                                    if i == len(low) or low[i] == "."]
            inner += _inner_owners(src, part_top)
            tops.append(part_top)
        inner = list(dict.fromkeys(inner))
        new: dict[str, int] = {}
        for owner_path in dict.fromkeys(owners):
            owner = src.get_submodule(owner_path) if owner_path else src
            for attrs, kept, total in ((HEAD_ATTRS, q_kept, q_total),
                                       (WIDTH_ATTRS, q_kept, q_total),
                                       (KV_HEAD_ATTRS, kv_kept, kv_total),
                                       (UNIT_ATTRS, q_kept, q_total)):
                for attr in attrs:
                    value = getattr(owner, attr, None)
                    if isinstance(value, int) and not isinstance(value, bool) and kept != total:
                        try:
                            new[attr] = scale_width(value, kept, total)
                        except ShrinkError:  # no width of this group (a count it does not
                            continue  # scale): left as it is, the check after the shrink decides
                        setattr(owner, attr, new[attr])
        kind = "attention" if group.index in attention_groups else "mlp"
        extra = _other_widths(src, inner, q_kept, q_total, new, owners)
        for old, kept in (p for w in weights for p in (splits or {}).get(w, ())):
            if kept != old:  # a split piece's size held in an attribute (key_dim)
                extra.update(_other_widths(src, tops, kept, old, new, owners))
        if keep_id is not None:
            ids = np.asarray(cg.producers[group.producers[0]].out_ids)
            mine = cg.group_of[cg.component[ids]] == group.index
            if 0 < int(mine.sum()) < len(ids):  # only part of the producer's rows are the group's
                extra.update(_other_widths(src, tops, int(keep_id[ids][mine].sum()),
                                           int(mine.sum()), new, owners))
            # unit counts (heads of a layout reshaped by count)
            units = len(group.components)
            kept_units = len(set(cg.component[ids][mine & keep_id[ids]].tolist()))
            for mult in COUNT_MULTIPLES:
                for key, (old, kept) in _other_widths(src, inner, kept_units * mult,
                                                      units * mult, new, owners).items():
                    extra.setdefault(key, (old, kept))
        key = path if path not in changed else f"{path}#{group.index}"  # two groups, one owner
        changed[key] = dict(new, _path=path, _kind=kind, _extra=extra, _kept=q_kept, _total=q_total, _kv_kept=kv_kept,
                             _kv_total=kv_total, _producers=tuple(weights),
                             _weights=tuple(weights + consumers))
    return changed


def _inner_owners(src: nn.Module, top: str) -> list[str]:
    """``top`` and the modules under it that are not torch's own (a mixer's forget gate
    reshapes by its own head count; an ``nn.Linear``'s ``in_features`` is no width its
    code reads), at most :data:`MAX_INNER_OWNERS`; just ``top`` for the model's root."""
    if top and type(src.get_submodule(top)).__module__.startswith("torch."):
        top = top.rpartition(".")[0]  # a lone projection: its owner holds the widths
    if not top:
        return [top]
    under = [f"{top}.{p}" for p, m in src.get_submodule(top).named_modules()
             if p and not type(m).__module__.startswith("torch.")]  # not nn.Linear's sizes
    return [top] + under[:MAX_INNER_OWNERS]


def _other_widths(src: nn.Module, owner_paths: list[str], kept: int, total: int,
                  done: dict[str, int], done_on: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
    """Integer attributes of a group's owner module (no name of the known width
    attributes) holding the group's whole width, e.g. ``self.embed_dim`` that BART-style
    attention reshapes its output with: ``{"path:attr": (old, new)}``. Not set here;
    :func:`~sparsify_fx.passes.shrink.source_check.retry_widths` sets them only when the
    shrink does not run without them."""
    out: dict[str, tuple[int, int]] = {}
    if kept == total:
        return out
    for owner_path in owner_paths:
        owner = src.get_submodule(owner_path) if owner_path else src
        for attr, value in vars(owner).items():
            if attr.startswith("_") or attr == "training" or (
                    attr in done and owner_path in done_on):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value == total:
                out[f"{owner_path}:{attr}"] = (value, kept)
    return out


def shrink_to_source(model: nn.Module, cg: ChannelGraph, keep_id: np.ndarray) -> nn.Module:
    """A smaller copy of the capture's source module (see module doc). Read-only. When
    the shrunk model fails its check, the :class:`ShrinkError` names the cut groups that
    cause it (``groups``) and their producer weights (``exclude``): the class's code reads
    a width of theirs the shrink does not update; transform again with ``exclude`` and
    cut again (the library does not keep them whole itself: the budget would be missed)."""
    try:
        return _shrunk(model, cg, keep_id)
    except ShrinkError as exc:
        if not hasattr(exc, "raised_in") or not (~keep_id).any():
            raise
        source = unwrap(model).__dict__["source_module"]
        found = failing_groups(lambda keep: _shrunk(model, cg, keep), source, cg, keep_id, exc)
        raise cannot_hold_error(exc, cg, found) from exc


def _shrunk(model: nn.Module, cg: ChannelGraph, keep_id: np.ndarray) -> nn.Module:
    """:func:`shrink_to_source` without naming the groups of a failed check."""
    exported = unwrap(model)
    source = exported.__dict__.get("source_module")
    if source is None:
        raise ShrinkError("this torch.export capture does not keep its source module; "
                          "re-run sparsify_fx.transform on the model")
    gm = main_graph(exported)
    src = copy.deepcopy(source)
    with torch.no_grad():
        folded = {}
        for node in gm.graph.nodes:  # each masked weight: weight x fold factor
            if node.op == "call_module" and str(node.target).startswith("sparsify_masks."):
                mask = gm.get_submodule(str(node.target))
                name = str(node.args[0].target)
                folded[name] = gm.get_parameter(name).detach() * mask.fold_factor().to(
                    gm.get_parameter(name).dtype)
        state = {n: t.detach() for n, t in [*gm.named_parameters(), *gm.named_buffers()]}
        for name, _ in [*src.named_parameters(), *src.named_buffers()]:
            value = folded.get(name, state.get(name))
            if value is not None:
                _set_tensor(src, name, value.clone())
        keep_id = pad_expert_units(src, cg, keep_id)  # 16-byte aligned expert widths
        widths = _slice_producers(src, cg, keep_id)
        _slice_norms(src, cg, keep_id)
        blocks = _sync_block_attrs(src, cg, widths, keep_id,
                                   split_piece_widths(gm, cg, keep_id))
        cfg = getattr(exported, "sparsify_config", None)
        uniform = update_config(src, blocks, reload_check(exported, src,
                                                      getattr(cfg, "example_inputs", None)))
        if not uniform:
            layer_configs(src, blocks)
    src.__dict__["sparsify_uniform_widths"] = uniform
    record_gaps(src, blocks)  # a config that cannot describe the model: no save
    cfg = getattr(exported, "sparsify_config", None)
    inputs = getattr(cfg, "example_inputs", None)
    try:
        check_against_capture(exported, src, inputs)
    except ShrinkError as exc:  # a width attribute of no known name: set it, check again
        retry_widths(exported, src, blocks, inputs, exc)
    src.train(exported.training)
    return src


def fold_to_source(model: nn.Module) -> nn.Module:
    """The capture's source class with every mask folded in and nothing sliced: the
    hard-masked model as the user's own class (``generate()`` and all). Read-only."""
    gm = main_graph(model)
    if gm is None:
        raise ShrinkError("fold_to_source needs a torch.export capture from transform")
    cg = channel_graph_of(gm)
    return shrink_to_source(model, cg, np.ones(cg.n_ids, dtype=bool))


__all__ = ["shrink_to_source", "fold_to_source", "config_cannot_hold", "HEAD_ATTRS", "KV_HEAD_ATTRS", "WIDTH_ATTRS", "UNIT_ATTRS"]
