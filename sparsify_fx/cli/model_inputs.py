"""Model inputs of every ``sparsify-fx`` subcommand, loaded safely by default.

``MODEL`` is one of (following torch's own ``weights_only`` convention):

- ``torchvision:<name>`` (or a bare torchvision name): built with ``weights=None``;
- ``package.module:factory``: ``factory()`` is imported and called (the current
  directory is importable, as with ``python -m``);
- a file written by ``torch.save(model)`` (a whole pickled module): loaded ONLY
  with ``trust_pickle=True`` (``--trust-pickle``), because unpickling runs code
  from the file.

``weights`` (``--weights``) is a ``state_dict`` file loaded with
``torch.load(weights_only=True)`` into the built model (strict). Every failure
raises :class:`~sparsify_fx.errors.InputError` naming the problem and the fix.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from typing import Any

import torch
from torch import nn

from sparsify_fx.errors import InputError

TRUST_PICKLE_HELP = ("load MODEL from a whole pickled module (torch.save(model)); this RUNS "
                     "CODE FROM THE FILE: use it only for files you trust")
MODEL_HELP = ("torchvision:<name>, package.module:factory (with --weights state_dict.pt), or a "
              "torch.save(model) file (needs --trust-pickle)")


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


def import_object(spec: str, what: str = "factory") -> Any:
    """``package.module:name`` -> the object (the current directory is importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"{spec!r} is not package.module:{what}; write e.g. mypkg.models:{what}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import {module_name!r} for {spec!r} ({exc}); run from the "
                         "folder that holds the package or put it on PYTHONPATH") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        raise InputError(f"importing {module_name!r} raised {type(exc).__name__}: {exc}; "
                         "fix that module") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=3)
            raise InputError(f"{module_name!r} has no {part!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else
                                f"; name a {what} defined in {module_name}"))
        obj = getattr(obj, part)
    return obj


def call_imported(spec: str, what: str, returns: str, label: str = "") -> Any:
    """Import ``package.module:name`` and call it with no arguments; InputError (prefixed
    with ``label``, e.g. "--data ") when it is not callable or raises."""
    fn = import_object(spec, what)
    if not callable(fn):
        raise InputError(f"{label}{spec!r} is not callable; name a {what} that returns "
                         f"{returns} when called with no arguments")
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise InputError(f"{label}{spec}() raised {type(exc).__name__}: {exc}; the {what} must "
                         f"return {returns} when called with no arguments") from exc


def _from_factory(spec: str) -> nn.Module:
    model = call_imported(spec, "factory", "an nn.Module")
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _from_pickle(path: str) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling raises anything
        raise InputError(f"cannot load {path!r} with torch.load: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise InputError(f"{path!r} holds a {type(obj).__name__}, not an nn.Module; for a "
                         "state_dict pass MODEL as package.module:factory with --weights")
    return obj


def _refuse_pickle(path: str) -> None:
    """Explain why ``path`` is not loaded without --trust-pickle (it is never unpickled)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickled module fails the safe loader
        if "weights only" not in str(exc).lower():
            raise InputError(f"cannot read {path!r} as a torch.save file ({type(exc).__name__}:"
                             f" {' '.join(str(exc).split())[:200]}); check that the file is "
                             "complete") from None
        raise InputError(
            f"{path!r} is a pickled whole module: loading it runs code from the file. Pass "
            "--trust-pickle if you trust it, or save model.state_dict() and pass MODEL as "
            "package.module:factory with --weights FILE") from None
    kind = "a state_dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise InputError(f"{path!r} holds {kind}, not a model; pass MODEL as "
                     f"package.module:factory (or torchvision:<name>) with --weights {path}")


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` file, loaded with ``weights_only=True`` (no code runs)."""
    if not os.path.isfile(path):
        raise InputError(f"--weights file {path!r} not found; pass a torch.save(model."
                         "state_dict()) file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated file, pickled module, ...
        raise InputError(f"--weights {path!r} is not a state_dict loadable with "
                         f"weights_only=True ({type(exc).__name__}); save it with "
                         "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # our own model.pt from `sparsify-fx prune`
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"--weights {path!r} does not hold a state_dict (name -> tensor); save "
                         "it with torch.save(model.state_dict(), path)")
    return state


def _load_weights(model: nn.Module, path: str) -> None:
    try:
        model.load_state_dict(load_state_dict_file(path))
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:400]
        raise InputError(f"--weights {path!r} does not fit the model ({first}); pass the "
                         "factory the weights were saved from") from None


def load_model(spec: str, weights: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """Build ``spec`` (see module doc); never unpickles unless ``trust_pickle``."""
    if os.path.isfile(spec):
        if weights is not None:
            raise InputError(f"--weights goes with torchvision:<name> or package.module:factory,"
                             f" not with the model file {spec!r}")
        if not trust_pickle:
            _refuse_pickle(spec)
        return _from_pickle(spec)
    if spec.startswith("hf:"):
        raise InputError(f"{spec}: Hugging Face folders are a MODEL of `sparsify-fx prune` "
                         "(with --task); here pass torchvision:<name> or package.module:factory")
    if spec.startswith("torchvision:"):
        model = _torchvision(spec.split(":", 1)[1])
    elif ":" in spec:
        model = _from_factory(spec)
    elif os.sep in spec or spec.endswith((".pt", ".pth", ".pkl")):
        raise InputError(f"model file {spec!r} not found; pass torchvision:<name>, "
                         "package.module:factory with --weights, or an existing file")
    else:
        model = _torchvision(spec)
    if weights is not None:
        _load_weights(model, weights)
    return model


def check_runs(model: nn.Module, example: Any,
               fix: str = "fix --input-shape to the shape the model expects") -> None:
    """Run ``model`` once on ``example``; InputError (with ``fix``) if it raises."""
    inputs = example if isinstance(example, tuple) else (example,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        first = " ".join(str(exc).split())[:300]
        raise InputError(f"the model fails on an example input of shape {shapes} "
                         f"({type(exc).__name__}: {first}); {fix}") from None
    finally:
        model.train(was_training)
