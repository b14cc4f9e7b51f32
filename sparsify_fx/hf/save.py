"""``safe_save(model, folder)``: ``save_pretrained`` that never writes a folder which
``from_pretrained`` cannot load.

A shrunk Hugging Face model (``sparsify_fx.shrink`` of a torch.export capture) keeps
its class and config; the config describes the shrunk widths only when every layer of
a kind kept the same widths and the config has fields for them
(``passes/shrink/hf_config.py``). ``shrink`` records the parameters the config cannot
rebuild (``model.sparsify_config_gaps``); for any other model they are found here by
building the class from its config on the meta device. Either way, when the config
does not describe the model, :class:`~sparsify_fx.errors.ShrinkError` names the first
parameter, its shape, the shape the config builds, the field meant to hold it and the
fix (``apply_budget(..., uniform=True)`` or ``transform(..., exclude=config_cannot_hold(gm))``)
before anything is written. ``model`` is only read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sparsify_fx.errors import ShrinkError
from sparsify_fx.passes.shrink.hf_config import GAPS_ATTRIBUTE, config_gaps, unsaveable


def safe_save(model: nn.Module, folder: str | Path, **kwargs: Any) -> Path:
    """``model.save_pretrained(folder, **kwargs)`` when its config describes it (see
    module doc), else :class:`ShrinkError` with nothing written. Returns ``folder``."""
    if not hasattr(type(model), "save_pretrained"):
        raise ShrinkError(f"{type(model).__name__} has no save_pretrained; safe_save is for "
                          "Hugging Face models (save a state_dict with torch.save instead)")
    recorded = model.__dict__.get(GAPS_ATTRIBUTE)
    gaps = config_gaps(model) if recorded is None else recorded
    if gaps:
        raise unsaveable(model, gaps)
    type(model).save_pretrained(model, folder, **kwargs)  # the class's own, never a guard
    return Path(folder)


__all__ = ["safe_save"]
