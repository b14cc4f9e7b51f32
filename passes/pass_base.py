"""The one pass contract, after ``torch.fx.passes.infra.pass_base``.

A pass is a small object built with everything it needs except the module; calling
it on the module runs it: ``result = SomePass(...)(module)``, and ``result`` is a
``torch.fx.passes.infra.pass_base.PassResult`` (``graph_module``, ``modified``).
What a pass computes beyond the module lives on the pass object or in
``node.meta``. ``module`` is the transformed model: a GraphModule, or the
partially traced module tree whose traced children are GraphModules.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class SparsifyPass(PassBase):
    """Base of sparsify-fx passes: subclasses implement ``call(module) -> PassResult``."""

    def call(self, graph_module: nn.Module) -> PassResult:  # type: ignore[override]
        raise NotImplementedError(f"{type(self).__name__} must implement call(module)")


def run_passes(module: nn.Module, passes: Sequence[SparsifyPass]) -> tuple[nn.Module, bool]:
    """Run ``passes`` in order; returns the final module and whether any pass modified it."""
    modified = False
    for p in passes:
        result = p(module)
        assert result is not None, f"{type(p).__name__} returned no PassResult"
        module, modified = result.graph_module, modified or result.modified
    return module, modified


__all__ = ["SparsifyPass", "PassResult", "run_passes"]
