"""MAC counting: the one counter (``count``: an fx Interpreter writing each node's
shapes and MACs into ``node.meta``) and its bookkeeping (``tally``).

May import: the core modules and ``sparsify_fx.capture.fx_trace``.
"""
