"""``sparsify-fx prune``: the whole pipeline as one command, driven by a TOML recipe.

Modules: :mod:`.recipe` (keys, types, TOML), :mod:`.datasets` (DATA kinds),
:mod:`.outdir` (OUTDIR layout, recipe guard, atomic writes), :mod:`.run`
(phases, resume, torchrun), :mod:`.outputs` (model.pt, reports, ONNX, summary;
:func:`load_pruned`), :mod:`.task` (batching and metric of a run), :mod:`.hf_task`
(``hf:DIR`` Hugging Face folders) and :mod:`.text_data` (``text:FILE``). Its
arguments are parsed by ``sparsify_fx.cli.prune``.

May import: anything in the package but ``sparsify_fx.cli`` other than
``sparsify_fx.cli.model_inputs`` (how MODEL is loaded).
"""
from __future__ import annotations

from typing import Any


def load_pruned(path: Any, trust_pickle: bool = False) -> Any:
    """Rebuild OUTDIR/model.pt as a plain model (see :func:`.outputs.load_pruned`)."""
    from sparsify_fx.prune.outputs import load_pruned as _load
    return _load(path, trust_pickle)


__all__ = ["load_pruned"]
