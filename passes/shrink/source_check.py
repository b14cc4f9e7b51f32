"""Checks of a capture shrunk into its source class (read-only unless said):

* :func:`check_against_capture`: the shrunk model equals the hard-masked capture on the
  example inputs (``ShrinkError`` naming why not);
* :func:`retry_widths`: after a failed check, the owner attributes that may hold a
  group's width or unit count set to the kept value, the smallest subset that makes the
  check pass (mutates the shrunk model);
* :func:`reload_check`: whether the source class built from a config, with the shrunk
  weights loaded, computes what the capture does (what ``from_pretrained`` of a saved
  folder would give).
"""
from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable

import torch
from torch import nn

from sparsify_fx.errors import ShrinkError
from sparsify_fx.mask_index import hard_masks, main_graph

#: up to this many attribute names, every subset is tried (each a forward pass)
MAX_RETRY_NAMES = 8
#: with more names, the subsets of up to this many are tried
MAX_RETRY_SUBSET = 3


def set_widths(src: nn.Module, blocks: dict, which: int,
                names: set[str] | None = None) -> None:
    """Every block's other width attributes (those called one of ``names``; None: all) at
    their old (``which=0``) or new value (1)."""
    for block in blocks.values():
        for key, values in block.get("_extra", {}).items():
            path, _, attr = key.partition(":")
            if names is None or attr in names:
                setattr(src.get_submodule(path) if path else src, attr, values[which])


def retry_widths(exported: nn.Module, src: nn.Module, blocks: dict, inputs: Any,
                  error: ShrinkError) -> None:
    """After the shrunk model failed its check (``error``): set the owner attributes
    holding a group's whole width or unit count (``to_source._other_widths``) to the kept
    value and check again: every subset of the attribute names, the smallest first, so
    only what the code reads changes (a module may hold another number equal to the
    width by chance, e.g. a kernel size of 4 beside a rank of 4; over
    :data:`MAX_RETRY_NAMES` names: all, the subsets of up to :data:`MAX_RETRY_SUBSET`, then all
    but one); kept when the
    model then equals the hard-masked capture, else undone and ``error`` raised."""
    names = sorted({key.partition(":")[2] for b in blocks.values() for key in b.get("_extra", {})})
    if inputs is None or not names:
        raise error
    options: list[set[str] | None] = [None]
    if 1 < len(names) <= MAX_RETRY_NAMES:  # every subset, the smallest first
        options = [set(c) for size in range(1, len(names) + 1)
                   for c in itertools.combinations(names, size)]
    elif len(names) > 1:  # subsets of up to MAX_RETRY_SUBSET names, then all but one
        options += [set(c) for size in range(1, MAX_RETRY_SUBSET + 1)
                    for c in itertools.combinations(names, size)]
        options += [set(names) - {name} for name in names]
    for chosen in options:
        set_widths(src, blocks, 1, chosen)
        try:
            check_against_capture(exported, src, inputs)
            return
        except ShrinkError:
            set_widths(src, blocks, 0, chosen)
    raise error from None


def outputs_of(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in outputs_of(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in outputs_of(o)]
    return []


def by_name(model: nn.Module, small: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The capture's positional example inputs as keywords of the source class (named as
    the capture's inputs): a keyword input the capture took positionally may sit at
    another position of the source ``forward`` (``attention_mask`` after
    ``past_key_values``)."""
    gm = main_graph(model)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"] if gm is not None else []
    try:
        accepted = inspect.signature(small.forward).parameters
    except (TypeError, ValueError):
        return args, kwargs
    if not args or len(names) != len(args) or not all(n in accepted for n in names):
        return args, kwargs
    return (), {**dict(zip(names, args)), **kwargs}


def check_against_capture(model: nn.Module, small: nn.Module, inputs: Any) -> None:
    if inputs is None:
        return
    args, kwargs = (inputs.args, inputs.kwargs) if hasattr(inputs, "kwargs") else (tuple(inputs), {})
    was = model.training
    model.eval()
    small.eval()
    small_args, small_kwargs = by_name(model, small, args, kwargs)
    try:
        with torch.no_grad(), hard_masks(model):
            ref = outputs_of(model(*args, **kwargs))
            got = outputs_of(small(*small_args, **small_kwargs))
    except (RuntimeError, IndexError, ValueError) as exc:  # a width read from an attribute
        raise ShrinkError(f"the shrunk {type(small).__name__} does not run on the example inputs "
                          f"({exc}); its code reads a width this shrink does not update") from exc
    finally:
        model.train(was)
    for a, b in zip(ref, got):
        scale = float(a.abs().max()) if a.numel() else 0.0
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(scale, 1.0)):
            raise ShrinkError(f"the shrunk {type(small).__name__} differs from the hard-masked "
                              "capture; its code reads a width this shrink does not update")


def reload_check(model: nn.Module, src: nn.Module, inputs: Any) -> Callable[[Any], bool] | None:
    """``check(config)``: the class of ``src`` built from ``config`` with ``src``'s
    weights and buffers loaded computes what the hard-masked capture ``model`` does on
    the example inputs (what ``from_pretrained`` of a saved folder would give); None
    when there are no inputs or the config sits below the model's top."""
    if inputs is None or not hasattr(getattr(src, "config", None), "to_dict"):
        return None

    def check(config: Any) -> bool:
        try:
            with torch.device("meta"):
                fresh = type(src)(config)
            params = dict(src.named_parameters())
            loaded = fresh.load_state_dict(
                {k: v for k, v in src.state_dict().items() if k in params}, strict=False,
                assign=True)
            if loaded.unexpected_keys:
                return False
            buffers = dict(src.named_buffers())
            for name, buf in list(fresh.named_buffers()):
                if buf.is_meta:  # buffers are the shrunk model's own (rotary inv_freq)
                    mine = buffers.get(name)
                    if mine is None or mine.shape != buf.shape:
                        return False
                    owner, _, attr = name.rpartition(".")
                    (fresh.get_submodule(owner) if owner else fresh)._buffers[attr] = mine.clone()
            if any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()]):
                return False
            check_against_capture(model, fresh, inputs)
        except Exception:  # noqa: BLE001  a config that does not rebuild this model
            return False
        return True

    return check


__all__ = ["check_against_capture", "retry_widths", "reload_check", "set_widths", "outputs_of",
           "by_name", "MAX_RETRY_NAMES", "MAX_RETRY_SUBSET"]
