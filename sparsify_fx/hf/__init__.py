"""Hugging Face: what stays specific to ``transformers`` models.

Holds :mod:`.heads` (``plan_hf``, ``freeze_plan``: attention heads and MLP
units of a Hugging Face encoder as maskable groups) and :mod:`.shrink`
(``shrink_hf``: slice a model to its kept heads and units, keeping its class).

May import: the core modules, ``sparsify_fx.passes`` and ``transformers``
(imported inside functions: it is an optional extra); never ``export`` or ``cli``.
"""
