"""Channel structure of module graphs (torch.fx traces): the channel walk
(``analysis`` + ``layout_rules``), its result types (``graph_types``), attention heads
as channel groups (``attention_heads``), and the coupling pass that gives each tied
set one shared mask (``couple``). Read-only except ``couple``, which mutates the
GraphModule it is given.

May import: the core modules, ``passes.aten`` (the ATen walk, for torch.export
captures), ``passes.stored_analysis`` and ``passes.pass_base``.
"""
