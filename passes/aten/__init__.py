"""The channel walk over ATen graphs (torch.export captures): an id tensor per value,
shape ops replayed on it (``channel_walk``), producer and attention rules
(``producers``), elementwise / reduction / norm rules (``elementwise``) and the plain
values they share (``values``). Read-only.

May import: the core modules and ``passes.channels.graph_types``.
"""
