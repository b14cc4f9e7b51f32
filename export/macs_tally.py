"""MAC bookkeeping lives in :mod:`sparsify_fx.passes.macs_tally`; re-exported here for
existing imports."""
from __future__ import annotations

from sparsify_fx.passes.macs_tally import (ATTENTION_IN, MacCount, NodeMacs, OtherOp, Tally,
                                           WeightUse, conv_kind)

__all__ = ["WeightUse", "OtherOp", "NodeMacs", "MacCount", "Tally", "conv_kind", "ATTENTION_IN"]
