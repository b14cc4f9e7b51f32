"""The channel walk over ATen graphs (torch.export captures): an id tensor per value,
shape ops replayed on it (``channel_walk``), producer and attention rules
(``producers``), elementwise / reduction / norm rules (``elementwise``), two-operand
``einsum`` (``einsum``), no-grad regions, in-place ops,
ops on weights and complex views (``special_ops``), parameters read element by element
through shape ops (``gathered``: a per-head bias per bucket), the op tables
(``op_tables``) and the plain values they share (``values``). Read-only.

May import: the core modules and ``passes.channels.graph_types``.
"""
