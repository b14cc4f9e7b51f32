"""Hugging Face: what stays specific to ``transformers`` models.

Holds presets over the general structured path: :mod:`.heads` (``plan_hf``: a
one-shot L1 cut of heads, KV groups and MLP units read from the ATen graph) and
:mod:`.shrink` (``shrink_hf``: the smaller source class of a plan).

May import: the core modules, ``sparsify_fx.passes``, ``sparsify_fx.export.report``
(the blocks' MACs a plan is cut to) and ``transformers`` (inside functions: an optional
extra); never ``cli``.
"""
