"""MAC counting lives in :mod:`sparsify_fx.passes.count_macs` (one counter for ``report``
and ``weight_costs``); this module re-exports it for existing imports."""
from __future__ import annotations

from sparsify_fx.passes.count_macs import (AtenCounter, GraphCounter, MacCount, NodeMacs, OtherOp,
                                           Tally, WeightUse, conv_kind, count_macs, mha_call)

__all__ = ["count_macs", "MacCount", "NodeMacs", "WeightUse", "OtherOp", "Tally", "GraphCounter",
           "AtenCounter", "conv_kind", "mha_call"]
