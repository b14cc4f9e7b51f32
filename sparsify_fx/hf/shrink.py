"""Shrink a Hugging Face BERT-style encoder to the heads and units an :class:`HFPlan` keeps.

``shrink_hf(model, plan)`` returns a deep copy of the *source* ``nn.Module``
(not a graph) whose per-layer inner widths are smaller; embeddings and the
hidden size (the residual stream) are unchanged:

* attention: ``query``/``key``/``value`` keep the rows of the kept heads (weight
  and bias), the out-projection ``output.dense`` keeps their input columns, and
  the self-attention module's ``num_attention_heads`` / ``all_head_size`` are
  set to the kept count (``modeling_bert`` reshapes with ``-1`` heads and keeps
  ``attention_head_size`` and ``scaling``, so the attention math is unchanged);
* MLP: ``intermediate.dense`` keeps the rows, ``output.dense`` the columns of the
  kept units.

The result equals the hard-masked model (``freeze_plan`` on a ``transform``-ed
copy): a pruned head's out-projection columns and a pruned unit's output
column are zero there, so whatever the head or unit computes adds nothing.
The shrunk model is an ordinary HF model: ``transform`` (torch.export),
``report`` and ``export_onnx`` take it like the dense one. HF's own
``prune_heads`` is gone from transformers 5.x's BERT, hence this module.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sparsify_fx.errors import ShrinkError
from sparsify_fx.hf.heads import HFPlan, find_hf_layers


def _sliced(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` keeping ``rows`` (out features) and ``cols`` (in features)."""
    w = linear.weight.detach()
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            b = linear.bias.detach()
            new.bias.copy_(b[rows.to(b.device)] if rows is not None else b)
    new.train(linear.training)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def shrink_hf(model: nn.Module, plan: HFPlan) -> nn.Module:
    """A smaller copy of ``model`` keeping only ``plan``'s heads and units (see module doc).

    ``model``: the source HF model the plan was made for (not the transformed
    one; its weights are read, never changed). Raises :class:`ShrinkError` when
    the model's encoder layers do not match the plan's or a layer would keep no
    head or no unit."""
    current = {ly.name: ly for ly in find_hf_layers(model)}
    out = copy.deepcopy(model)
    for keep in plan.layers:
        ly = keep.layer
        if current.get(ly.name) != ly:
            raise ShrinkError(f"the plan's layer {ly.name} does not match this model's "
                              f"({current.get(ly.name)}); make the plan with plan_hf(model, ...)")
        if not keep.heads or not keep.units:
            raise ShrinkError(f"{ly.name} would keep {len(keep.heads)} heads and "
                              f"{len(keep.units)} MLP units; keep at least one of each")
        heads = torch.tensor(keep.heads, dtype=torch.long)
        ch = (heads[:, None] * ly.head_dim + torch.arange(ly.head_dim)).reshape(-1)
        units = torch.tensor(keep.units, dtype=torch.long)
        sa = out.get_submodule(ly.self_attention)
        for p in ("query", "key", "value"):
            setattr(sa, p, _sliced(getattr(sa, p), ch, None))
        sa.num_attention_heads = len(keep.heads)
        sa.all_head_size = len(keep.heads) * ly.head_dim
        _replace(out, ly.attn_out, _sliced(out.get_submodule(ly.attn_out), None, ch))
        _replace(out, ly.intermediate, _sliced(out.get_submodule(ly.intermediate), units, None))
        _replace(out, ly.mlp_out, _sliced(out.get_submodule(ly.mlp_out), None, units))
    return out


__all__ = ["shrink_hf"]
