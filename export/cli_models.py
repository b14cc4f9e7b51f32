"""Shared command-line inputs of ``sparsify-fx report`` and ``sparsify-fx export``.

``parse_shape("1,3,224,224")`` and ``load_model(spec)``, where ``spec`` is a
file written by ``torch.save(model)`` (a whole module), ``torchvision:<name>``
or a bare torchvision model name (both built with ``weights=None``: nothing
downloads).
"""
from __future__ import annotations

import difflib
import os

import torch
from torch import nn

from sparsify_fx.errors import InputError


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` -> ``(1, 3, 224, 224)``; InputError otherwise."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"--input-shape {text!r} is not a shape; write e.g. 1,3,224,224")
    return shape


def _torchvision(name: str) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise InputError(f"{name!r} is neither an existing file nor a torchvision model name"
                         + (f"; did you mean {', '.join(close)}?" if close else
                            "; see torchvision.models.list_models()"))
    return tvm.get_model(name, weights=None).eval()


def load_model(spec: str) -> nn.Module:
    """A module from a ``torch.save`` file, ``torchvision:<name>`` or a torchvision name."""
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1])
    if not os.path.isfile(spec):
        if os.sep in spec or spec.endswith((".pt", ".pth", ".pkl")):
            raise InputError(f"model file {spec!r} not found; pass a torch.save(model) file, "
                             "torchvision:<name> or a torchvision model name")
        return _torchvision(spec)
    try:
        obj = torch.load(spec, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling raises anything
        raise InputError(f"cannot load {spec!r} with torch.load: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise InputError(f"{spec!r} holds a {type(obj).__name__}, not an nn.Module; save the "
                         "whole model with torch.save(model, path), not its state_dict")
    return obj
