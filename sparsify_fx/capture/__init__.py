"""Capture: turning the user's ``nn.Module`` into a graph the passes can edit.

Holds :mod:`.capture_model` (choose torch.fx or torch.export, partial traces,
the ``PartialTraceWarning``) and :mod:`.exported_module` (the module wrapper an
exported program runs as). The tracing passes themselves live in
``sparsify_fx.passes`` (``trace.py``, ``capture_export.py``).

May import: the core modules (``errors``, ``config``, ``mask``, ``mask_index``)
and ``sparsify_fx.passes``; never ``training``, ``budgets``, ``export`` or ``cli``.
"""
