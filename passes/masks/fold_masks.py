"""Fold pass: bake hard masks into the weights and remove every sparsify_fx object, in place.

The one implementation of folding. :func:`sparsify_fx.fold` (checks + a deep
copy) and :func:`sparsify_fx.shrink` (which folds its own copy before slicing
channels) both call :func:`fold_masks_inplace`.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from sparsify_fx.mask import MaskSet
from sparsify_fx.mask_index import masks
from sparsify_fx.config import detach_config, require_target_applied

from sparsify_fx.passes.pass_base import PassResult, SparsifyPass


def own_parametrized_classes(model: nn.Module) -> None:
    """Give every parametrized module of ``model`` its own class object (mutates ``model``).

    ``copy.deepcopy`` shares the class torch.nn.utils.parametrize generated with
    the original, and ``remove_parametrizations`` deletes the property from
    that class; without this, folding a copy would break the caller's model.
    """
    for module in model.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            namespace = {k: v for k, v in cls.__dict__.items()
                         if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def fold_masks_inplace(model: nn.Module) -> nn.Module:
    """Multiply each mask's hard-mode factor into its weight; remove masks; mutates ``model``.

    Every weight becomes ``mask(weight)`` in hard mode (binary mask times the
    method's fold factor), so outputs equal the hard-masked model's. Mask
    nodes are replaced by their input, parametrizations removed (leaving the
    folded tensor), and the ``sparsify_masks`` submodules and transform config
    deleted from every (nested) GraphModule. Returns ``model``. Raises
    :class:`TargetNotAppliedError` (before mutating anything) when ``transform``
    was given a target the masks were never cut to.
    """
    require_target_applied(model, "fold")
    entries = masks(model)
    own_parametrized_classes(model)
    folded: set[int] = set()
    with torch.no_grad():
        for entry in entries:
            entry.mask.hard = True
            if entry.route == "parametrize":
                parametrize.remove_parametrizations(entry.host, entry.attr, leave_parametrized=True)
                continue
            weight = getattr(entry.host, entry.attr)
            if id(weight) not in folded:
                weight.copy_(entry.mask(weight))
                folded.add(id(weight))
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        if not hasattr(gm, MaskSet.ATTRIBUTE):
            continue
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and str(node.target).startswith(MaskSet.ATTRIBUTE + "."):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        delattr(gm, MaskSet.ATTRIBUTE)
        gm.graph.lint()
        gm.recompile()
    detach_config(model)
    return model


class FoldMasks(SparsifyPass):
    """``FoldMasks()(model) -> PassResult``: :func:`fold_masks_inplace` as a pass."""

    def call(self, graph_module: nn.Module) -> PassResult:  # type: ignore[override]
        had_masks = bool(masks(graph_module))
        return PassResult(fold_masks_inplace(graph_module), had_masks)
