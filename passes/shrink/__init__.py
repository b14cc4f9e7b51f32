"""Shrink: slice pruned channels out of a folded model.

``shrink_graph`` (Conv / BatchNorm / Linear of a GraphModule), ``attention`` +
``pruned_attention`` (fewer heads, same embed_dim), ``to_source`` (a torch.export
capture shrunk back into its source class), ``split_widths`` (the pieces a fused
projection is split into, whose sizes a module keeps in attributes), ``hf_config``
(what a Hugging Face config can describe after the cut) with ``config_probes`` (which
fields size which weights, and ``config_cannot_hold``) and ``config_search`` (the
fields of a block no named rule describes, checked by a reload), ``uniform_fields`` and
``experts``. Each returns a new module; inputs are not mutated
unless a function's doc says so.

May import: the core modules, ``passes.channels``, ``passes.masks``,
``passes.stored_analysis``, ``passes.aten.values`` (plain node helpers).

``from sparsify_fx.passes.shrink import shrink`` (the flat module of earlier
releases) keeps working: names of ``shrink_graph`` are looked up on first use.
"""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    shrink_graph = importlib.import_module("sparsify_fx.passes.shrink.shrink_graph")
    try:
        return getattr(shrink_graph, name)
    except AttributeError:
        raise AttributeError(f"module 'sparsify_fx.passes.shrink' has no attribute {name!r}") from None
