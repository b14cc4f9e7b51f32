"""Capture: turn a module into graphs the mask passes can work on (used by ``transform``).

Three paths, tried in this order by ``capture="auto"``:

1. ``"fx"``: ``torch.fx.symbolic_trace`` of the whole model (the original path;
   modules stay modules, BatchNorm/Dropout are leaves).
2. ``"export"``: when symbolic tracing fails and ``example_inputs`` are given,
   ``torch.export.export(strict=False)`` in train and eval mode; the result is
   an :class:`~sparsify_fx.capture.exported_module.ExportedModule`.
3. partial: the largest submodules that symbolic_trace can trace, the rest
   masked by parametrization (:class:`PartialTraceWarning` names what did not
   trace, and why export did not apply).

``capture="fx"`` is paths 1 and 3 only (the behaviour before torch.export
support); ``capture="export"`` is path 2 only. When nothing works,
:class:`~sparsify_fx.errors.TraceError` names every failure and the fixes that
apply. ``working`` (a deep copy owned by ``transform``) is mutated; the user's
model never is.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import fx, nn

from sparsify_fx.capture.export_modes import (SpecializationWarning, export_both_modes,
                                               mirror_mask_nodes)
from sparsify_fx.capture.fx_trace import (TRACED_THROUGH, TraceFailure, absent_defaults,
                                      describe_failure, raise_untraceable, trace,
                                      trace_partially)

from sparsify_fx.errors import ConfigError, TraceError
from sparsify_fx.capture.exported_module import ExportedModule, wrap_exported
from sparsify_fx.capture.inputs import ModelInputs, as_model_inputs

CAPTURES = ("auto", "fx", "export")


class PartialTraceWarning(UserWarning):
    """Only parts of the model were traced; the rest is masked by parametrization."""


@dataclass
class Captured:
    """Result of :func:`capture_model`.

    ``model``: what ``transform`` returns (a GraphModule, a partially traced
    module tree, or an ExportedModule). ``root``/``graphs``: where weights are
    looked for and mask nodes go (``graphs`` maps a path in ``root`` to its
    GraphModule). ``path``: ``"fx"``, ``"export"`` or ``"partial"``.
    ``failures``: what did not trace (partial path only).
    """

    model: nn.Module
    root: nn.Module
    graphs: dict[str, fx.GraphModule]
    path: str
    failures: list[TraceFailure] = field(default_factory=list)

    def finish(self) -> None:
        """After mask insertion: give the eval graph the train graph's mask nodes."""
        if isinstance(self.model, ExportedModule):
            mirror_mask_nodes(self.model.train_graph, self.model.eval_graph)


def check_capture_options(capture: str, example_inputs: Any, dynamic_shapes: Any) -> None:
    """ConfigError for an unknown ``capture`` or options that need ``example_inputs``."""
    if capture not in CAPTURES:
        raise ConfigError(f"capture must be one of {', '.join(map(repr, CAPTURES))}, "
                          f"got {capture!r}")
    if example_inputs is None and (capture == "export" or dynamic_shapes is not None):
        what = "capture='export'" if capture == "export" else "dynamic_shapes="
        raise ConfigError(f"{what} needs example_inputs= (a tuple of tensors the model "
                          "accepts, or a dict of keyword tensors): torch.export runs the "
                          "model on them")
    if capture == "fx" and dynamic_shapes is not None:
        raise ConfigError("dynamic_shapes= applies to torch.export capture only; "
                          "use capture='auto' or 'export', or drop dynamic_shapes")


def _export(working: nn.Module, inputs: ModelInputs, dynamic_shapes: Any,
            fx_failure: TraceFailure | None) -> Captured:
    graphs = export_both_modes(working, inputs.args, dynamic_shapes, inputs.kwargs)
    model = wrap_exported(graphs.train, graphs.eval, working, graphs.input_names,
                          graphs.n_args, graphs.dynamic_dims)
    lines = list(graphs.specialised)
    if fx_failure is not None:
        lines.append(
            f"torch.fx could not trace {fx_failure} ; torch.export ran that code on the "
            "example inputs, so Python control flow there follows the branch those inputs "
            "took" + (f" (static dims: {'; '.join(graphs.static_dims)})"
                      if graphs.static_dims else ""))
    if lines:
        warnings.warn(SpecializationWarning(
            "sparsify_fx captured the model with torch.export; what it specialised:\n  "
            + "\n  ".join(lines) + "\nPass dynamic_shapes= (as for torch.export.export) to "
            "keep more dims dynamic."), stacklevel=4)
    return Captured(model, graphs.train, {"": graphs.train}, "export")


def capture_model(working: nn.Module, *, capture: str = "auto",
                  example_inputs: ModelInputs | Sequence[Any] | None = None,
                  dynamic_shapes: Any = None,
                  leaf_modules: Sequence[type[nn.Module] | str] = (),
                  concrete_args: dict[str, Any] | None = None) -> Captured:
    """Capture ``working`` by the first path that works (see the module docstring).

    ``example_inputs``: a :class:`~sparsify_fx.capture.inputs.ModelInputs` (or what
    :func:`~sparsify_fx.capture.inputs.as_model_inputs` takes). With keyword inputs,
    torch.fx traces the parameters they do not give as concrete placeholders fixed to
    their defaults (``concrete_args``; ``if mask is not None`` then follows the inputs),
    and torch.export captures with ``kwargs=``: the result takes the same keywords.
    Mutates ``working`` (the partial path swaps traced children in). Raises
    :class:`TraceError` naming every failure when no path works.
    """
    example_inputs = as_model_inputs(example_inputs)
    check_capture_options(capture, example_inputs, dynamic_shapes)
    if example_inputs is not None and example_inputs.keywords:
        concrete_args = {**absent_defaults(working, len(example_inputs.args),
                                           example_inputs.kwargs), **(concrete_args or {})}
    fx_failure = export_failure = None
    if capture != "export":
        try:
            gm = trace(working, leaf_modules, concrete_args)
            return Captured(gm, gm, {"": gm}, "fx")
        except Exception as exc:  # noqa: BLE001 - any trace failure moves on
            fx_failure = describe_failure("", exc)
    if example_inputs is not None and capture != "fx":
        try:
            return _export(working, example_inputs, dynamic_shapes, fx_failure)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types
            export_failure = describe_failure("", exc)
            mode = getattr(exc, "capture_mode", "")
            if mode:
                export_failure = TraceFailure(export_failure.path, f"{export_failure.reason} "
                                              f"({mode}-mode capture)", export_failure.where)
            if capture == "export":
                raise TraceError(
                    f"torch.export could not capture {type(working).__name__}: "
                    f"{export_failure}\nFixes: check the model runs on example_inputs; for "
                    "data-dependent control flow see torch.export's docs (torch.cond), or use "
                    "capture='auto' to fall back to torch.fx (whole or partial)."
                ) from exc
    prunable = TRACED_THROUGH + (nn.MultiheadAttention,)
    result = trace_partially(working, prunable, leaf_modules, concrete_args)
    if not result.traced:
        if export_failure is None and example_inputs is not None:
            export_failure = "capture='fx'"
        raise_untraceable(result.failures, export_failure, example_inputs is not None)
    failures = list(result.failures)
    if result.root in result.traced.values():
        return Captured(result.root, result.root, result.traced, "fx")
    untraced = [str(f) for f in failures]
    untraced.append(f"torch.export {export_failure}" if export_failure is not None else
                    "torch.export: not tried (pass example_inputs= to capture the whole model)")
    warnings.warn(PartialTraceWarning(
        "sparsify_fx traced only parts of the model; these did not trace and their "
        "weights are masked by parametrization:\n  " + "\n  ".join(untraced)
    ), stacklevel=3)
    return Captured(result.root, result.root, result.traced, "partial", failures)


__all__ = ["CAPTURES", "Captured", "capture_model", "check_capture_options",
           "PartialTraceWarning", "SpecializationWarning"]
