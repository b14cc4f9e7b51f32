"""What ``transform`` was asked for, kept on the returned model (``model.sparsify_config``).

A core module (no torch.fx, no passes): passes, budgets, methods and export read
the config through :func:`config_of` without importing :mod:`sparsify_fx.prepare`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from sparsify_fx.errors import InputError, TargetNotAppliedError

CONFIG_ATTRIBUTE = "sparsify_config"


@dataclass
class SparsifyConfig:
    """What transform was asked for; kept on the returned model as ``sparsify_config``.

    ``example_inputs``: the inputs given to ``transform`` (MACs-cost budgets need
    them), or None.
    """

    method: str
    granularity: str
    options: dict[str, Any]
    target_sparsity: float | dict[str, float] | None = None
    target_macs: float | None = None
    per_layer: bool = False
    untraced: list[str] = field(default_factory=list)
    example_inputs: tuple[Any, ...] | None = None
    #: fraction of the dense onnxruntime latency (channel CS; sparsify_fx.budgets.cost_model)
    target_latency: float | None = None

    @property
    def has_target(self) -> bool:
        return (self.target_sparsity is not None or self.target_macs is not None
                or self.target_latency is not None)

    def describe_target(self) -> str:
        """``target_sparsity=0.9`` / ``target_macs=0.5`` as the user wrote it."""
        if self.target_latency is not None:
            return f"target_latency={self.target_latency!r}"
        if self.target_macs is not None:
            return f"target_macs={self.target_macs!r}"
        return f"target_sparsity={self.target_sparsity!r}"


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    """``None``, a tensor, or a tuple/list of them -> ``None`` or a tuple; InputError otherwise."""
    if example_inputs is None:
        return None
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        kinds = ", ".join(type(x).__name__ for x in inputs) or "nothing"
        raise InputError(f"example_inputs must be a tensor or a tuple of tensors, got {kinds}; "
                         "pass e.g. example_inputs=torch.randn(1, 3, 224, 224)")
    return inputs


def config_of(model: nn.Module) -> SparsifyConfig | None:
    """The SparsifyConfig transform left on ``model`` (None if absent)."""
    cfg = getattr(model, CONFIG_ATTRIBUTE, None)
    if cfg is None:  # a deep copy of a GraphModule keeps only its ``meta`` dict
        meta = getattr(model, "meta", None)
        cfg = meta.get(CONFIG_ATTRIBUTE) if isinstance(meta, dict) else None
    return cfg


def attach_config(model: nn.Module, config: SparsifyConfig) -> None:
    """Keep ``config`` on ``model`` (mutates it): as an attribute, and in a GraphModule's
    ``meta`` too, which ``copy.deepcopy`` of a GraphModule preserves."""
    setattr(model, CONFIG_ATTRIBUTE, config)
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        meta[CONFIG_ATTRIBUTE] = config


def detach_config(model: nn.Module) -> None:
    """Remove the config from ``model`` (mutates it); fold does this."""
    if CONFIG_ATTRIBUTE in vars(model):
        delattr(model, CONFIG_ATTRIBUTE)
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        meta.pop(CONFIG_ATTRIBUTE, None)


def require_target_applied(model: nn.Module, action: str) -> None:
    """Raise :class:`TargetNotAppliedError` when ``transform`` was given a target and
    the model's masks were never cut to it (``action``: "fold", "shrink", ...). Read-only."""
    from sparsify_fx.mask_index import masks  # mask_index never imports config: no cycle
    cfg = config_of(model)
    if cfg is None or not cfg.has_target:
        return
    entries = [e for e in masks(model) if not e.mask.auxiliary]
    missing = [e.name for e in entries if not bool(e.mask.at_target)]
    if not missing:
        return
    from sparsify_fx.mask_index import sparsity
    now = float(sparsity(model)) if entries else float("nan")
    raise TargetNotAppliedError(
        f"cannot {action}: transform was asked for {cfg.describe_target()} but the masks were "
        f"never cut to it ({len(missing)} of {len(entries)} masks, e.g. {missing[0]}; hard "
        f"sparsity now {now:.4f}). Finish the scheduled epochs (the CSScheduler.step() that "
        "completes them cuts exactly), or call finalize() on the method's scheduler/callback, "
        f"or sparsify_fx.apply_budget(model, {cfg.describe_target()}) first.")


__all__ = ["CONFIG_ATTRIBUTE", "SparsifyConfig", "config_of", "normalize_inputs",
           "require_target_applied", "attach_config", "detach_config"]
