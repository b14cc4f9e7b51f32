"""``ModelInputs``: example inputs as positional tensors and keyword tensors.

Every API that runs the model on example inputs (``transform``, ``report``,
``export_onnx``, ``weight_costs``, ``calibrate``, the latency probe) accepts

* a tensor, or a tuple/list of positional inputs (as before), or
* a ``Mapping[str, Tensor]`` of keyword inputs: what a Hugging Face tokenizer or
  processor returns (``model(**tok)``), or
* a :class:`ModelInputs` (``args`` and ``kwargs`` together),

and turns it into a :class:`ModelInputs` with :func:`as_model_inputs`, the one place
inputs are normalised. :meth:`ModelInputs.check_against` refuses a keyword the
forward does not name (:class:`~sparsify_fx.errors.InputError`, naming the key and
the parameters it takes); :meth:`ModelInputs.positional` binds keywords to a
module's positional parameters (graph interpreters and ONNX sessions take inputs in
that order).

A core-level leaf: imports only torch and ``sparsify_fx.errors``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from sparsify_fx.errors import InputError


@dataclass(frozen=True)
class ModelInputs:
    """Inputs of one call ``model(*args, **kwargs)``.

    ``args``: positional inputs (tensors, or nested lists/tuples of them).
    ``kwargs``: keyword tensors, in the caller's order. Immutable; :meth:`map`
    returns a new one.
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def keywords(self) -> bool:
        """True when any input is given by keyword."""
        return bool(self.kwargs)

    def call(self, model: Callable[..., Any]) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **dict(self.kwargs))

    def map(self, fn: Callable[[Tensor], Any]) -> "ModelInputs":
        """A copy with ``fn`` applied to every tensor (nested containers kept)."""
        def apply(x: Any) -> Any:
            return fn(x) if isinstance(x, Tensor) else x
        return ModelInputs(tuple(tree_map(apply, list(self.args))),
                           {k: tree_map(apply, v) for k, v in self.kwargs.items()})

    def tensors(self) -> list[Tensor]:
        """Every tensor, positional ones first, then keywords in order."""
        return [t for t in tree_leaves((list(self.args), list(self.kwargs.values())))
                if isinstance(t, Tensor)]

    def named(self, positional_names: Callable[[int], str] | None = None
              ) -> list[tuple[str, Any]]:
        """(name, value) per flat input: keywords by key, positional ones by
        ``positional_names(i)`` (default ``input_{i}``)."""
        name = positional_names or (lambda i: f"input_{i}")
        return [(name(i), a) for i, a in enumerate(self.args)] + list(self.kwargs.items())

    def shapes(self) -> list[tuple[int, ...]]:
        """Shape of every tensor, in :meth:`tensors` order."""
        return [tuple(int(s) for s in t.shape) for t in self.tensors()]

    @property
    def batch_size(self) -> int:
        """Dim 0 of the first tensor (1 for a scalar or no tensor)."""
        ts = self.tensors()
        return int(ts[0].shape[0]) if ts and ts[0].dim() else 1

    def same_batch(self) -> bool:
        """Every input is a flat tensor with at least one dim, all of the same dim 0."""
        flat = list(self.args) + list(self.kwargs.values())
        if not flat or not all(isinstance(t, Tensor) and t.dim() for t in flat):
            return False
        return len({int(t.shape[0]) for t in flat}) == 1

    def repeat_batch(self, times: int = 2) -> "ModelInputs":
        """Every tensor with a dim repeated ``times`` times along dim 0."""
        return self.map(lambda t: torch.cat([t] * times) if t.dim() else t)

    def check_against(self, model: nn.Module, what: str = "example_inputs") -> None:
        """InputError for a keyword ``model.forward`` does not name, or one that is also
        given positionally (read-only)."""
        if not self.kwargs:
            return
        params = _parameters(model)
        if params is None:
            return
        named = [p.name for p in params.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        positional = [p.name for p in params.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for key in self.kwargs:
            if not isinstance(key, str) or key not in named:
                extra = (" (its **kwargs are not model inputs: name tensor inputs as "
                         "parameters)" if any(p.kind is p.VAR_KEYWORD for p in params.values())
                         else "")
                raise InputError(
                    f"{what} has keyword {key!r}, which {type(model).__name__}.forward does "
                    f"not take{extra}; it accepts {', '.join(named) or 'no keywords'}. "
                    "Rename or drop the key")
            if key in positional[:len(self.args)]:
                raise InputError(f"{what} gives {key!r} both positionally and by keyword; "
                                 "pass it once")

    def positional(self, model: nn.Module) -> tuple[Any, ...]:
        """The inputs as one positional tuple for ``model.forward``: keywords bound to its
        parameters, parameters skipped in between given their defaults. InputError when a
        keyword can only be passed by keyword (keyword-only, or absent from the signature)."""
        if not self.kwargs:
            return tuple(self.args)
        params = _parameters(model)
        order = [] if params is None else [
            p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in order]
        missing = [k for k in self.kwargs if k not in names]
        if missing:
            raise InputError(f"keyword input {missing[0]!r} cannot be passed positionally to "
                             f"{type(model).__name__} (its positional parameters: "
                             f"{', '.join(names) or 'none'}); call it with keywords")
        last = max(names.index(k) for k in self.kwargs)
        out = list(self.args)
        for p in order[len(out):last + 1]:
            if p.name in self.kwargs:
                out.append(self.kwargs[p.name])
            elif p.default is not p.empty:
                out.append(p.default)
            else:
                raise InputError(f"{type(model).__name__}.forward needs {p.name!r}, which the "
                                 f"inputs do not give; pass it")
        return tuple(out)

    def describe(self) -> str:
        """``(int64[2, 12], ...)`` / ``{input_ids: int64[2, 12], ...}`` for messages."""
        def one(t: Any) -> str:
            if isinstance(t, Tensor):
                return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
            return type(t).__name__
        parts = [one(a) for a in self.args] + [f"{k}: {one(v)}" for k, v in self.kwargs.items()]
        return ("{" if self.kwargs else "(") + ", ".join(parts) + ("}" if self.kwargs else ")")


def _parameters(model: nn.Module) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None


def as_model_inputs(example_inputs: Any, what: str = "example_inputs") -> ModelInputs | None:
    """``None`` -> None; a tensor, a tuple/list of (nested) tensors, a Mapping of keyword
    tensors (e.g. a tokenizer's ``BatchEncoding``) or a :class:`ModelInputs` -> ModelInputs.
    InputError for anything else (empty, non-tensor values)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, ModelInputs):
        return example_inputs
    if isinstance(example_inputs, Mapping):
        bad = [k for k, v in example_inputs.items()
               if not isinstance(k, str) or not isinstance(v, Tensor)]
        if not example_inputs or bad:
            got = (f"key {bad[0]!r} holding {type(example_inputs[bad[0]]).__name__}" if bad
                   else "an empty mapping")
            raise InputError(
                f"{what} as a mapping must map keyword names to tensors, got {got}; pass "
                "e.g. dict(tokenizer(texts, return_tensors='pt'))")
        return ModelInputs((), dict(example_inputs))
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)
    leaves = tree_leaves(list(args))
    if not args or not leaves or not all(isinstance(x, Tensor) for x in leaves):
        kinds = ", ".join(type(x).__name__ for x in args) or "nothing"
        raise InputError(f"{what} must be a tensor, a tuple of tensors or a dict of keyword "
                         f"tensors, got {kinds}; pass e.g. {what}=torch.randn(1, 3, 224, 224) "
                         f"or {what}=dict(tokenizer(texts, return_tensors='pt'))")
    return ModelInputs(args, {})


__all__ = ["ModelInputs", "as_model_inputs"]
