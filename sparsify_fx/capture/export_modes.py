"""Capture a model with ``torch.export`` (non-strict) in train and eval mode.

Used when ``torch.fx.symbolic_trace`` cannot trace a model (Hugging Face
transformers, ``forward`` branching on ``x.shape``): ``torch.export`` runs the
Python code on example inputs and records ATen ops, so control flow is
resolved for those inputs. ``ep.module()`` is a GraphModule whose parameters
and buffers *are* the captured module's tensors (no copy) and whose weights
reach the graph through ``get_attr`` nodes, so the ordinary weight-finding and
mask-insertion passes run on it unchanged.

An exported graph is fixed to the mode it was captured in (dropout's ``train``
flag, batch norm's ``training`` flag and any ``if self.training`` branch are
baked in), so the module is captured twice, once per mode, from the same
tensors: the two graphs share every parameter and buffer.

Dynamic dims: dim 0 (batch) of every tensor input by default
(``torch.export.Dim.AUTO``), or the user's ``dynamic_shapes``. What capture
specialised (a dim asked to be dynamic that became static, a dim whose range a
guard narrowed) is returned as text for one loud warning. Node shape
metadata holds the example inputs' sizes (as after ``ShapeProp``).

Keyword inputs (``kwargs=``, in ``forward``'s parameter order) are captured as
keywords: the graphs take them by name; ``dynamic_shapes`` is then a dict keyed by
parameter name. :class:`ExportedGraphs` records the input names and which dims the
capture holds dynamic.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, fx, nn

from sparsify_fx.mask import MaskSet
from sparsify_fx.capture.rng_guard import refuse_random_draws

Dim = torch.export.Dim
_UNBOUNDED = ("int_oo", "oo")


class SpecializationWarning(UserWarning):
    """torch.export fixed part of the model to the example inputs (a shape, a branch)."""


@dataclass
class ExportedGraphs:
    """The two captures of one module; ``specialised``: one line per specialisation."""

    train: fx.GraphModule
    eval: fx.GraphModule
    specialised: list[str] = field(default_factory=list)
    static_dims: list[str] = field(default_factory=list)
    #: flat input names (positional, then keywords); how many are positional
    input_names: list[str] = field(default_factory=list)
    n_args: int = 0
    #: input name -> dims the eval capture holds dynamic
    dynamic_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)


def default_dynamic_shapes(inputs: Sequence[Any],
                           names: Sequence[str] | None = None) -> tuple[Any, ...] | dict:
    """Dim 0 of every tensor input with at least one dim is ``Dim.AUTO``; others static.
    With ``names`` (keyword inputs given): a dict keyed by those names, as torch.export
    takes for keyword arguments."""
    spec = tuple({0: Dim.AUTO} if isinstance(t, Tensor) and t.dim() else None for t in inputs)
    return spec if names is None else dict(zip(names, spec))


def _input_names(module: nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"arg{i}" for i in range(len(names), n)]


def signature_order(module: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` reordered as ``module.forward`` lists its parameters (unknown keys last)."""
    try:
        order = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        order = []
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(kwargs.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _requested_dims(spec: Any, inputs: Sequence[Any], names: list[str]) -> dict[int, set[int]]:
    """Which dims of which flat input (positional, then keywords) the ``dynamic_shapes``
    spec asks to be dynamic."""
    if isinstance(spec, dict):
        spec = [spec.get(name) for name in names]
    out: dict[int, set[int]] = {}
    for i, item in enumerate(list(spec or [])[:len(inputs)]):
        if isinstance(item, dict):
            out[i] = {int(d) for d, v in item.items() if v is not None}
        elif isinstance(item, (list, tuple)):
            out[i] = {d for d, v in enumerate(item) if v is not None}
    return out


def _tile_batch(inputs: Sequence[Any], dynamic: Sequence[bool]) -> tuple[Any, ...]:
    """torch.export specialises size-1 dims: where dim 0 is asked to be dynamic, capture a
    batch of 1 at batch 2 (the row repeated)."""
    return tuple(torch.cat([t, t]) if d and isinstance(t, Tensor) and t.dim() and t.shape[0] == 1
                 else t for t, d in zip(inputs, dynamic))


def _export(module: nn.Module, inputs: tuple[Any, ...], spec: Any, training: bool,
            kwargs: dict[str, Any] | None = None) -> torch.export.ExportedProgram:
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        return torch.export.export(module, inputs, kwargs=kwargs or None, dynamic_shapes=spec,
                                   strict=False)
    finally:
        for m, mode in flags:
            m.training = mode


def _user_placeholders(ep: torch.export.ExportedProgram) -> list[fx.Node]:
    user = set(ep.graph_signature.user_inputs)
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]


def dynamic_dims_of(ep: torch.export.ExportedProgram, names: Sequence[str]
                    ) -> dict[str, tuple[int, ...]]:
    """Input name -> the dims ``ep`` holds symbolic (dynamic), for every tensor input."""
    out: dict[str, tuple[int, ...]] = {}
    placeholders = _user_placeholders(ep)
    if len(placeholders) != len(names):  # nested or non-tensor inputs: not one per name
        return out
    for name, node in zip(names, placeholders):
        val = node.meta.get("val")
        if isinstance(val, Tensor):
            out[name] = tuple(d for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt))
    return out


def _describe(ep: torch.export.ExportedProgram, inputs: Sequence[Any], names: list[str],
              requested: dict[int, set[int]]) -> tuple[list[str], list[str]]:
    """(specialisations, static dims) of ``ep``, as lines naming input and dim."""
    placeholders = _user_placeholders(ep)
    special, static = [], []
    for i, node in enumerate(placeholders[:len(inputs)]):
        val = node.meta.get("val")
        if not isinstance(val, Tensor):
            continue
        name = names[i] if i < len(names) else node.name
        fixed = []
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                bounds = ep.range_constraints.get(size.node.expr)
                narrowed = bounds is not None and (int(bounds.lower) > 2
                                                   or str(bounds.upper) not in _UNBOUNDED)
                if narrowed:
                    special.append(f"input `{name}` dim {d} is limited to [{bounds.lower}, "
                                   f"{bounds.upper}] by a guard in the model's code")
            elif d in requested.get(i, ()):
                special.append(f"input `{name}` dim {d} was asked to be dynamic but the "
                               f"model's code fixed it to {size}")
            else:
                fixed.append(f"{d}={size}")
        if fixed:
            static.append(f"`{name}` dims {', '.join(fixed)}")
    return special, static


def sink_get_attrs(gm: fx.GraphModule) -> fx.GraphModule:
    """Move every ``get_attr`` node to just before its first user (mutates ``gm``).

    torch.export puts all of them at the top of the graph; next to their use,
    mask nodes (inserted after them) and ``masks()`` follow execution order.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.users]:
        first = min(node.users, key=order.__getitem__)
        first.prepend(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _hint(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else size
    return size


def concrete_shape_meta(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace symbolic sizes in each node's ``tensor_meta`` by their example values.

    torch.export records shapes with symbols for dynamic dims (``s0``); shape
    readers such as the MACs-cost pass need numbers. Mutates node metadata only.
    """
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape") and hasattr(meta, "_replace"):
            node.meta["tensor_meta"] = meta._replace(
                shape=torch.Size([_hint(d) for d in meta.shape]))
    return gm


def contiguous_as_clone(gm: fx.GraphModule) -> fx.GraphModule:
    """Write ``aten.contiguous(x)`` as ``aten.clone(x, memory_format=contiguous_format)``.

    Same values. Without it ``torch.onnx.export`` fails on T5's attention
    output in its decomposition step ("Cannot view a tensor ... as ..." on the
    transposed tensor a ``contiguous`` fed to ``reshape``), as it does on the
    source T5 model. Mutates ``gm``.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.contiguous.default:
            node.target = torch.ops.aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}
    gm.recompile()
    return gm


#: loggers that torch.export writes whole graphs to when a capture fails
EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export",
                  "torch._export", "torch._functorch", "torch._subclasses")


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Keep torch.export's failure chatter (graphs printed on a data-dependent guard)
    off stdout and stderr; its exception still says what failed."""
    loggers = [logging.getLogger(name) for name in EXPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_both_modes(module: nn.Module, inputs: Sequence[Any],
                      dynamic_shapes: Any = None,
                      kwargs: Mapping[str, Any] | None = None) -> ExportedGraphs:
    """Capture ``module`` with ``torch.export.export(strict=False)`` in train and eval mode.

    ``inputs``: positional example arguments; ``kwargs``: keyword example tensors (the
    graphs then take them by keyword). ``dynamic_shapes``: as for
    ``torch.export.export`` (a dict keyed by parameter name when keywords are given);
    None makes dim 0 of every tensor input dynamic (a batch of 1 is captured at batch 2
    wherever dim 0 is dynamic). Both GraphModules use ``module``'s own parameters and
    buffers (shared, not copied); ``module``'s train flags are restored. Raises whatever
    ``torch.export`` raises, with ``capture_mode`` (``"eval"``/``"train"``) set on the
    exception.
    """
    inputs = tuple(inputs)
    kw = signature_order(module, kwargs or {})
    names = _input_names(module, len(inputs)) + list(kw)
    flat = inputs + tuple(kw.values())
    spec = (default_dynamic_shapes(flat, names if kw else None) if dynamic_shapes is None
            else dynamic_shapes)
    requested = _requested_dims(spec, flat, names)
    flat = _tile_batch(flat, [0 in requested.get(i, ()) for i in range(len(flat))])
    inputs, kw = flat[:len(inputs)], dict(zip(kw, flat[len(inputs):]))
    modes = {}
    for training in (False, True):  # eval first: its failure is the informative one
        try:
            with quiet_export(), refuse_random_draws("torch.export"):
                modes[training] = _export(module, inputs, spec, training, kw)
        except Exception as exc:
            exc.capture_mode = "train" if training else "eval"  # read by the caller's message
            raise
    train, evaluation = modes[True], modes[False]
    special, static = _describe(evaluation, flat, names, requested)
    for line in _describe(train, flat, names, requested)[0]:
        if line not in special:
            special.append(f"{line} (train mode)")
    graphs = [contiguous_as_clone(concrete_shape_meta(sink_get_attrs(ep.module())))
              for ep in (train, evaluation)]
    return ExportedGraphs(graphs[0], graphs[1], special, static, names, len(inputs),
                          dynamic_dims_of(evaluation, names))


def _fetch(gm: nn.Module, target: str) -> Any:
    owner, _, attr = str(target).rpartition(".")
    return getattr(gm.get_submodule(owner), attr, None)


def mirror_mask_nodes(source: fx.GraphModule, target: fx.GraphModule) -> int:
    """Give ``target`` the mask nodes of ``source``, calling the same mask modules.

    Weights are matched by tensor identity (the two graphs share tensors), so a
    weight masked in ``source`` is masked by the same module in ``target``.
    Mutates ``target`` (adds ``sparsify_masks``, shared, and nodes; recompiles).
    Returns the number of mask nodes inserted.
    """
    mask_set = getattr(source, MaskSet.ATTRIBUTE, None)
    if mask_set is None:
        return 0
    prefix = MaskSet.ATTRIBUTE + "."
    by_tensor = {id(_fetch(source, n.args[0].target)): str(n.target) for n in source.graph.nodes
                 if n.op == "call_module" and str(n.target).startswith(prefix)}
    target.add_module(MaskSet.ATTRIBUTE, mask_set)
    inserted = 0
    for node in list(target.graph.nodes):
        if node.op != "get_attr" or id(_fetch(target, node.target)) not in by_tensor:
            continue
        users = list(node.users)
        with target.graph.inserting_after(node):
            masked = target.graph.call_module(by_tensor[id(_fetch(target, node.target))], (node,))
        for user in users:
            user.replace_input_with(node, masked)
        inserted += 1
    target.graph.lint()
    target.recompile()
    return inserted


__all__ = ["SpecializationWarning", "ExportedGraphs", "export_both_modes",
           "default_dynamic_shapes", "dynamic_dims_of", "signature_order", "mirror_mask_nodes"]
