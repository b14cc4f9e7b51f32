"""``export_onnx``: fold, export with torch.onnx, store pruned weights sparsely, verify.

Pipeline: reference outputs from the model (eval mode, binary masks) ->
``sparsify_fx.fold`` (masks never reach the graph, so BatchNorm folds into the
convolutions) -> ``torch.onnx.export`` (torch.export-based by default, dynamic
batch and sequence dims: :func:`dynamic_spec`) -> dense initializers at ``>= min_sparsity`` zeros move to
``graph.sparse_initializer`` (:mod:`sparsify_fx.export.sparse_initializers`) ->
``onnx.checker.check_model`` -> an onnxruntime CPU session compared with the
reference at every shape the file takes (:mod:`sparsify_fx.export.onnx_verify`). Everything is written into a temporary directory next to ``path``
and renamed into place only once verification passed, so a failure never
leaves a half-written or unverified file at ``path``.

With ``quantize="int8"|"dynamic"`` the verified fp32 file is quantized to int8
(:mod:`sparsify_fx.export.quantize`) and the int8 file, verified against PyTorch
within :class:`~sparsify_fx.export.int8_verify.Int8Tolerance`, is what lands at
``path`` (the fp32 file too, at ``fp32_path``, when asked).

The user's model is not mutated (its train/eval flags and mask modes are
restored; folding works on a copy).
"""
from __future__ import annotations

import inspect
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from sparsify_fx.capture.inputs import ModelInputs
from sparsify_fx.errors import ConfigError, ExportError, InputError
from sparsify_fx.mask_index import hard_masks, masks, unwrap

from sparsify_fx.export.fold import fold
from sparsify_fx.export.onnx_check import checked_session
from sparsify_fx.export.onnx_dims import (dynamic_dims, export_inputs, export_with_dims,
                                          onnx_input_names)
from sparsify_fx.export.onnx_verify import (ShapeCheck, feeds, shape_variants,
                                            verify as verify_shapes)
from sparsify_fx.export.sparse_initializers import InitializerStorage, sparsify_initializers

if TYPE_CHECKING:
    from sparsify_fx.export.int8_verify import Int8Tolerance
    from sparsify_fx.export.quantize import QuantizedExport

#: protobuf cannot serialise a message of 2 GiB or more; keep a margin.
PROTO_LIMIT = 2**31 - 64 * 2**20

InputsLike = Tensor | np.ndarray | Sequence[Tensor | np.ndarray] | Mapping[str, Any]


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote.

    ``bytes``: bytes on disk (``.onnx`` plus its ``.data`` file, if any).
    ``dense_bytes``: bytes the same export takes with every initializer dense.
    ``initializers``: per-initializer storage (``"dense"``/``"sparse"``) and
    sparsity. ``max_abs_diff``: largest |onnxruntime - PyTorch| over all outputs
    (``None`` when ``verify=False``); ``tolerance``: the bound it was held to.
    ``latency_ms``: median onnxruntime CPU latency on the example inputs.
    With ``quantize=``, every field describes the int8 file at ``path`` and
    ``quantized`` (:class:`~sparsify_fx.export.quantize.QuantizedExport`) holds the
    int8 measurements beside the fp32 ones; otherwise ``quantized`` is ``None``.
    ``input_names``: the ONNX graph inputs (keywords for keyword inputs);
    ``dynamic_dims``: input name -> {dim: ONNX dim name} the file holds dynamic
    (``batch``, ``sequence``); ``verified``: each shape onnxruntime was checked at.
    """

    path: Path
    bytes: int
    dense_bytes: int
    initializers: list[InitializerStorage]
    max_abs_diff: float | None
    tolerance: float | None
    latency_ms: float | None
    external_data: Path | None = None
    exporter: str = "dynamo"
    quantized: QuantizedExport | None = None
    input_names: list[str] = field(default_factory=list)
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    verified: list[ShapeCheck] = field(default_factory=list)
    _session: Any = field(default=None, repr=False, compare=False)

    @property
    def ratio(self) -> float:
        """``bytes / dense_bytes``."""
        return self.bytes / self.dense_bytes

    @property
    def sparse_names(self) -> list[str]:
        return [i.name for i in self.initializers if i.storage == "sparse"]

    def session(self) -> Any:
        """A fresh ``onnxruntime.InferenceSession`` (CPU) on the exported file."""
        return make_session(self.path)

    def run(self, *inputs: Tensor | np.ndarray, **named: Tensor | np.ndarray) -> np.ndarray:
        """First output of the exported model on ``inputs`` (positional, in graph input
        order) or ``named`` (by input name, e.g. ``input_ids=``), at any dynamic size."""
        if self._session is None:
            self._session = self.session()
        return _run(self._session, named if named else _as_numpy(inputs))[0]

    def summary(self) -> str:
        sparse = len(self.sparse_names)
        diff = "not verified" if self.max_abs_diff is None else (
            f"max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        latency = "" if self.latency_ms is None else f", onnxruntime {self.latency_ms:.2f} ms"
        int8 = "" if self.quantized is None else f"\n  {self.quantized.summary()}"
        return (f"{self.path}: {self.bytes:,} bytes ({self.ratio:.3f} of dense "
                f"{self.dense_bytes:,}); {sparse}/{len(self.initializers)} initializers "
                f"sparse; {diff}{latency}{int8}")


def make_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` on ``path``
    (:func:`sparsify_fx.latency.table.ort_session`: no thread spinning, so sessions timed
    interleaved do not slow each other)."""
    from sparsify_fx.latency.table import ort_session
    return ort_session(path, threads)


def run_onnx(path: str | os.PathLike, inputs: InputsLike) -> np.ndarray:
    """Run the ONNX file at ``path`` on ``inputs`` (positional, or a mapping by input name)
    in onnxruntime; first output as numpy."""
    return _run(make_session(path), inputs if isinstance(inputs, Mapping)
                else _as_numpy(inputs))[0]


# -- helpers -------------------------------------------------------------------------
def _as_numpy(inputs: Any) -> list[np.ndarray]:
    if isinstance(inputs, (Tensor, np.ndarray)):
        inputs = (inputs,)
    if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)):
        inputs = inputs[0]
    return [t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
            for t in inputs]


def _run(session: Any, arrays: list[np.ndarray] | Mapping[str, Any]) -> list[np.ndarray]:
    return session.run(None, feeds(session, arrays))


def _check_destination(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a str or PathLike, got {type(path).__name__}")
    target = Path(path).expanduser().absolute()
    parent = target.parent
    if target.is_dir():
        raise ExportError(f"cannot write ONNX to {target}: it is a directory; "
                          "pass a file path such as model.onnx")
    if not parent.is_dir():
        raise ExportError(f"cannot write ONNX to {target}: directory {parent} does not exist "
                          "(or is not a directory); create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write ONNX to {target}: directory {parent} is not "
                          "writable; choose another path or fix its permissions")
    return target


def _reference(model: nn.Module, inputs: ModelInputs) -> list[Tensor]:
    """The model's outputs on ``inputs`` (hard masks); InputError when it fails on them."""
    try:
        with torch.no_grad(), hard_masks(model):
            out = inputs.call(model)
    except Exception as exc:  # noqa: BLE001 - the user's forward raises anything
        first = (str(exc).strip().splitlines() or [""])[0]
        shapes = inputs.describe()
        raise InputError(f"the model fails on example_inputs {shapes} "
                         f"({type(exc).__name__}: {first}); pass inputs the model accepts "
                         "(the shape and dtype it runs on)") from exc
    return _leaves(out)


def _leaves(out: Any) -> list[Tensor]:
    return [t.detach().cpu() for t in tree_leaves(out) if isinstance(t, Tensor)]


def _param_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _save(model: onnx.ModelProto, file: Path, external: bool | None) -> Path | None:
    """Write ``model`` to ``file``; external data next to it when asked or needed."""
    if external is None:
        external = model.ByteSize() > PROTO_LIMIT
    if not external:
        if model.ByteSize() > PROTO_LIMIT:
            raise ExportError("the model is over 2 GB even with sparse initializers and "
                              "external_data=False; pass external_data=True or None")
        onnx.save_model(model, str(file))
        return None
    data = file.with_name(file.name + ".data")
    # sparse initializers stay inside the .onnx (onnx's external-data writer skips them)
    onnx.save_model(model, str(file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return data if data.exists() else None


def _latency(session: Any, inputs: ModelInputs | Sequence[Any], runs: int) -> float | None:
    """Median onnxruntime ms over ``runs`` timed runs after one warm-up (None for 0)."""
    if runs <= 0:
        return None
    feed = feeds(session, inputs)
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# -- the API ----------------------------------------------------------------------------
def export_onnx(model: nn.Module,
                example_inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
                path: str | os.PathLike, *, sparse: bool = True, min_sparsity: float = 0.5,
                only_if_smaller: bool = True, verify: bool = True,
                reference_outputs: Any = None, rtol: float = 1e-4, atol: float = 1e-5,
                dynamic_batch: bool = True, dynamic_sequence: bool = True,
                dynamic_shapes: Any = None, external_data: bool | None = None,
                opset: int | None = None, dynamo: bool = True,
                latency_runs: int = 5, quantize: str | None = None,
                calibration: Iterable[Any] | None = None,
                int8_tolerance: Int8Tolerance | None = None,
                metric: Callable[[Callable[..., np.ndarray]], float] | None = None,
                fp32_path: str | os.PathLike | None = None) -> OnnxExport:
    """Export ``model`` to a verified ONNX file at ``path`` with pruned weights sparse.

    ``model``: a transformed (masked) or folded model, or any plain module;
    masked models are folded first (on a copy). It is exported in eval mode.
    ``example_inputs``: a Tensor or tuple of positional arguments (Tensors, or
    nested lists of Tensors; CPU), or a dict of keyword Tensors (what a tokenizer
    returns): the ONNX inputs are then named by the keywords (positional ones
    ``input`` / ``input_<i>``). For flat Tensor arguments dim 0 is exported as a
    dynamic ``batch`` dimension unless ``dynamic_batch=False``. With
    ``dynamic_sequence`` (default), dim 1 of every integer rank-2 input (token ids,
    masks) and every dim the capture holds dynamic (an ``ExportedModule``'s
    ``dynamic_dims``) are dynamic too (``sequence``) where the model's code allows;
    ``dynamic_shapes=`` (as for ``torch.export.export``) replaces this choice.
    ``sparse``/``min_sparsity``: initializers with at least that fraction of
    zeros are stored as COO ``sparse_initializer`` (and, with
    ``only_if_smaller``, only where that is smaller than dense).
    ``verify``: ``onnx.checker.check_model`` plus onnxruntime outputs within
    ``atol + rtol * max|reference|`` of ``reference_outputs`` (default: the
    model's own outputs on ``example_inputs`` with binary masks), also at twice
    the batch size when the batch is dynamic, and at a second length of every other
    dynamic dim (a few tokens shorter; against PyTorch on those inputs): one file
    serves every batch size and sequence length (``OnnxExport.verified``). ``external_data``: ``None``
    writes one self-contained file unless it would pass 2 GB; ``True`` always
    writes ``<path>.data``. ``dynamo=False`` uses the deprecated TorchScript
    exporter. Raises :class:`ExportError`; nothing is left at ``path`` then.

    ``quantize="int8"``: static int8 (QDQ, per-channel int8 weights, activations
    calibrated on ``calibration=``, required: an iterable of example-input tuples
    or tensors; a DataLoader's trailing labels are dropped). ``quantize="dynamic"``:
    int8 MatMul/Gemm weights, no calibration needed (Linear-heavy models). The int8
    file is verified on every calibration item (without calibration, or with
    ``reference_outputs``, also on the example inputs) against ``int8_tolerance``
    (default ``Int8Tolerance()``), and, with ``metric``
    (``metric(predict) -> float``, higher is better, ``predict(*inputs)`` returns
    the first output as numpy), by the metric's drop. ``fp32_path``: also write
    the verified fp32 file there. See docs/export.md, "int8 quantization".
    """
    model = unwrap(model)
    inputs = export_inputs(model, example_inputs)
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    target = _check_destination(path)
    batched = bool(dynamic_batch) and inputs.same_batch()
    if dynamic_shapes is not None:
        batched = False  # the user's spec says which dims are dynamic; read back below
    q_request = None
    if quantize is not None or any(v is not None for v in (calibration, int8_tolerance,
                                                           metric, fp32_path)):
        from sparsify_fx.export.quantize import quantize_request
        fp32_target = None if fp32_path is None else _check_destination(fp32_path)
        if fp32_target == target:
            raise ConfigError(f"fp32_path= and path are both {target}; pass another fp32_path")
        q_request = quantize_request(quantize, calibration, _q_inputs(model, inputs),
                                     batched=batched, tolerance=int8_tolerance, metric=metric,
                                     fp32_path=fp32_target)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        reference = (_reference(model, inputs) if reference_outputs is None
                     else _leaves(reference_outputs))
        plain = fold(model) if masks(model) else model
        big = external_data is True or _param_bytes(plain) > PROTO_LIMIT
        try:
            work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        except OSError as exc:
            raise ExportError(f"cannot write ONNX next to {target}: {exc}") from exc
        try:
            try:
                proto = export_with_dims(plain, inputs, len(reference), work, dynamo=dynamo,
                                         batched=batched, dynamic_sequence=dynamic_sequence,
                                         dynamic_shapes=dynamic_shapes, opset=opset, big=big)
            except Exception as exc:  # noqa: BLE001 - torch.onnx raises many types
                raise ExportError(
                    f"torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'}) failed for "
                    f"{type(model).__name__}: {type(exc).__name__}: {exc}".rstrip()[:2000]
                    + ("; try dynamo=False" if dynamo else "")) from exc
            dense_bytes = _dense_size(proto)
            dims = {k: v for k, v in dynamic_dims(proto).items() if v}
            if dynamic_shapes is not None:
                batched = inputs.same_batch() and all(0 in dims.get(n, {}) for n in
                                                      onnx_input_names(inputs))
            if q_request is not None:  # the quantizer reads dense initializers
                dense_file = work / "dense_fp32.onnx"
                _save(proto, dense_file, True if big else None)
                if big:  # saving with external data emptied proto's tensors
                    proto = onnx.load(str(dense_file), load_external_data=True)
            storage = (sparsify_initializers(proto, float(min_sparsity),
                                             only_if_smaller=only_if_smaller) if sparse
                       else sparsify_initializers(proto, 2.0))
            staged = work / target.name
            data = _save(proto, staged, external_data)
            del proto
            diff = bound = latency = None
            session = None
            checks: list[ShapeCheck] = []
            if verify:
                session = checked_session(staged, "the exported model", make_session)
                variants = shape_variants(inputs, onnx_input_names(inputs), dims, batched)
                diff, bound, checks = verify_shapes(
                    session, variants, lambda x: _reference(model, x), reference, rtol, atol,
                    tile_reference=reference_outputs is not None)
                latency = _latency(session, inputs, latency_runs)
            written = staged.stat().st_size + (data.stat().st_size if data else 0)
            quantized = None
            if q_request is not None:
                from sparsify_fx.export.quantize import quantized_result, stage_int8
                q = stage_int8(q_request, dense_file, work, "int8_" + target.name,
                               model=plain, example_inputs=_q_inputs(plain, inputs),
                               example_reference=reference,
                               reference_given=reference_outputs is not None, verify=verify,
                               sparse=sparse, min_sparsity=min_sparsity,
                               only_if_smaller=only_if_smaller, external_data=external_data,
                               save=_save, open_session=make_session)
                q_latency = None if q.session is None else _latency(q.session, inputs,
                                                                    latency_runs)
                q_written = q.file.stat().st_size + (q.data.stat().st_size if q.data else 0)
                if q_request.fp32_path is not None:
                    _place(staged, data, q_request.fp32_path)
                quantized = quantized_result(
                    q_request, q, q_written, fp32_bytes=written, fp32_dense_bytes=dense_bytes,
                    fp32_diff=diff, fp32_latency=latency, latency=q_latency,
                    fp32_path=q_request.fp32_path)
                staged, data, storage, dense_bytes = q.file, q.data, q.storage, q.dense_bytes
                written, session, latency = q_written, q.session, q_latency
                if q.check is not None:
                    diff, bound = q.check.max_abs_diff, q.check.bound
            final_data = _place(staged, data, target)
        except OSError as exc:
            raise ExportError(f"writing {target} failed: {exc}") from exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        for module, mode in flags:
            module.training = mode
    return OnnxExport(target, written, dense_bytes, storage, diff, bound, latency,
                      final_data, "dynamo" if dynamo else "torchscript", quantized,
                      onnx_input_names(inputs), dims, checks, _session=session)


def _q_inputs(model: nn.Module, inputs: ModelInputs) -> tuple[Any, ...]:
    """The inputs as the int8 path takes them: positional, in graph input order."""
    try:
        return inputs.positional(model)
    except InputError as exc:
        raise ConfigError(f"quantize= with these keyword inputs: {exc}") from exc


def _place(staged: Path, data: Path | None, target: Path) -> Path | None:
    """Move a staged file (and its ``.data``, renaming the file's references to it) to
    ``target``; returns the final ``.data`` path."""
    final_data = None
    if data is not None:
        final_data = target.with_name(target.name + ".data")
        if final_data.name != data.name:
            head = onnx.load(str(staged), load_external_data=False)
            for tensor in head.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = final_data.name
            onnx.save_model(head, str(staged))
        os.replace(data, final_data)
    os.replace(staged, target)
    return final_data


def _dense_size(proto: onnx.ModelProto) -> int:
    """Bytes of ``proto`` written as one dense file (every initializer inline)."""
    return proto.ByteSize()
