"""Attention heads as channel groups (part of the channel analysis; read-only).

Called by :mod:`sparsify_fx.passes.channels.analysis` for two self-attention forms:

* an ``nn.MultiheadAttention`` leaf call (vit_b_16 and other torchvision models):
  packed ``in_proj_weight`` (q, k, v rows), ``out_proj``;
* torchvision's ``shifted_window_attention`` function (swin_t): ``qkv`` and ``proj``
  weights reach it through ``get_attr`` nodes, plus a relative position bias
  table with one column per head.

The in-projection becomes a producer of ``3 * embed_dim`` channel ids laid out
``[q | k | v]`` (each ``num_heads x head_dim``); all ids of one head are tied, so
one head is one score slot of a channel group. The out-projection consumes the v
ids (its input columns), and two weightless ``attention_matmul`` producers stand
for ``q k^T`` and ``attn v`` so the MACs bookkeeping counts them per kept head.

Zero contract: a pruned head has zero q, k and v rows and biases, so its
attention output is exactly zero whatever the attention pattern (softmax of
zeros times zero values), and removing it together with its out-projection
columns and bias-table column is exact. Calls this module does not understand
(cross-attention, attention masks, returned attention weights, separate q/k/v
weights, ``add_bias_kv``, Swin V2 cosine attention) keep every head.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any

import numpy as np
from torch import fx, nn
from torch.nn.utils import parametrize

from sparsify_fx.mask import SharedChannelMask

from sparsify_fx.passes.channels.layout_rules import OPAQUE, weight_source
from sparsify_fx.passes.channels.graph_types import AttentionSite, Layout, Producer

#: names of the windowed attention functions handled (torchvision swin v1)
WINDOW_FUNCTIONS = ("shifted_window_attention", "pruned_window_attention")


def has_shared_mask(module: nn.Module, attr: str) -> bool:
    """True when ``module.<attr>`` is parametrized by a (non-auxiliary) coupled channel mask."""
    if not parametrize.is_parametrized(module, attr):
        return False
    return any(isinstance(p, SharedChannelMask) and not p.auxiliary
               for p in getattr(module.parametrizations, attr))


def _bind(fn: Any, node: fx.Node) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _meta_shape(arg: Any) -> tuple[int, ...] | None:
    meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
    return tuple(int(s) for s in meta.shape) if hasattr(meta, "shape") else None


def _weights_unused(node: fx.Node) -> bool:
    """Only ``out[0]`` of an MHA call is used (the attention weights are not)."""
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return False
        if user.args[1] != 0 and user.users:
            return False
    return True


def _mha_problem(node: fx.Node, mod: nn.MultiheadAttention) -> str | None:
    if not mod._qkv_same_embed_dim or mod.in_proj_weight is None:
        return "MultiheadAttention with separate q/k/v weights keeps its heads"
    if mod.bias_k is not None or mod.add_zero_attn:
        return "MultiheadAttention with add_bias_kv / add_zero_attn keeps its heads"
    args = _bind(mod.forward, node)
    if args is None:
        return "MultiheadAttention call arguments not understood"
    if not (args["query"] is args["key"] is args["value"]):
        return "cross-attention (query, key, value differ) keeps its heads"
    if args["key_padding_mask"] is not None or args["attn_mask"] is not None or args["is_causal"]:
        return "attention masks keep the heads (not supported by head pruning yet)"
    if not _weights_unused(node):
        return "the attention weights output is used; heads are kept"
    return None


def _input_ids(an: Any, x: Any, width: int) -> np.ndarray | None:
    """Channel ids of the projection input (None: untracked); mixes them (consumed)."""
    if not isinstance(x, Layout):
        return None
    if x.cdim != -1 or x.mult != 1 or len(x.ids) != width:
        an.make_whole(x)
        return None
    an._check_consumed(x, x.ids)
    return x.ids


def _add_site(an: Any, node: fx.Node, site: AttentionSite, *, qkv: tuple[str, str | None],
              out: tuple[str, str | None], mask_node: str | None, prunable: bool,
              in_ids: np.ndarray | None, e_in: int, e_out: int,
              tokens: int | None, keys: int | None) -> None:
    """Producers (qkv, out, two matmuls), head ties and the site record."""
    e, h, d = site.num_heads * site.head_dim, site.num_heads, site.head_dim
    qkv_ids = an.new_ids(3 * e, len(an.producers) if prunable else -1)
    if not prunable:
        an.whole_ids.update(qkv_ids.tolist())
    for j in range(h):
        members = np.concatenate([qkv_ids[b * e + j * d: b * e + (j + 1) * d] for b in range(3)])
        an.tie(members[:-1], members[1:])
    an.producers[site.qkv] = Producer(node.name, qkv[0], qkv[1], mask_node, "attention_qkv", 1,
                                      qkv_ids, in_ids, (3 * e, e_in),
                                      None if tokens is None else float(tokens))
    out_ids = an.new_ids(e_out, -1)
    an.whole_ids.update(out_ids.tolist())
    v_ids = qkv_ids[2 * e:]
    an.producers[site.out] = Producer(node.name, out[0], out[1], None, "attention_out", 1,
                                      out_ids, v_ids, (e_out, e),
                                      None if tokens is None else float(tokens))
    unit = None if tokens is None or keys is None else float(tokens * keys)
    for tag, ids in (("scores", qkv_ids[:e]), ("values", v_ids)):
        an.producers[f"{node.name}.{tag}"] = Producer(
            node.name, f"{site.label}:attention_{tag}", None, None, "attention_matmul", 1, ids,
            None, (e, 1), unit)
    an.attention[node.name] = site


def visit_mha(an: Any, node: fx.Node, mod: nn.MultiheadAttention) -> Any:
    """An ``nn.MultiheadAttention`` leaf call: heads of its packed in-projection."""
    problem = _mha_problem(node, mod)
    if problem is not None:
        return an.reject(node, problem)
    path = str(node.target)
    weight = f"{path}.in_proj_weight"
    e, h = int(mod.embed_dim), int(mod.num_heads)
    x = node.args[0] if node.args else node.kwargs.get("query")
    in_ids = _input_ids(an, an.val(x), e)
    shape = _meta_shape(x)
    tokens = None
    if shape is not None:
        tokens = shape[0] if len(shape) == 2 or not mod.batch_first else shape[1]
    site = AttentionSite(node.name, "mha", path, node.name, f"{node.name}.out", h, e // h, weight)
    prunable = weight in an.masked or has_shared_mask(mod, "in_proj_weight")
    _add_site(an, node, site,
              qkv=(weight, f"{path}.in_proj_bias" if mod.in_proj_bias is not None else None),
              out=(f"{path}.out_proj.weight",
                   f"{path}.out_proj.bias" if mod.out_proj.bias is not None else None),
              mask_node=None, prunable=prunable, in_ids=in_ids, e_in=e, e_out=e,
              tokens=tokens, keys=tokens)
    return _untracked()


def _untracked() -> Any:
    """The attention output's channels are not tracked (its out-projection stays whole)."""
    return OPAQUE


def visit_window(an: Any, node: fx.Node) -> Any:
    """torchvision ``shifted_window_attention``: heads of ``qkv`` / ``proj`` and the bias table."""
    args = _bind(node.target, node)
    if args is None:
        return an.reject(node, "windowed attention arguments not understood")
    if args.get("logit_scale") is not None:
        return an.reject(node, "cosine attention (Swin V2) keeps its heads")
    heads, window = args["num_heads"], args["window_size"]
    if not isinstance(heads, int) or not all(isinstance(w, int) for w in window):
        return an.reject(node, "num_heads / window_size are not constants")
    qkv_w, mask_node = weight_source(an.gm, args["qkv_weight"])
    proj_w, _ = weight_source(an.gm, args["proj_weight"])
    qkv_b, _ = weight_source(an.gm, args["qkv_bias"])
    proj_b, _ = weight_source(an.gm, args["proj_bias"])
    table = _bias_table(args["relative_position_bias"])
    if qkv_w is None or proj_w is None or table is None or (
            args["qkv_bias"] is not None and qkv_b is None):
        return an.reject(node, "windowed attention weights do not come from parameters")
    qkv_shape = tuple(an.gm.get_parameter(qkv_w).shape)
    e, e_in = qkv_shape[0] // 3, qkv_shape[1]
    e_out = int(an.gm.get_parameter(proj_w).shape[0])
    head_dim = int(args.get("head_dim") or e // heads)
    if heads * head_dim != e or an.gm.get_parameter(table).shape[-1] != heads:
        return an.reject(node, "windowed attention head sizes do not match its weights")
    in_ids = _input_ids(an, an.val(args["input"]), e_in)
    shape = _meta_shape(args["input"])
    tokens = keys = None
    if shape is not None and len(shape) == 4:
        pad_h = -(-shape[1] // window[0]) * window[0]
        pad_w = -(-shape[2] // window[1]) * window[1]
        tokens, keys = pad_h * pad_w, window[0] * window[1]
    site = AttentionSite(node.name, "window", None, node.name, f"{node.name}.out", heads,
                         head_dim, qkv_w, table)
    _add_site(an, node, site, qkv=(qkv_w, qkv_b), out=(proj_w, proj_b), mask_node=mask_node,
              prunable=qkv_w in an.masked and mask_node is not None, in_ids=in_ids,
              e_in=e_in, e_out=e_out, tokens=tokens, keys=keys)
    return _untracked()


def _bias_table(arg: Any) -> str | None:
    """The relative position bias table parameter behind ``_get_relative_position_bias``."""
    if not (isinstance(arg, fx.Node) and arg.op == "call_function"
            and getattr(arg.target, "__name__", "") == "_get_relative_position_bias"):
        return None
    table = arg.args[0]
    return str(table.target) if isinstance(table, fx.Node) and table.op == "get_attr" else None
