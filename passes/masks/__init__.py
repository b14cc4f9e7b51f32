"""Mask passes: which weights are prunable (``find_weights``), mask nodes on graph
weights (``insert_masks``), masks on leaf-module weights through parametrize
(``parametrize_weights``), and folding hard masks into weights (``fold_masks``).

May import: the core modules and ``sparsify_fx.capture.fx_trace``.
"""
