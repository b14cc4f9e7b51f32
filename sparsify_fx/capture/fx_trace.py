"""Tracing pass: nn.Module -> torch.fx.GraphModule, with a partial-graph fallback.

The tracer keeps stateful or mode-dependent modules (BatchNorm, Dropout,
MultiheadAttention, every other ``torch.nn`` module) as leaves, but traces
*through* Conv/ConvTranspose/Linear so each of their weights appears as a
``get_attr`` node that a mask node can follow.

Python control flow on ``self.training`` is resolved at trace time: trace the
model in the mode you will train it in (BatchNorm/Dropout stay leaves, so their
own mode switching still works).
"""
from __future__ import annotations

import inspect
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from torch import fx, nn

from sparsify_fx.errors import TraceError
from sparsify_fx.capture.rng_guard import refuse_random_draws

#: Module types whose forward is traced through so the weight is a get_attr node.
TRACED_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


#: torch.nn containers a partial trace looks into (fx counts them as leaves)
CONTAINERS: tuple[type[nn.Module], ...] = (nn.ModuleList, nn.ModuleDict)


class SparsifyTracer(fx.Tracer):
    """fx.Tracer that traces through Conv/Linear and honours user leaf modules.

    ``leaf_modules`` holds module types and/or qualified module names to keep
    opaque (their weights are then masked by parametrization instead).
    """

    def __init__(self, leaf_modules: Iterable[type[nn.Module] | str] = ()) -> None:
        super().__init__()
        leaves = tuple(leaf_modules)
        self.leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self.leaf_names = {t for t in leaves if isinstance(t, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if isinstance(m, TRACED_THROUGH + CONTAINERS):  # containers: their children count
            return False
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, leaf_modules: Sequence[type[nn.Module] | str] = (),
          concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``module`` whole; raises whatever torch.fx raises on failure.

    The returned GraphModule shares parameters with ``module`` (no copy).
    """
    tracer = SparsifyTracer(leaf_modules)
    with refuse_random_draws("torch.fx"):
        graph = tracer.trace(module, concrete_args=concrete_args)
    name = type(module).__name__
    return fx.GraphModule(tracer.root, graph, name)


def absent_defaults(module: nn.Module, n_args: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``concrete_args`` for a trace driven by keyword inputs: every parameter of
    ``module.forward`` past the first ``n_args`` positional ones that ``kwargs`` does not
    name and that has a default, fixed to that default (so ``if mask is not None``
    follows the inputs given). Read-only."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    plain = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                         p.POSITIONAL_OR_KEYWORD)][:n_args]
    return {p.name: p.default for p in plain
            if p.name not in kwargs and p.name not in positional and p.default is not p.empty}


@dataclass(frozen=True)
class TraceFailure:
    """A module path that did not trace, with the construct that stopped it."""

    path: str
    reason: str
    where: str

    def __str__(self) -> str:
        label = self.path or "<root>"
        return f"{label}: {self.reason}" + (f" (at {self.where})" if self.where else "")


#: Frames in these paths are the tracer's own, not the model's code.
_LIBRARY_PATHS = ("/torch/fx/", "/torch/export/", "/torch/_export/", "/torch/_dynamo/",
                  "/torch/_subclasses/", "/torch/_ops.py", "/torch/_prims", "/torch/_refs",
                  "/torch/_decomp", "/torch/_higher_order_ops/", "/torch/_functorch/",
                  "/torch/utils/", "/torch/_library/", "/torch/_tensor.py", "/torch/__init__.py",
                  "/sparsify_fx/",
                  "/passes/", "<eval_with_key>")

#: Reasons that come from Python control flow on a traced value (concrete_args helps).
CONTROL_FLOW = ("control flow", "cannot be iterated", "Proxy", "bool(")


def describe_failure(path: str, exc: BaseException) -> TraceFailure:
    """Find the model-code line that made capture fail (the last frame outside torch)."""
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not any(part in frame.filename for part in _LIBRARY_PATHS):
            where = f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
            break
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return TraceFailure(path, reason, where)


@dataclass
class PartialTrace:
    """Result of :func:`trace_partially`.

    ``root`` is the (mutated) module: every submodule that traced was replaced
    in place by its GraphModule, listed in ``traced`` by path. ``failures`` names
    every module that did not trace.
    """

    root: nn.Module
    traced: dict[str, fx.GraphModule]
    failures: list[TraceFailure]


def _holds(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    return any(isinstance(m, types) for m in module.modules())


def trace_partially(module: nn.Module, prunable: tuple[type[nn.Module], ...],
                    leaf_modules: Sequence[type[nn.Module] | str] = (),
                    concrete_args: dict[str, Any] | None = None,
                    path: str = "") -> PartialTrace:
    """Trace ``module`` whole, else its largest children that trace, recursively.

    Mutates ``module``: traced children are swapped for their GraphModules.
    Children with no ``prunable`` module inside are left alone; bare prunable
    modules and leaf modules (e.g. nn.MultiheadAttention) under an untraceable
    parent are left for parametrization.
    """
    failures: list[TraceFailure] = []
    if not isinstance(module, CONTAINERS):  # no forward of their own: only children trace
        try:
            gm = trace(module, leaf_modules, concrete_args if not path else None)
            return PartialTrace(gm, {path: gm}, [])
        except Exception as exc:  # noqa: BLE001 - any trace failure triggers the fallback
            failures = [describe_failure(path, exc)]
    traced: dict[str, fx.GraphModule] = {}
    leaf_check = SparsifyTracer(leaf_modules)
    for name, child in list(module.named_children()):
        child_path = f"{path}.{name}" if path else name
        if (isinstance(child, TRACED_THROUGH) or not _holds(child, prunable)
                or leaf_check.is_leaf_module(child, child_path)):
            continue  # bare prunable modules and leaves are parametrized instead
        sub = trace_partially(child, prunable, leaf_modules, None, child_path)
        if sub.root is not child:
            setattr(module, name, sub.root)
        traced.update(sub.traced)
        failures.extend(sub.failures)
    return PartialTrace(module, traced, failures)


def raise_untraceable(failures: list[TraceFailure],
                      export_failure: TraceFailure | str | None = None,
                      example_inputs_given: bool = False) -> None:
    """Raise the TraceError users see when no capture worked.

    Names the torch.fx failures (``failures``: the root first, then submodules),
    the torch.export failure (or, as text, why it was not tried), the construct at fault,
    and only the fixes that apply.
    """
    listed = "\n  ".join(f"torch.fx {f}" for f in failures[:8])
    if isinstance(export_failure, TraceFailure):
        listed += f"\n  torch.export {export_failure}"
    else:
        listed += f"\n  torch.export: not tried ({export_failure or 'no example_inputs given'})"
    fixes = []
    if not example_inputs_given:
        fixes.append("pass `example_inputs=` (a tuple of tensors the model accepts, or a dict "
                     "of keyword tensors) so "
                     "torch.export can capture it: it resolves Python control flow for those "
                     "inputs, shape branches included")
    children = sorted({f.path for f in failures if f.path})
    fixes.append("keep the failing submodules opaque with `leaf_modules=` (types or qualified "
                 f"names{': ' + ', '.join(children[:6]) if children else ''}); their weights "
                 "are then masked by parametrization")
    if any(key in f.reason for f in failures for key in CONTROL_FLOW):
        fixes.append("fix the control flow on an input with `concrete_args=` (see "
                     "torch.fx.symbolic_trace), if it branches on a flag rather than a tensor")
    raise TraceError(
        "sparsify_fx could not capture the model or any submodule that holds weights:\n  "
        f"{listed}\nFixes that apply:\n  - " + "\n  - ".join(fixes)
    )


__all__ = [
    "SparsifyTracer", "TRACED_THROUGH", "trace", "trace_partially", "PartialTrace",
    "TraceFailure", "describe_failure", "raise_untraceable", "absent_defaults",
]
