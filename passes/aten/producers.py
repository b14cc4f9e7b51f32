"""Producer and attention rules of the ATen channel walk (read-only).

``visit_matmul``: ``aten.linear`` / ``addmm`` / ``mm`` / ``matmul`` / ``bmm`` and
``aten.conv*``. With a parameter weight operand the call is a *producer*: its
output channels get new ids (owned by it when its weight is masked, else
whole); its input channels are read from the input's ids along the contracted
dim (the same ids at every other position, else they stay whole) and stay whole
where they may be non-zero while pruned. A weight is ``(out, in)`` for
``linear`` / conv and ``(in, out)`` for ``addmm`` / ``mm`` / ``matmul`` (HF
``Conv1D``), flipped by a transpose in the graph; ``matmul(W, x)`` (``W`` first, e.g.
Mamba's ``dt_proj.weight @ dt``) reads and writes channels along ``x``'s dim -2. A product of two activations
ties everything one batch entry reads (see the walk's module doc) and records
its MACs as an ``attention_matmul`` producer (``macs_unit`` MACs per sample per
id of its first tracked operand's fibre).

``visit_sdpa``: ``scaled_dot_product_attention(q, k, v, mask, ...)``, as
``softmax(q k^T + mask) v`` (``enable_gqa``: key/value heads repeated first; a float mask
carrying channels, a per-head bias, is tied position by position to the scores).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx

from sparsify_fx.passes.aten.grouped import NOT_GROUPED, visit_grouped
from sparsify_fx.passes.aten.values import DerivedParam, ParamRef, Tracked, concrete_shape, op_name
from sparsify_fx.passes.channels.graph_types import NormSite, Producer

if TYPE_CHECKING:
    from sparsify_fx.passes.aten.channel_walk import AtenChannelWalk


def _weight_shape(walk: "AtenChannelWalk", ref: ParamRef) -> tuple[int, ...]:
    owner, _, attr = ref.name.rpartition(".")
    mod = walk.gm.get_submodule(owner) if owner else walk.gm
    return tuple(getattr(mod, attr).shape)


def _bias_name(walk: "AtenChannelWalk", arg: Any) -> str | None:
    v = walk.value(arg)
    return v.name if isinstance(v, ParamRef) else None


def _input_ids(walk: "AtenChannelWalk", x: Any, dim: int, width: int,
               gate: bool = False) -> tuple[Any, Any]:
    """Ids of the contracted input channels (length ``width``), or whole ones, and which
    of them reach the product not exactly zero when pruned (bool, or None: none).

    Such a channel stays whole, unless ``gate``: then the coupling pass gates the
    consumer's input columns with the channel's own score (``kind`` "columns"), so a
    pruned channel multiplies a zero column, whatever its value (an activation that is
    not 0 at 0, a recurrent mixer's output)."""
    if not isinstance(x, Tracked):
        return walk.emit(torch.full((width,), -1, dtype=torch.long)), None
    ids = x.ids.movedim(dim, -1).reshape(-1, x.ids.shape[dim])
    zero = x.zero.movedim(dim, -1).reshape(-1, x.ids.shape[dim])
    nonzero = set(torch.unique(ids[(ids >= 0) & ~zero]).tolist())  # non-zero while pruned
    uniform = ids.shape[-1] == width and bool((ids == ids[0]).all())
    if gate and uniform and nonzero:
        row = walk.emit(ids[0])
        return row, np.isin(row, sorted(nonzero))
    if nonzero - walk.whole and walk.current is not None:
        walk.unsupported.append(f"{walk.current} (input): reaches this product not exactly "
                                "zero when its channels are pruned")
    walk.whole.update(nonzero)
    if not uniform:
        walk.make_whole(x)
        return walk.emit(torch.full((width,), -1, dtype=torch.long)), None
    return walk.emit(ids[0]), None


def _depthwise_input(walk: "AtenChannelWalk", x: Any, groups: int) -> np.ndarray | None:
    """A depthwise conv's input channel ids (one input channel per group) when each input
    channel carries one tied set over its whole extent, zero when pruned (a head's
    ``head_dim`` channels convolved along positions: Nystromformer's value conv reads
    ``(batch, heads, length, head_dim)``), one id per channel; None otherwise (the
    general rule: one id per channel everywhere, or whole)."""
    if not isinstance(x, Tracked) or x.ids.dim() < 3 or x.ids.shape[1] != groups:
        return None
    cols = x.ids.movedim(1, -1).reshape(-1, groups)
    zero = x.zero.movedim(1, -1).reshape(-1, groups)
    if bool(((cols >= 0) & ~zero).any()) or bool((cols == cols[0]).all()):
        return None  # not zero when pruned, or one id per channel (the general rule)
    each = walk.one_id_each(cols.T)
    if each is None or walk.all_whole(each):
        return None
    return walk.emit(each)


def _producer(walk: "AtenChannelWalk", node: fx.Node, x_arg: Any, ref: ParamRef, bias: Any,
              kind: str, groups: int = 1) -> Tracked | None:
    shape = _weight_shape(walk, ref)
    conv = kind == "conv"
    if conv:
        out_ch, in_per_group, kernel = shape[0], shape[1], shape[2:]
    elif len(shape) != 2:
        return walk.reject(node, "matmul with a weight that is not 2-D")
    else:
        out_ch, in_per_group = (shape[1], shape[0]) if (kind == "io") != ref.transposed else shape
        kernel = ()
    out_shape = walk.shape(node)
    index = len(walk.producers)
    masked = ref.name in walk.masked
    out_ids = walk.new_ids(out_ch, index if masked else -1)
    if not masked:
        walk.whole.update(out_ids.tolist())
    x = walk.value(x_arg)
    left = kind == "left"  # W @ x: channels along the second-to-last dim
    in_ids = _depthwise_input(walk, x, groups) if conv and in_per_group == 1 else None
    gated_in = None
    if in_ids is None:
        in_ids, gated_in = _input_ids(walk, x, 1 if conv else -2 if left else -1,
                                      in_per_group * groups,
                                      gate=groups == 1 and walk.gated(ref.name))
    if groups > 1:  # a conv group's inputs and outputs are removed as one unit
        for g_in, g_out in zip(in_ids.reshape(groups, -1), out_ids.numpy().reshape(groups, -1)):
            walk.tie_all(torch.as_tensor([*g_in.tolist(), *g_out.tolist()]))
    _tie_reuse(walk, ref.name, out_ids, in_ids)
    layout = "oi" if (kind != "io") != ref.transposed else "io"
    walk.producers[node.name] = Producer(
        node.name, ref.name, _bias_name(walk, bias), ref.masked, "conv" if conv else "linear",
        groups, out_ids.numpy(), in_ids, (out_ch, in_per_group, *kernel), weight_layout=layout,
        gated_in=gated_in)
    dim = 1 if conv else len(out_shape) - (2 if left else 1)
    view = [1] * len(out_shape)
    view[dim] = out_ch
    ids = out_ids.reshape(view).expand(out_shape)
    return Tracked(ids, torch.ones(out_shape, dtype=torch.bool))


def _tie_reuse(walk: "AtenChannelWalk", weight: str, out_ids: torch.Tensor, in_ids: Any) -> None:
    """A weight read by several calls (a loop over the same layers): row ``i`` is removed
    from every use at once, so each use's output channel ``i`` is tied to the first use's,
    and so are the input channels (a use whose input stays whole keeps them whole)."""
    first = walk.weight_uses.setdefault(weight, (out_ids, in_ids))
    if first[0] is out_ids:
        return
    walk.tie_pairs(first[0], out_ids)
    a, b = torch.as_tensor(first[1]), torch.as_tensor(in_ids)
    if a.shape == b.shape:
        walk.tie_pairs(a, b)


def _contract(walk: "AtenChannelWalk", node: fx.Node, a: Tracked | None, b: Tracked | None,
              out_shape: tuple[int, ...], unit_scale: float = 1.0, record: bool = True) -> Tracked:
    """``a @ b`` of two activations (``a``: ``(..., M, K)``, ``b``: ``(..., K, N)``)."""
    batch = out_shape[:-2]
    m, n = out_shape[-2], out_shape[-1]
    rows = _row_channels(walk, node, a, b, out_shape, record)
    if rows is not None:
        return rows
    parts = []
    for t in (a, b):
        if t is not None:
            ids = t.ids.broadcast_to((*batch, *t.ids.shape[-2:])).reshape(-1, t.ids.shape[-2] * t.ids.shape[-1])
            parts.append(ids)
    for row in torch.unique(torch.cat(parts, 1), dim=0):
        walk.tie_all(row)  # everything one batch entry (one head) reads is one unit
    first = a if a is not None else b
    fib = first.ids.broadcast_to((*batch, *first.ids.shape[-2:]))
    sample = fib[0] if len(batch) else fib
    per_id = sample.select(-2 if first is a else -1, 0).reshape(-1)  # (heads..., K)
    if record:  # MACs: one (M x N) block per id of the operand's (heads..., K) fibre
        emitted = walk.emit(per_id)
        walk.producers[node.name] = Producer(node.name, node.name, None, None, "attention_matmul",
                                             1, emitted, None, (len(emitted), 1),
                                             float(m * n) * unit_scale)
    if b is not None:
        ids = b.ids.broadcast_to((*batch, *b.ids.shape[-2:]))[..., :1, :].expand(out_shape)
        zero = b.zero.broadcast_to((*batch, *b.ids.shape[-2:])).all(-2, keepdim=True).expand(out_shape)
    else:
        ids = a.ids.broadcast_to((*batch, *a.ids.shape[-2:]))[..., :, :1].expand(out_shape)
        zero = a.zero.broadcast_to((*batch, *a.ids.shape[-2:])).all(-1, keepdim=True).expand(out_shape)
    if a is not None and b is not None:
        za = a.zero.broadcast_to((*batch, *a.ids.shape[-2:])).all(-1, keepdim=True).expand(out_shape)
        zero = zero | za
    return Tracked(ids.contiguous(), zero.contiguous())


def _row_channels(walk: "AtenChannelWalk", node: fx.Node, a: Tracked | None,
                  b: Tracked | None, out_shape: tuple[int, ...], record: bool) -> Tracked | None:
    """``a @ b`` where ``a``'s channels run along its rows only (the same id across ``K``,
    different ids down ``M``) and ``b``'s ids do not vary along ``N``: a per-channel state
    read out by a shared vector (a selective scan's ``state @ C``). Each row is its own
    channel's output row: nothing is tied; ``b``'s channels (along ``K``, which no channel
    of ``a`` matches) stay whole. None when the pattern does not hold (attention's
    ``q @ k^T``, whose channels run along ``K``)."""
    if a is None:
        return None
    batch = out_shape[:-2]
    ids = a.ids.broadcast_to((*batch, *a.ids.shape[-2:]))
    if not bool((ids == ids[..., :, :1]).all()) or bool((ids == ids[..., :1, :]).all()):
        return None  # varies along K, or does not vary down M
    if b is not None:
        b_ids = b.ids.broadcast_to((*batch, *b.ids.shape[-2:]))
        if not bool((b_ids == b_ids[..., :, :1]).all()):
            return None
        walk.make_whole(b)
    k, n = a.ids.shape[-1], out_shape[-1]
    if record:  # MACs: K x N per row of a channel
        sample = ids.reshape(-1, *ids.shape[-2:])[0]
        emitted = walk.emit(sample[:, 0])
        walk.producers[node.name] = Producer(node.name, node.name, None, None, "attention_matmul",
                                             1, emitted, None, (len(emitted), 1), float(k * n))
    zero = a.zero.broadcast_to(ids.shape).all(-1, keepdim=True)
    return Tracked(ids[..., :, :1].expand(out_shape).contiguous(),
                   zero.expand(out_shape).contiguous())


def visit_matmul(walk: "AtenChannelWalk", node: fx.Node, name: str) -> Any:
    args = node.args
    vals = [walk.value(a) for a in args]
    grouped = visit_grouped(walk, node, name, vals)  # grouped linears, per-head projections
    if grouped is not NOT_GROUPED:
        return grouped
    if name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution"):
        ref = vals[1]
        if not isinstance(ref, ParamRef):
            return walk.reject(node, "convolution whose weight is not a parameter")
        if name in ("convolution", "_convolution"):
            if args[6]:
                return walk.reject(node, "transposed convolution")
            groups = int(args[8])
        else:
            groups = int(args[6]) if len(args) > 6 else int(node.kwargs.get("groups", 1))
        return _producer(walk, node, args[0], ref, args[2] if len(args) > 2 else None, "conv", groups)
    if name == "linear":
        if isinstance(vals[1], ParamRef):
            return _producer(walk, node, args[0], vals[1], args[2] if len(args) > 2 else None, "oi")
        return walk.reject(node, "linear with an activation weight")
    if name == "addmm":
        if isinstance(vals[2], ParamRef) and not isinstance(vals[1], ParamRef):
            return _producer(walk, node, args[1], vals[2], args[0], "io")
        return walk.reject(node, "addmm form not understood")
    if name in ("mm", "matmul") and isinstance(vals[1], ParamRef) and not isinstance(vals[0], ParamRef):
        return _producer(walk, node, args[0], vals[1], None, "io")
    if name in ("mm", "matmul") and isinstance(vals[0], ParamRef) and not isinstance(
            vals[1], ParamRef) and len(concrete_shape(args[1]) or ()) >= 2:
        return _producer(walk, node, args[1], vals[0], None, "left")  # W @ x
    if name == "baddbmm":
        return _baddbmm(walk, node, vals)
    if name in ("mm", "matmul", "bmm"):
        a, b = vals[0], vals[1]
        if isinstance(a, ParamRef) or isinstance(b, ParamRef):
            return walk.reject(node, "matmul with a parameter as its first operand")
        if not isinstance(a, Tracked) and not isinstance(b, Tracked):
            return None
        shape_a, shape_b = concrete_shape(args[0]), concrete_shape(args[1])
        if shape_a is None or shape_b is None or len(shape_a) < 2 or len(shape_b) < 2:
            return walk.reject(node, "matmul of vectors")
        return _contract(walk, node, a if isinstance(a, Tracked) else None,
                         b if isinstance(b, Tracked) else None, walk.shape(node))
    return walk.reject(node, f"{name} form not understood")


def _baddbmm(walk: "AtenChannelWalk", node: fx.Node, vals: list) -> Any:
    """``beta * input + alpha * (b1 @ b2)`` (e.g. attention scores plus a per-head bias):
    the product of two activations as ``bmm``; ``input`` is added elementwise (its ids tie;
    without ids, one that varies along the heads keeps them whole, as any added operand)."""
    bias, a, b = vals[0], vals[1], vals[2]
    if isinstance(a, Tracked) and isinstance(b, ParamRef):
        return _block_diagonal(walk, node, a, b, bias)
    if any(isinstance(v, ParamRef) for v in (a, b)):
        return walk.reject(node, "baddbmm with a parameter operand")
    a, b = (v if isinstance(v, Tracked) else None for v in (a, b))
    out_shape = walk.shape(node)
    if a is None and b is None:
        if isinstance(bias, Tracked):
            return Tracked(bias.ids.broadcast_to(out_shape), torch.zeros(out_shape, dtype=torch.bool))
        return None
    out = _contract(walk, node, a, b, out_shape)
    if isinstance(bias, Tracked):
        bias = walk.broadcast(bias, out_shape)
        walk.tie_pairs(out.ids, bias.ids)
        return Tracked(torch.where(out.ids >= 0, out.ids, bias.ids), out.zero & bias.zero)
    bias_shape = concrete_shape(node.args[0])
    if bias_shape is not None:
        walk.check_untracked_operand(out, bias_shape, node, isinstance(vals[0], ParamRef))
        return Tracked(out.ids, torch.zeros_like(out.zero))
    return out


def _block_diagonal(walk: "AtenChannelWalk", node: fx.Node, x: Tracked, weight: ParamRef,
                    bias: Any) -> Any:
    """``baddbmm(b[:, None, :], x, W)`` with ``W`` of shape ``(H, K, N)``: a block-diagonal
    linear, block ``h`` reading only ``x[h]`` (RecurrentGemma's gates per head). A block
    whose inputs are one tied set (a head) is removed with it: ``W[h]`` and ``b[h]`` are
    recorded as a site shrink slices along dim 0, the block's outputs carry the head's
    ids (not zero when pruned: the bias stays). Other forms are not followed."""
    shape = _weight_shape(walk, weight)
    bias_name = bias.name if isinstance(bias, (ParamRef, DerivedParam)) else None
    if len(shape) != 3 or x.ids.dim() != 3 or x.ids.shape[0] != shape[0] or weight.transposed \
            or (bias is not None and bias_name is None):
        return walk.reject(node, "baddbmm with a parameter operand")
    ids = walk.one_id_each(block.reshape(-1) for block in x.ids)
    if ids is None:
        return walk.reject(node, "block-diagonal matmul over several tied sets per block")
    owner = weight.name.rpartition(".")[0]
    walk.norms[node.name] = NormSite(node.name, owner, walk.emit(ids),
                                     (weight.name, bias_name, None, None))
    out_shape = walk.shape(node)
    out = ids.reshape(-1, 1, 1).expand(out_shape).contiguous()
    return Tracked(out, torch.zeros(out_shape, dtype=torch.bool))


def _repeat_heads(t: Tracked | None, heads: int) -> Tracked | None:
    if t is None or t.ids.shape[-3] == heads:
        return t
    r = heads // t.ids.shape[-3]
    return Tracked(t.ids.repeat_interleave(r, dim=-3), t.zero.repeat_interleave(r, dim=-3))


def visit_sdpa(walk: "AtenChannelWalk", node: fx.Node) -> Any:
    """``softmax(q k^T + mask) v``: one unit per (query head, its key/value head)."""
    q, k, v = (walk.value(a) for a in node.args[:3])
    mask = walk.value(node.args[3]) if len(node.args) > 3 else walk.value(node.kwargs.get("attn_mask"))
    q, k, v = (t if isinstance(t, Tracked) else None for t in (q, k, v))
    if q is None and k is None and v is None:
        return walk.reject(node, "attention mask carries channels") if isinstance(
            mask, Tracked) else None
    out_shape = concrete_shape(node) if op_name(node.target) == "scaled_dot_product_attention" else None
    if out_shape is None:
        val = node.meta.get("val")
        out_shape = tuple(int(s) for s in val[0].shape) if isinstance(val, (list, tuple)) else None
    if out_shape is None:
        return walk.reject(node, "attention output shape unknown")
    q_shape, k_shape = concrete_shape(node.args[0]), concrete_shape(node.args[1])
    heads = out_shape[-3]
    k, v = _repeat_heads(k, heads), _repeat_heads(v, heads)
    kt = Tracked(k.ids.transpose(-1, -2), k.zero.transpose(-1, -2)) if k is not None else None
    scores_shape = (*out_shape[:-1], k_shape[-2])
    scores = _contract(walk, node, q, kt, scores_shape,
                       unit_scale=1.0 + out_shape[-1] / q_shape[-1])
    if isinstance(mask, Tracked):  # a float mask is added to the scores: a per-head bias
        try:
            walk.tie_pairs(scores.ids, mask.ids.broadcast_to(scores_shape))
        except RuntimeError:
            return walk.reject(node, "attention mask carries channels in a form not understood")
    scores = Tracked(scores.ids, torch.zeros_like(scores.zero))  # softmax: not zero
    out = _contract(walk, node, scores, v, out_shape, record=False)  # MACs counted with q k^T
    if op_name(node.target) != "scaled_dot_product_attention":
        return (out, None, None, None)
    return out
