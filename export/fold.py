"""``fold``: bake binary masks into the weights and remove every sparsify_fx object.

Works on a deep copy; the input model is not mutated. For each mask the folded
weight is computed by the mask's own hard-mode forward (``weight *
fold_factor()``), so the folded model's output equals the hard-masked model's.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from sparsify_fx.errors import FoldError
from sparsify_fx.mask import MaskSet
from sparsify_fx.mask_index import masks, unwrap
from sparsify_fx.prepare import CONFIG_ATTRIBUTE


def _detach_parametrized_class(module: nn.Module) -> None:
    """Give a parametrized module of the copy its own class object.

    A deep copy shares the dynamically created ``Parametrized<Cls>`` class with
    the original, and ``remove_parametrizations`` deletes properties from that
    class; without this, folding the copy would break the caller's model.
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def fold(model: nn.Module) -> nn.Module:
    """Return a plain copy of ``model`` with masks multiplied into the weights.

    The result is a ``torch.fx.GraphModule`` (or the partially traced module
    tree) with no mask nodes, mask modules, parametrizations or config left.
    Raises :class:`FoldError` if ``model`` carries no masks.
    """
    model = unwrap(model)
    if not masks(model):
        raise FoldError(
            f"{type(model).__name__} has no sparsify_fx masks: it was never transformed or "
            "is folded already. Call sparsify_fx.transform(model) first, and fold once."
        )
    out = copy.deepcopy(model)
    entries = masks(out)
    folded: set[int] = set()
    for host in {id(e.host): e.host for e in entries if e.route == "parametrize"}.values():
        _detach_parametrized_class(host)
    with torch.no_grad():
        for entry in entries:
            mask = entry.mask
            mask.hard = True
            if entry.route == "parametrize":
                parametrize.remove_parametrizations(entry.host, entry.attr, leave_parametrized=True)
                continue
            weight = getattr(entry.host, entry.attr)
            if id(weight) not in folded:
                weight.copy_(mask(weight))
                folded.add(id(weight))
    for gm in [m for m in out.modules() if isinstance(m, fx.GraphModule)]:
        if not hasattr(gm, MaskSet.ATTRIBUTE):
            continue
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and str(node.target).startswith(MaskSet.ATTRIBUTE + "."):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        delattr(gm, MaskSet.ATTRIBUTE)
        gm.graph.lint()
        gm.recompile()
    if hasattr(out, CONFIG_ATTRIBUTE):
        delattr(out, CONFIG_ATTRIBUTE)
    return out
