"""Compatibility names: the MACs bookkeeping now lives in :mod:`sparsify_fx.cost_model`.

``ChannelMacs`` is :class:`~sparsify_fx.cost_model.ChannelCost` (the MACs instance,
``unit="MACs"``, remainder 0) and ``channel_macs`` builds it; the same class carries
onnxruntime latency (:func:`~sparsify_fx.cost_model.channel_latency`).
"""
from __future__ import annotations

from .cost_model import ChannelCost, ChannelMacs, channel_graph, channel_macs, is_coupled

__all__ = ["ChannelCost", "ChannelMacs", "channel_graph", "channel_macs", "is_coupled"]
