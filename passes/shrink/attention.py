"""Remove pruned attention heads from a folded copy (called by ``shrink``; mutates it).

For every :class:`~sparsify_fx.passes.channels.graph_types.AttentionSite` that loses a
head (or an input channel), the kept q/k/v rows, out-projection columns and
(Swin) bias-table columns are sliced out:

* ``nn.MultiheadAttention`` leaves are replaced by a
  :class:`~sparsify_fx.passes.shrink.pruned_attention.PrunedSelfAttention` at the same path
  (the graph's call node is unchanged);
* ``shifted_window_attention`` calls are retargeted to
  :func:`~sparsify_fx.passes.shrink.pruned_attention.pruned_window_attention` with the kept
  head count and ``head_dim`` (weights sliced in place of the ``get_attr`` targets).
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor, fx, nn

from sparsify_fx.passes.channels.graph_types import AttentionSite, ChannelGraph, Producer
from sparsify_fx.passes.shrink.pruned_attention import PrunedSelfAttention, pruned_window_attention


def _param(gm: fx.GraphModule, name: str | None) -> Tensor | None:
    return None if name is None else gm.get_parameter(name)


def _replace_param(gm: fx.GraphModule, name: str, value: Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path)
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def shrink_attention(gm: fx.GraphModule, cg: ChannelGraph, keep_id: np.ndarray) -> None:
    """Rewrite every attention site of ``cg`` that loses heads; ``keep_id``: bool per id."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in cg.attention.values():
        qkv, out = cg.producers[site.qkv], cg.producers[site.out]
        rows = keep_id[qkv.out_ids]
        cols = keep_id[qkv.in_ids] if qkv.in_ids is not None else np.ones(qkv.shape[1], bool)
        if rows.all() and cols.all():
            continue
        heads = keep_id[site.head_ids(qkv.out_ids)]
        if site.style == "mha":
            _shrink_mha(gm, site, qkv, out, rows, cols, int(heads.sum()))
        else:
            _shrink_window(gm, nodes[site.node], site, qkv, out, rows, cols, heads)


def _slices(w: Tensor, rows: np.ndarray, cols: np.ndarray) -> Tensor:
    return w[torch.from_numpy(rows).to(w.device)][:, torch.from_numpy(cols).to(w.device)]


def _shrink_mha(gm: fx.GraphModule, site: AttentionSite, qkv: Producer, out: Producer,
                rows: np.ndarray, cols: np.ndarray, kept: int) -> None:
    assert site.module is not None
    mha = gm.get_submodule(site.module)
    e = site.num_heads * site.head_dim
    v_keep = torch.from_numpy(rows[2 * e:])
    new = PrunedSelfAttention(mha.embed_dim, kept, site.head_dim, in_features=int(cols.sum()),
                              bias=mha.in_proj_bias is not None,
                              out_bias=mha.out_proj.bias is not None,
                              batch_first=mha.batch_first, dropout=mha.dropout,
                              total_heads=site.num_heads)
    w = mha.in_proj_weight.detach()
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.qkv.weight.copy_(_slices(w, rows, cols))
        if mha.in_proj_bias is not None:
            new.qkv.bias.copy_(mha.in_proj_bias[torch.from_numpy(rows).to(w.device)])
        new.out_proj.weight.copy_(mha.out_proj.weight[:, v_keep.to(w.device)])
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
    new.train(mha.training)
    parent, _, name = site.module.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)


def _shrink_window(gm: fx.GraphModule, node: fx.Node, site: AttentionSite, qkv: Producer,
                   out: Producer, rows: np.ndarray, cols: np.ndarray, heads: np.ndarray) -> None:
    e = site.num_heads * site.head_dim
    with torch.no_grad():
        w = gm.get_parameter(qkv.weight)
        _replace_param(gm, qkv.weight, _slices(w, rows, cols))
        if qkv.bias is not None:
            _replace_param(gm, qkv.bias, gm.get_parameter(qkv.bias)[torch.from_numpy(rows)])
        proj = gm.get_parameter(out.weight)
        _replace_param(gm, out.weight, proj[:, torch.from_numpy(rows[2 * e:]).to(proj.device)])
        assert site.bias_table is not None
        table = gm.get_parameter(site.bias_table)
        _replace_param(gm, site.bias_table, table[:, torch.from_numpy(heads).to(table.device)])
    args = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    args.apply_defaults()
    values = dict(args.arguments)
    values["num_heads"] = int(heads.sum())
    values["head_dim"] = site.head_dim
    names = list(inspect.signature(pruned_window_attention).parameters)
    node.target = pruned_window_attention
    node.args = tuple(values.get(n) for n in names)
    node.kwargs = {}
