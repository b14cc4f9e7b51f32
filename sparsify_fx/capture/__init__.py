"""Capture: turning the user's ``nn.Module`` into a graph the passes can edit; the one
place capture lives.

Leaves (core imports only; ``passes`` may import them): :mod:`.fx_trace`
(``SparsifyTracer``: torch.fx tracing through known leaf modules), :mod:`.export_modes`
(torch.export in train and eval mode, specialisation report, mask mirroring),
:mod:`.rng_guard` (refuse random draws while capturing), :mod:`.inputs`
(``ModelInputs``: positional + keyword example inputs) and :mod:`.exported_module`
(the module an exported program runs as).

Choosers (may import ``sparsify_fx.passes``): :mod:`.capture_model` (torch.fx or
torch.export, partial traces, ``PartialTraceWarning``) and :mod:`.channel_capture`
(``capture='auto'`` with channel granularity).

Never imports ``training``, ``budgets``, ``export`` or ``cli``.
"""
