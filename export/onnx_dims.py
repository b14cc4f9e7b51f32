"""The ONNX graph's inputs and dynamic dims: names, what ``export_onnx`` asks torch for,
the ``torch.onnx.export`` call, and what the written file holds dynamic.

* :func:`export_inputs`: the example inputs on the CPU, keywords in ``forward``'s order.
* :func:`onnx_input_names`: ``input`` / ``input_<i>`` for positional tensors, the
  keywords for keyword inputs (``input_ids``, ``attention_mask``, ...).
* :func:`dynamic_spec`: the ``dynamic_shapes`` asked for: dim 0 as ``Dim("batch")``;
  dim 1 of integer rank-2 inputs (token sequences) and every dim the capture holds
  dynamic (``ExportedModule.dynamic_dims``) as ``Dim.AUTO``, which torch.export keeps
  static wherever the model's code fixes the size.
* :func:`export_with_dims` / :func:`torch_export`: the export (retried with the batch
  dim only when the sequence dims make torch.export fail).
* :func:`name_dims` renames the exporter's symbols (``s41``) to ``batch`` /
  ``sequence``; :func:`dynamic_dims` reads the dynamic dims back from the graph inputs.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from sparsify_fx.capture.inputs import ModelInputs, as_model_inputs
from sparsify_fx.errors import InputError
from sparsify_fx.capture.export_modes import signature_order


def export_inputs(model: nn.Module, example_inputs: Any) -> ModelInputs:
    """Positional Tensors (nested lists/tuples allowed) or keyword Tensors, on the CPU;
    keywords in the order ``model.forward`` lists them (the ONNX graph inputs' order)."""
    given = as_model_inputs(example_inputs)
    if given is None:
        raise InputError("example_inputs must be a Tensor, a tuple of Tensors or a dict of "
                         "keyword Tensors, got None; pass e.g. torch.randn(1, 3, 224, 224)")
    given.check_against(model)
    given = given.map(lambda t: t.detach().cpu())
    return ModelInputs(given.args, signature_order(model, given.kwargs))


def onnx_input_names(inputs: ModelInputs) -> list[str]:
    """Graph input names: ``input`` / ``input_<i>`` per positional tensor (as before
    keyword inputs existed), then the keywords."""
    n = len([t for t in tree_leaves(list(inputs.args)) if isinstance(t, Tensor)])
    positional = ["input"] if n == 1 and not inputs.kwargs else [f"input_{i}" for i in range(n)]
    return positional + list(inputs.kwargs)


def _is_tokens(t: Any) -> bool:
    return (isinstance(t, Tensor) and t.dim() == 2 and not t.dtype.is_floating_point
            and not t.dtype.is_complex and t.dtype != torch.bool)


def dynamic_spec(model: nn.Module, inputs: ModelInputs, batched: bool,
                 dynamic_sequence: bool) -> Any:
    """The ``dynamic_shapes`` ``export_onnx`` asks torch.export for, when none is given:
    dim 0 of every input as ``Dim("batch")`` when ``batched``; with ``dynamic_sequence``,
    ``Dim.AUTO`` for dim 1 of every integer rank-2 input (token ids, attention masks,
    token type ids) of a model that is not a capture, and for a capture
    (``ExportedModule``) exactly the dims it holds dynamic (``dynamic_dims``: its graph
    guards the others); torch.export keeps an AUTO dim static where the model's code
    fixes it. A tuple per positional input, or, with keyword inputs, a dict
    keyed by parameter name; None when nothing is dynamic."""
    recorded = getattr(model, "dynamic_dims", None)  # a capture: its own dims, nothing more
    captured = recorded or {}
    captured_names = list(getattr(model, "input_names", ()) or ())
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    batch = torch.export.Dim("batch")
    named = [(captured_names[i] if i < len(captured_names) else
              params[i] if i < len(params) else f"arg{i}", a) for i, a in enumerate(inputs.args)]
    named += list(inputs.kwargs.items())
    specs, any_dynamic = [], False
    for name, x in named:
        if not isinstance(x, Tensor) or not x.dim():
            specs.append(None)
            continue
        dims: dict[int, Any] = {0: batch} if batched else {}
        if dynamic_sequence:
            extra = set(captured.get(name, ())) | (
                {1} if recorded is None and _is_tokens(x) else set())
            dims.update({d: torch.export.Dim.AUTO for d in sorted(extra - {0})
                         if d < x.dim()})
        any_dynamic |= bool(dims)
        specs.append(dims or None)
    if not any_dynamic:
        return None
    if not inputs.kwargs:
        return tuple(specs)
    return {name: spec for (name, _), spec in zip(named, specs)}


def torch_export(model: nn.Module, inputs: ModelInputs, n_outputs: int,
                 work: Path, *, dynamo: bool, batched: bool, spec: Any, opset: int | None,
                 big: bool) -> onnx.ModelProto:
    """Export ``model`` (eval mode, no masks) with ``spec`` as ``dynamic_shapes``; dense
    ``ModelProto`` with data loaded, dims named by :func:`name_dims`."""
    input_names = onnx_input_names(inputs)
    output_names = (["output"] if n_outputs == 1
                    else [f"output_{i}" for i in range(n_outputs)])
    raw = work / "exported.onnx"
    kwargs = dict(inputs.kwargs) or None
    if dynamo:
        traced = inputs
        if batched and inputs.batch_size == 1:  # torch.export specialises size-1 dims
            traced = inputs.repeat_batch()
        program = torch.onnx.export(model, tuple(traced.args), kwargs=kwargs, dynamo=True,
                                    verbose=False, input_names=input_names,
                                    output_names=output_names, opset_version=opset,
                                    dynamic_shapes=spec)
        if not big:
            proto = program.model_proto
            name_dims(proto, inputs, input_names)
            return proto
        program.save(str(raw), external_data=True)
    else:
        axes = None
        if spec is not None:  # TorchScript takes dim names per input instead of Dims
            flat = list(spec.values()) if isinstance(spec, dict) else list(spec)
            axes = {n: {d: ("batch" if d == 0 else "sequence" if d == 1 and _is_tokens(t)
                            else f"{n}_dim{d}") for d in (s or {})}
                    for n, t, s in zip(input_names, inputs.tensors(), flat) if s}
            if batched:
                axes.update({n: {0: "batch"} for n in output_names})
        args = tuple(inputs.args) + ((kwargs,) if kwargs else ())
        torch.onnx.export(model, args, str(raw), dynamo=False, input_names=input_names,
                          output_names=output_names, opset_version=opset, dynamic_axes=axes,
                          do_constant_folding=True)
    proto = onnx.load(str(raw), load_external_data=True)
    name_dims(proto, inputs, input_names)
    return proto


def dynamic_dims(proto: onnx.ModelProto) -> dict[str, dict[int, str]]:
    """Graph input name -> {dim: symbol} for every dim the file holds dynamic."""
    out: dict[str, dict[int, str]] = {}
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        out[value.name] = {d: dim.dim_param for d, dim in enumerate(dims)
                           if dim.dim_param or not dim.HasField("dim_value")}
    return out


def name_dims(proto: onnx.ModelProto, inputs: ModelInputs, names: Sequence[str]) -> None:
    """Rename the exporter's symbols of input dims: dim 0 shared by all inputs stays
    ``batch``; dim 1 of an integer rank-2 input (token sequences) -> ``sequence``
    (``sequence_1``, ... for other lengths); any other -> ``<input>_dim<d>``. Renames every
    exact use in the graph's inputs, outputs and value_info (mutates ``proto``)."""
    tensors = dict(zip(names, inputs.tensors()))
    rename: dict[str, str] = {}
    taken = {"batch"}
    for value in proto.graph.input:
        t = tensors.get(value.name)
        for d, dim in enumerate(value.type.tensor_type.shape.dim):
            sym = dim.dim_param
            if not sym or sym in rename or sym == "batch":
                continue
            token = d == 1 and _is_tokens(t)
            base = "sequence" if token else f"{value.name}_dim{d}"
            new, k = base, 0
            while new in taken:
                k += 1
                new = f"{base}_{k}"
            rename[sym] = new
            taken.add(new)
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def export_with_dims(model: nn.Module, inputs: ModelInputs, n_outputs: int, work: Path, *,
                     dynamo: bool, batched: bool, dynamic_sequence: bool, dynamic_shapes: Any,
                     opset: int | None, big: bool) -> onnx.ModelProto:
    """:func:`torch_export` with the user's ``dynamic_shapes`` or :func:`dynamic_spec`'s;
    if the sequence dims make torch.export fail, once more with the batch dim only."""
    spec = dynamic_shapes if dynamic_shapes is not None else dynamic_spec(
        model, inputs, batched, dynamic_sequence)
    try:
        return torch_export(model, inputs, n_outputs, work, dynamo=dynamo, batched=batched,
                            spec=spec, opset=opset, big=big)
    except Exception:  # noqa: BLE001 - retried without the sequence dims, else re-raised
        fallback = dynamic_spec(model, inputs, batched, False)
        if dynamic_shapes is not None or not dynamic_sequence or fallback == spec:
            raise
        return torch_export(model, inputs, n_outputs, work, dynamo=dynamo, batched=batched,
                            spec=fallback, opset=opset, big=big)


__all__ = ["export_inputs", "onnx_input_names", "dynamic_spec", "torch_export", "export_with_dims",
           "dynamic_dims", "name_dims"]
