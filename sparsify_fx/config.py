"""What ``transform`` was asked for, kept on the returned model (``model.sparsify_config``).

A core module (no torch.fx, no passes): passes, budgets, methods and export read
the config through :func:`config_of` without importing :mod:`sparsify_fx.prepare`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

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
    #: fraction of the dense onnxruntime latency (channel CS; sparsify_fx.cost_model)
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


def config_of(model: nn.Module) -> SparsifyConfig | None:
    """The SparsifyConfig transform left on ``model`` (None if absent)."""
    return getattr(model, CONFIG_ATTRIBUTE, None)


__all__ = ["CONFIG_ATTRIBUTE", "SparsifyConfig", "config_of"]
