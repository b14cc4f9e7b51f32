"""``shrink``: physically remove pruned channels from a channel-masked model.

Input: a model from ``transform(..., granularity="channel")`` (coupled channel
masks, see :mod:`sparsify_fx.passes.channels.couple`), trained or with frozen
masks. Output: a new plain ``torch.fx.GraphModule`` (no masks, no
parametrizations, no config) whose Conv/Linear weights and biases, grouped-conv
``groups`` arguments and BatchNorm modules hold only the kept channels, and
whose outputs equal the hard-masked input model's (the masks' fold factors are
multiplied into the kept weights first). Attention calls lose their pruned heads
(:mod:`sparsify_fx.passes.shrink.attention`: the residual width stays, the inner
width shrinks). The input model is not mutated.

Raises :class:`ShrinkError` when the model has no coupled channel masks, or
when the kept channels of a tied set disagree (never a silent shape mismatch).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from sparsify_fx.config import require_target_applied
from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask import SharedChannelMask
from sparsify_fx.mask_index import main_graph, masks, unwrap

from sparsify_fx.passes.channels.analysis import ChannelGraph
from sparsify_fx.passes.channels.couple import GROUP_PREFIX, group_masks
from sparsify_fx.passes.masks.fold_masks import fold_masks_inplace
from sparsify_fx.passes.stored_analysis import channel_graph_of, coupled_producers
from sparsify_fx.passes.shrink.attention import shrink_attention
from sparsify_fx.passes.shrink.to_source import shrink_to_source


@dataclass
class ShrinkPlan:
    """Channels kept per layer: ``layers[weight or BN name] = (kept, total)`` (output
    channels), ``keep_id``: bool per channel id of ``graph``."""

    graph: ChannelGraph
    keep_id: np.ndarray
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: attention heads kept per attention call (module path or node name): (kept, total)
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)

    def format(self) -> str:
        width = max((len(k) for k in [*self.layers, *self.heads]), default=10)
        rows = [f"{'layer':<{width}}  kept / total"]
        rows += [f"{k:<{width}}  {a:>4} / {b:<4}" for k, (a, b) in self.layers.items()]
        rows += [f"{k:<{width}}  {a:>4} / {b:<4} heads" for k, (a, b) in self.heads.items()]
        return "\n".join(rows)


def _coupled_entries(gm: fx.GraphModule) -> dict[str, SharedChannelMask]:
    """{weight get_attr target: shared mask} for producer weights; checks the masks."""
    entries = masks(gm)
    if not entries:
        raise ShrinkError(f"{type(gm).__name__} has no sparsify_fx masks; shrink needs the model "
                          "returned by transform(..., granularity='channel') (before fold)")
    for e in entries:
        if not isinstance(e.mask, SharedChannelMask):
            raise ShrinkError(
                f"mask on {e.name} is a {type(e.mask).__name__} with granularity "
                f"{e.mask.granularity!r}, not a coupled channel mask: shrink only removes whole "
                "channels. Transform with granularity='channel' (fully traced model).")
    return coupled_producers(gm)  # type: ignore[return-value]


def plan_shrink(model: nn.Module) -> ShrinkPlan:
    """Which channels :func:`shrink` keeps, per layer (read-only)."""
    gm = main_graph(model)
    if gm is None:
        raise ShrinkError(f"shrink needs one GraphModule from symbolic tracing or a torch.export "
                          f"capture with granularity='channel', got {type(unwrap(model)).__name__}; "
                          "partially traced models keep their channels (prune them with "
                          "granularity='element' and fold, or make the model traceable)")
    coupled = _coupled_entries(gm)
    cg = channel_graph_of(gm)
    keep_id = np.ones(cg.n_ids, dtype=bool)
    layers: dict[str, tuple[int, int]] = {}
    with torch.no_grad():
        for prod in cg.producers.values():
            if prod.weight in coupled:
                keep = coupled[prod.weight].hard_mask().reshape(-1).cpu().numpy()
                keep_id[prod.out_ids] = keep
            else:  # no mask of its own (an embedding table cut through column gates)
                _keep_from_groups(gm, cg, prod.out_ids, keep_id)
    comp = cg.component
    n_comp = len(cg.prunable)
    kept_any = np.zeros(n_comp, dtype=bool)
    dropped_any = np.zeros(n_comp, dtype=bool)
    np.logical_or.at(kept_any, comp, keep_id)
    np.logical_or.at(dropped_any, comp, ~keep_id)
    bad = np.flatnonzero(kept_any & dropped_any)
    if len(bad):
        raise ShrinkError(f"{len(bad)} tied channel set(s) are kept in one layer and pruned in "
                          "another (masks not coupled, or edited by hand); re-run transform")
    if (dropped_any & ~cg.prunable).any():
        raise ShrinkError("a channel that must stay whole (model output, excluded layer or "
                          "unsupported op) is masked to zero; shrink cannot remove it")
    for group in cg.groups:
        ids = np.flatnonzero(np.isin(comp, group.components))
        if not keep_id[ids].any():
            raise ShrinkError(f"channel group {group.index} ({', '.join(group.producers[:3])}"
                              f"{', ...' if len(group.producers) > 3 else ''}) keeps no channel; "
                              "keep at least one (select_channels does)")
    for prod in cg.producers.values():
        if len(prod.out_ids) and not keep_id[prod.out_ids].any():
            # A layer may not lose every channel (one branch of a concatenation can):
            # keep one pruned channel set, which the zero contract makes exactly 0.
            keep_id[comp == comp[prod.out_ids[0]]] = True
    for prod in cg.producers.values():
        if prod.kind != "attention_matmul":
            layers[prod.weight] = (int(keep_id[prod.out_ids].sum()), len(prod.out_ids))
    for norm in cg.norms.values():
        layers[f"{norm.module}"] = (int(keep_id[norm.ids].sum()), len(norm.ids))
    heads = {}
    for site in cg.attention.values():
        kept = keep_id[site.head_ids(cg.producers[site.qkv].out_ids)]
        heads[site.label] = (int(kept.sum()), site.num_heads)
    return ShrinkPlan(cg, keep_id, layers, heads)


def _keep_from_groups(gm: fx.GraphModule, cg: ChannelGraph, ids: np.ndarray,
                      keep_id: np.ndarray) -> None:
    """``keep_id[ids]`` from the group masks' hard masks, for the ids in a group (a producer
    with no mask of its own: its columns are gated where they are read). Mutates
    ``keep_id``."""
    g, s = cg.slots(ids)
    if not (g >= 0).any():
        return
    masks_of = group_masks(gm)
    for gi in sorted(set(g[g >= 0].tolist())):
        hard = masks_of[f"{GROUP_PREFIX}{gi}"].hard_mask().reshape(-1).cpu().numpy().astype(bool)
        sel = g == gi
        keep_id[ids[sel]] = hard[s[sel]]


def _set_param(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path)
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _new_norm(bn: nn.Module, keep: torch.Tensor) -> nn.Module:
    n = int(keep.sum())
    new = type(bn)(n, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats)
    new.to(device=next(iter(bn.buffers()), torch.empty(0)).device)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, attr, None)
            if src is not None:
                getattr(new, attr).copy_(src[keep])
        if bn.track_running_stats:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def shrink(model: nn.Module) -> nn.Module:
    """Return a smaller plain GraphModule without the pruned channels (see module doc); a
    torch.export capture shrinks into its source class
    (:func:`~sparsify_fx.passes.shrink.to_source.shrink_to_source`)."""
    require_target_applied(unwrap(model), "shrink")
    if main_graph(model) is not unwrap(model):
        plan = plan_shrink(model)
        return shrink_to_source(model, plan.graph, plan.keep_id)
    out = copy.deepcopy(unwrap(model))
    plan = plan_shrink(out)
    cg, keep_id = plan.graph, plan.keep_id
    fold_masks_inplace(out)
    nodes = {n.name: n for n in out.graph.nodes}
    sliced: dict[str, tuple[bytes, bytes]] = {}
    with torch.no_grad():
        for prod in cg.producers.values():
            if prod.kind.startswith("attention"):
                continue  # rewritten whole by shrink_attention below
            out_keep = keep_id[prod.out_ids]
            in_keep = (keep_id[prod.in_ids] if prod.in_ids is not None
                       else np.ones(out.get_parameter(prod.weight).shape[1] * prod.groups, bool))
            sig = (out_keep.tobytes(), in_keep.tobytes())
            if sliced.setdefault(prod.weight, sig) != sig:
                raise ShrinkError(f"{prod.weight} is used by several layers that keep different "
                                  "channels; exclude it from pruning")
            if out_keep.all() and in_keep.all():
                continue
            w = out.get_parameter(prod.weight)
            ok = torch.from_numpy(out_keep).to(w.device)
            if prod.groups == 1:
                new_w = w[ok][:, torch.from_numpy(in_keep).to(w.device)]
                groups = 1
            else:
                groups = _kept_groups(prod.weight, prod.groups, out_keep, in_keep)
                new_w = w[ok]
                node = nodes[prod.node]
                node.args = (*node.args[:6], groups, *node.args[7:])
            _set_param(out, prod.weight, new_w)
            if prod.bias is not None:
                _set_param(out, prod.bias, out.get_parameter(prod.bias)[ok])
            _sync_attrs(out, prod.weight, new_w, groups, prod.kind)
        for norm in cg.norms.values():
            keep = keep_id[norm.ids]
            if keep.all():
                continue
            bn = out.get_submodule(norm.module)
            parent, _, name = norm.module.rpartition(".")
            setattr(out.get_submodule(parent), name, _new_norm(bn, torch.from_numpy(keep)))
        shrink_attention(out, cg, keep_id)
    out.graph.lint()
    out.recompile()
    return out


def _kept_groups(weight: str, groups: int, out_keep: np.ndarray, in_keep: np.ndarray) -> int:
    """Conv groups left; every conv group must be kept or dropped whole."""
    per_out = out_keep.reshape(groups, -1)
    per_in = in_keep.reshape(groups, -1)
    g_out = per_out.all(1)
    if not ((per_out.all(1) | ~per_out.any(1)).all() and (per_in.all(1) | ~per_in.any(1)).all()
            and (g_out == per_in.all(1)).all()):
        raise ShrinkError(f"{weight}: grouped conv would lose part of a conv group; its input "
                          "and output channels are not coupled")
    return int(g_out.sum())


def _sync_attrs(gm: fx.GraphModule, weight: str, w: torch.Tensor, groups: int, kind: str) -> None:
    """Keep Conv/Linear attributes (in/out channels, groups) in step, when present."""
    owner = gm.get_submodule(weight.rpartition(".")[0])
    if kind == "linear":
        for attr, value in (("out_features", w.shape[0]), ("in_features", w.shape[1])):
            if hasattr(owner, attr):
                setattr(owner, attr, int(value))
        return
    for attr, value in (("out_channels", w.shape[0]), ("in_channels", w.shape[1] * groups),
                        ("groups", groups)):
        if hasattr(owner, attr):
            setattr(owner, attr, int(value))
