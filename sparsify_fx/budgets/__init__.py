"""Budgets: cutting masks to an exact target of sparsity, MACs or latency.

Holds :mod:`.exact_cut` (``apply_budget``, ``weight_costs``, ``macs_fraction``),
:mod:`.cut_result` (``CutResult`` and the top-k selection every cut shares),
:mod:`.channel_cut` (the coupled channel cut: whole groups in blocks of
``round_to``) and :mod:`.cost_model` (one cost model of a coupled channel model
as shrink will leave it: MACs or onnxruntime milliseconds).

May import: the core modules, ``sparsify_fx.passes`` and ``latency`` (measured
latency costs, the verified cut); never ``training``, ``export`` or ``cli``.
"""
