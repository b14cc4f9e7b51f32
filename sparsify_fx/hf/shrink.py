"""``shrink_hf(model, plan)``: the smaller source class of an :class:`HFPlan`.

A preset over the general path: ``sparsify_fx.shrink`` of the plan's hard-masked
capture returns an instance of ``model``'s class (e.g. a smaller ``BertModel`` or
``LlamaForCausalLM``) with its Linear layers sliced and each layer's head counts,
KV head counts and intermediate size updated, checked against the capture on its
example inputs (``passes/shrink/to_source.py``). ``model`` is only read.
"""
from __future__ import annotations

from torch import nn

from sparsify_fx.errors import ShrinkError
from sparsify_fx.hf.heads import HFPlan


def shrink_hf(model: nn.Module, plan: HFPlan) -> nn.Module:
    """The source class of ``model`` keeping ``plan``'s heads and units (eval/train mode
    as ``model``). Raises :class:`ShrinkError` when the plan was made for another model."""
    import sparsify_fx as sf
    if plan.source is not model:
        raise ShrinkError(f"this plan was made for another {type(plan.source).__name__} "
                          f"instance; make it with plan_hf(model, ...) for this one")
    small = sf.shrink(plan.model).train(model.training)
    if getattr(model, "config", None) is not None and hasattr(small, "config"):
        small.config.use_cache = getattr(model.config, "use_cache", None)  # plan_hf turned it off
    return small


__all__ = ["shrink_hf"]
