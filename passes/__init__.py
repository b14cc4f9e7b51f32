"""torch.fx graph passes, one job per file, in sub-packages by concept.

* :mod:`.pass_base`: the pass contract (``SparsifyPass``, ``run_passes``).
* :mod:`.stored_analysis`: analyses computed once and kept in ``gm.meta``.
* :mod:`.masks`: find prunable weights, insert mask nodes, parametrize leaf weights, fold.
* :mod:`.channels`: the channel walk over module graphs, attention heads, coupling.
* :mod:`.aten`: the channel walk over ATen graphs (torch.export captures).
* :mod:`.shrink`: slice pruned channels out (GraphModule, attention, source class, HF config).
* :mod:`.macs`: the one MAC counter and its bookkeeping.

Capture (fx tracing, torch.export in both modes) lives in :mod:`sparsify_fx.capture`.

May import: the core modules (``errors``, ``config``, ``mask``, ``mask_index``,
``granularity``) and the capture leaves (``capture.fx_trace``, ``capture.export_modes``,
``capture.rng_guard``, ``capture.inputs``); never ``sparsify_fx.export`` nor ``prepare``.

The flat module paths of earlier releases (``sparsify_fx.passes.shrink_source``, ...)
still import: :mod:`.moved` maps each to its new home.
"""
from sparsify_fx.passes.moved import install_moved_module_finder

install_moved_module_finder()
