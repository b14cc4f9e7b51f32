"""int8 quantization of a verified fp32 export: ``export_onnx(..., quantize="int8"|"dynamic")``.

Pipeline (:func:`stage_int8`, called by :func:`sparsify_fx.export.onnx_export.export_onnx`
inside its temporary directory, so a failure leaves nothing at ``path``):

1. ``onnxruntime.quantization.quant_pre_process`` on the dense fp32 file
   (symbolic shape inference + graph optimisation; retried without the symbolic
   step if that fails).
2. ``quantize="int8"``: ``quantize_static`` in QDQ format, per-channel symmetric
   int8 weights, uint8 activations calibrated (MinMax) on ``calibration=``.
   ``quantize="dynamic"``: ``quantize_dynamic`` of MatMul/Gemm weights to int8
   (activations quantized at run time; convolutions stay fp32).
3. Storage: symmetric int8 keeps a pruned zero an exact 0 (zero point 0). Each
   initializer is stored dense or as COO, whichever is smaller, measured per
   tensor (:func:`store_smaller`: int8 COO costs 9 bytes per nonzero, so it only
   wins above 8/9 = 88.9 % zeros; tiny tensors are compared serialized).
4. Verification (:func:`~sparsify_fx.export.int8_verify.verify_int8`):
   ``onnx.checker``, an onnxruntime session, outputs on the example inputs and
   every calibration item against PyTorch within :class:`Int8Tolerance`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten

from sparsify_fx.errors import ExportError, InputError
from sparsify_fx.export.onnx_check import checked_session, is_runtime_op
from sparsify_fx.export.int8_verify import (ARGMAX_MIN_ROWS, Int8Check, Int8Tolerance, Metric,
                                            Predict, verify_int8)
from sparsify_fx.export.quantize_request import MODES, QuantizeRequest, quantize_request
from sparsify_fx.export.sparse_initializers import InitializerStorage, sparsify_initializers

__all__ = ["ARGMAX_MIN_ROWS", "DYNAMIC_OPS", "Int8Tolerance", "MODES", "Metric", "Predict",
           "QuantizedExport", "StagedInt8", "count_int8_weights", "quantize_request",
           "quantized_result", "stage_int8", "store_smaller"]

_INT8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
#: op types ``quantize="dynamic"`` quantizes (ConvInteger is slow on onnxruntime CPU)
DYNAMIC_OPS = ["MatMul", "Gemm"]
MODE_LABELS = {"int8": "static int8", "dynamic": "dynamic int8"}


@dataclass
class QuantizedExport:
    """The int8 side of an :class:`~sparsify_fx.export.onnx_export.OnnxExport`.

    ``bytes``: the int8 file on disk (what is at ``path``); ``fp32_bytes`` /
    ``fp32_dense_bytes``: the fp32 file ``export_onnx`` writes without ``quantize``
    (sparse initializers as asked) / with every initializer dense; ``int8_weights``:
    int8 weight initializers (rank >= 2), ``sparse_int8_weights`` of them stored COO.
    ``max_abs_diff`` / ``tolerance``: int8 vs PyTorch and its bound;
    ``argmax_agreement`` over ``rows`` rows (``None``: not class scores);
    ``metric_fp32`` / ``metric_int8``: the ``metric`` callback on PyTorch / int8.
    ``latency_ms`` / ``fp32_latency_ms``: median onnxruntime latency on the example
    inputs. Verification fields are ``None`` with ``verify=False``.
    """

    mode: str
    bytes: int
    fp32_bytes: int
    fp32_dense_bytes: int
    int8_weights: int
    sparse_int8_weights: int
    calibration_items: int
    max_abs_diff: float | None = None
    tolerance: float | None = None
    argmax_agreement: float | None = None
    rows: int = 0
    metric_fp32: float | None = None
    metric_int8: float | None = None
    latency_ms: float | None = None
    fp32_max_abs_diff: float | None = None
    fp32_latency_ms: float | None = None
    fp32_path: Path | None = None
    preprocess: str = "quant_pre_process"
    settings: Int8Tolerance = field(default_factory=Int8Tolerance)

    @property
    def ratio(self) -> float:
        """int8 file bytes / the dense fp32 file's bytes."""
        return self.bytes / self.fp32_dense_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (paths as strings), ``ratio`` included."""
        out = asdict(self)
        out["fp32_path"] = None if self.fp32_path is None else str(self.fp32_path)
        out["ratio"] = self.ratio
        return out

    def summary(self) -> str:
        parts = [f"{MODE_LABELS[self.mode]}: {self.bytes:,} bytes ({self.ratio:.3f} of dense fp32 "
                 f"{self.fp32_dense_bytes:,}); {self.int8_weights} int8 weights "
                 f"({self.sparse_int8_weights} sparse)"]
        if self.max_abs_diff is not None:
            parts.append(f"max abs diff {self.max_abs_diff:.3g} (int8 tolerance "
                         f"{self.tolerance:.3g})")
        if self.argmax_agreement is not None:
            parts.append(f"arg-max agreement {self.argmax_agreement:.3f} of {self.rows} rows")
        if self.metric_int8 is not None:
            parts.append(f"metric {self.metric_int8:.4g} (PyTorch {self.metric_fp32:.4g})")
        return "; ".join(parts)


@dataclass
class StagedInt8:
    """The verified int8 file in the work directory, before it is moved to ``path``."""

    file: Path
    data: Path | None
    storage: list[InitializerStorage]
    dense_bytes: int
    int8_weights: int
    sparse_int8_weights: int
    check: Int8Check | None
    session: Any
    preprocess: str


def count_int8_weights(model: onnx.ModelProto) -> tuple[int, int]:
    """(int8/uint8 initializers of rank >= 2, those of them stored as sparse) in ``model``."""
    graph = model.graph
    dense = sum(1 for t in graph.initializer if t.data_type in _INT8 and len(t.dims) >= 2)
    sparse = sum(1 for s in graph.sparse_initializer
                 if s.values.data_type in _INT8 and len(s.dims) >= 2)
    return dense + sparse, sparse


def store_smaller(model: onnx.ModelProto, min_sparsity: float,
                  only_if_smaller: bool = True) -> list[InitializerStorage]:
    """:func:`sparsify_initializers`, then, with ``only_if_smaller``, every tensor whose
    serialized COO form (values, indices, names, dims) is not smaller than its serialized
    dense form goes back to dense: the payload rule alone moves tiny all-zero tensors
    (int8 zero points) to COO and makes the file larger. Mutates ``model``."""
    dense = {t.name: onnx.TensorProto.FromString(t.SerializeToString())
             for t in model.graph.initializer} if only_if_smaller else {}
    storage = sparsify_initializers(model, min_sparsity, only_if_smaller=only_if_smaller)
    graph = model.graph
    back = {sp.values.name for sp in graph.sparse_initializer
            if sp.values.name in dense and sp.ByteSize() >= dense[sp.values.name].ByteSize()}
    if not back:
        return storage
    kept = [sp for sp in graph.sparse_initializer if sp.values.name not in back]
    del graph.sparse_initializer[:]
    graph.sparse_initializer.extend(kept)
    graph.initializer.extend(dense[name] for name in sorted(back))
    return [replace(i, storage="dense", bytes=i.dense_bytes,
                    reason="COO would be larger (serialized)") if i.name in back else i
            for i in storage]


class _Reader:
    """``CalibrationDataReader`` over flattened calibration items."""

    def __init__(self, names: list[str], items: list[list[np.ndarray]]) -> None:
        self._feeds = iter([dict(zip(names, item)) for item in items])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _graph_inputs(path: Path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def preprocess_for_quantization(src: Path, dst: Path, external: bool) -> str:
    """onnxruntime's ``quant_pre_process`` of ``src`` into ``dst`` (weights in ``dst.data``
    when ``external``); retried without symbolic shape inference, and run without it
    from the start on a graph holding onnxruntime's fused ops (``ort_fusions``: there
    it cannot finish and leaves the model in the current directory). Returns which form ran;
    ExportError when both fail. Reads ``src`` only."""
    from onnxruntime.quantization import quant_pre_process
    kw = dict(save_as_external_data=external, all_tensors_to_one_file=True,
              external_data_location=dst.name + ".data" if external else None)
    proto = onnx.load(str(src), load_external_data=False)
    if not any(is_runtime_op(n) for n in proto.graph.node):
        # on onnxruntime's fused ops symbolic shape inference cannot finish, and then it
        # saves the whole model (weights too) into the current directory: not tried there
        try:
            quant_pre_process(str(src), str(dst), **kw)
            return "quant_pre_process"
        except Exception:  # noqa: BLE001 - symbolic shape inference fails on some graphs
            pass
    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, **kw)
        return "quant_pre_process (without symbolic shape inference)"
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime's quant_pre_process failed: {type(exc).__name__}: "
                          f"{exc}"[:2000]) from exc


def _quantize(request: QuantizeRequest, src: Path, dst: Path, external: bool) -> None:
    from onnxruntime.quantization import (QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    try:
        if request.mode == "int8":
            reader = _Reader(_graph_inputs(src), request.calibration or [])
            quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            use_external_data_format=external)
        else:
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=DYNAMIC_OPS,
                             per_channel=False, weight_type=QuantType.QInt8,
                             use_external_data_format=external)
    except Exception as exc:  # noqa: BLE001 - onnxruntime.quantization raises anything
        raise ExportError(f"onnxruntime quantization ({MODES[request.mode]}) failed: "
                          f"{type(exc).__name__}: {exc}"[:2000]) from exc


def _torch_predict(model: nn.Module, spec: TreeSpec) -> Predict:
    def predict(*inputs: Any) -> np.ndarray:
        args = [torch.from_numpy(np.asarray(t)) if not isinstance(t, torch.Tensor) else t
                for t in tree_leaves(list(inputs))]
        with torch.no_grad():
            out = model(*tree_unflatten(args, spec))
        return next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor)).cpu().numpy()
    return predict


def _ort_run(session: Any):
    names = [i.name for i in session.get_inputs()]

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(None, dict(zip(names, arrays)))

    def predict(*inputs: Any) -> np.ndarray:
        arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
                  for t in tree_leaves(list(inputs))]
        return np.asarray(run(arrays)[0])
    return run, predict


def stage_int8(request: QuantizeRequest, dense_fp32: Path, work: Path, name: str, *,
               model: nn.Module, example_inputs: tuple[Any, ...],
               example_reference: list[torch.Tensor], reference_given: bool, verify: bool,
               sparse: bool, min_sparsity: float, only_if_smaller: bool,
               external_data: bool | None,
               save: Callable[[onnx.ModelProto, Path, bool | None], Path | None],
               open_session: Callable[[Path], Any]) -> StagedInt8:
    """Quantize ``dense_fp32`` (a dense fp32 file in ``work``) into ``work/name`` and
    verify it against ``model`` (plain, eval mode) on every calibration item (static
    int8 saturates on inputs unlike the calibration data, such as a random example),
    plus the example inputs (expected: ``example_reference``) when there is no
    calibration or ``reference_given`` (the user's ``reference_outputs=``).
    ``save(proto, file, external_data) -> .data path or None`` writes the file and
    ``open_session(file)`` opens onnxruntime on it (export_onnx's own, so both files
    are written and run alike). Raises :class:`ExportError`."""
    big = dense_fp32.with_name(dense_fp32.name + ".data").exists()
    pre, raw = work / "int8_pre.onnx", work / "int8_raw.onnx"
    how = preprocess_for_quantization(dense_fp32, pre, big)
    _quantize(request, pre, raw, big)
    proto = onnx.load(str(raw), load_external_data=True)
    dense_bytes = proto.ByteSize()
    storage = store_smaller(proto, float(min_sparsity) if sparse else 2.0, only_if_smaller)
    weights, sparse_weights = count_int8_weights(proto)
    staged = work / name
    data = save(proto, staged, external_data)
    del proto
    if not verify:
        return StagedInt8(staged, data, storage, dense_bytes, weights, sparse_weights, None,
                          None, how)
    session = checked_session(staged, "the int8 model", open_session)
    leaves, spec = tree_flatten(example_inputs)
    predict_fp32 = _torch_predict(model, spec)
    # real data: the calibration items; the example inputs (often random) only without
    # calibration or when the user stated their outputs (reference_outputs=)
    items, references = [], []
    if not request.calibration or reference_given:
        items.append([t.numpy() for t in leaves])
        references.append([t.numpy() for t in example_reference])
    for k, item in enumerate(request.calibration or []):
        args = tree_unflatten([torch.from_numpy(np.array(a)) for a in item], spec)
        try:
            with torch.no_grad():
                out = model(*args)
        except Exception as exc:  # noqa: BLE001 - the user's forward raises anything
            raise InputError(f"the model fails on calibration item {k} "
                             f"({type(exc).__name__}: {exc}); pass calibration batches the "
                             "model accepts, shaped like example_inputs") from exc
        items.append(item)
        references.append([t.detach().cpu().numpy() for t in tree_leaves(out)
                           if isinstance(t, torch.Tensor)])
    run, predict_int8 = _ort_run(session)
    check = verify_int8(run, items, references, request.tolerance, request.metric,
                        predict_fp32, predict_int8)
    return StagedInt8(staged, data, storage, dense_bytes, weights, sparse_weights, check,
                      session, how)


def quantized_result(request: QuantizeRequest, staged: StagedInt8, written: int, *,
                     fp32_bytes: int, fp32_dense_bytes: int, fp32_diff: float | None,
                     fp32_latency: float | None, latency: float | None,
                     fp32_path: Path | None) -> QuantizedExport:
    """The :class:`QuantizedExport` of a staged, written int8 file."""
    check = staged.check
    return QuantizedExport(
        request.mode, written, fp32_bytes, fp32_dense_bytes, staged.int8_weights,
        staged.sparse_int8_weights, len(request.calibration or []),
        None if check is None else check.max_abs_diff, None if check is None else check.bound,
        None if check is None else check.argmax_agreement, 0 if check is None else check.rows,
        None if check is None else check.metric_fp32, None if check is None else check.metric_int8,
        latency, fp32_diff, fp32_latency, fp32_path, staged.preprocess, request.tolerance)
