"""The checked form of ``export_onnx(..., quantize=, calibration=, ...)``.

:func:`quantize_request` validates the quantization options *before* anything is
exported and turns ``calibration`` into a list of items, each a list of numpy
arrays in the flattened order of ``example_inputs`` (the ONNX graph's inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from torch import Tensor
from torch.utils._pytree import tree_leaves

from sparsify_fx.errors import ConfigError, InputError
from sparsify_fx.export.int8_verify import Int8Tolerance, Metric

#: ``quantize=`` values -> what they do
MODES = {
    "int8": "static int8: QDQ, per-channel int8 weights, uint8 activations calibrated "
            "on calibration=",
    "dynamic": "dynamic int8: int8 MatMul/Gemm weights, activations quantized at run time",
}


@dataclass
class QuantizeRequest:
    """A validated quantization request (``calibration``: flattened items or ``None``)."""

    mode: str
    calibration: list[list[np.ndarray]] | None
    tolerance: Int8Tolerance
    metric: Metric | None
    fp32_path: Path | None


def refuse_extras(**given: Any) -> None:
    """:class:`ConfigError` for quantization options passed without ``quantize=``."""
    extra = [k for k, v in given.items() if v is not None]
    if extra:
        raise ConfigError(f"{', '.join(f'{k}=' for k in extra)} given without quantize=; "
                          "pass quantize='int8' (static) or quantize='dynamic', or drop "
                          f"{' and '.join(extra)}")


def quantize_request(quantize: Any, calibration: Iterable[Any] | None,
                     example_inputs: tuple[Any, ...], *, batched: bool,
                     tolerance: Int8Tolerance | None, metric: Metric | None,
                     fp32_path: Path | None) -> QuantizeRequest | None:
    """``None`` for ``quantize=None`` (then no other quantization option may be given);
    else the checked request. Raises :class:`ConfigError` / :class:`InputError` naming
    the option and its fix."""
    if quantize is None:
        refuse_extras(calibration=calibration, int8_tolerance=tolerance, metric=metric,
                      fp32_path=fp32_path)
        return None
    if quantize not in MODES:
        raise ConfigError(f"quantize={quantize!r} is not supported; use one of "
                          f"{', '.join(repr(m) for m in MODES)} or None")
    if tolerance is not None and not isinstance(tolerance, Int8Tolerance):
        raise InputError("int8_tolerance must be an Int8Tolerance (from "
                         "sparsify_fx.export.quantize), got " + type(tolerance).__name__)
    if metric is not None and not callable(metric):
        raise InputError(f"metric must be callable as metric(predict) -> float, got "
                         f"{type(metric).__name__}")
    if quantize == "int8" and calibration is None:
        raise ConfigError(
            "quantize='int8' (static) needs calibration=: an iterable of example-input "
            "tuples or tensors (a few batches of real inputs, e.g. "
            "itertools.islice(train_loader, 8)); or use quantize='dynamic', which needs none")
    items = None if calibration is None else calibration_items(calibration, example_inputs,
                                                                batched)
    return QuantizeRequest(quantize, items, tolerance or Int8Tolerance(), metric, fp32_path)


def _array(t: Any) -> np.ndarray | None:
    if isinstance(t, Tensor):
        return t.detach().cpu().numpy()
    if isinstance(t, np.ndarray):
        return t
    return None


def calibration_items(calibration: Iterable[Any], example_inputs: tuple[Any, ...],
                      batched: bool) -> list[list[np.ndarray]]:
    """Each item of ``calibration`` (a Tensor/array, or a tuple/list of them) as arrays
    matching ``example_inputs``: same count (extra trailing leaves, such as a
    DataLoader's labels, are dropped), dtypes and shapes (dim 0 free when ``batched``)."""
    if isinstance(calibration, (Tensor, np.ndarray, str, bytes, dict)):
        raise InputError(f"calibration= must be an iterable of items (a list of input "
                         f"tuples or tensors, a DataLoader), got one {type(calibration).__name__}"
                         "; wrap a single batch in a list: calibration=[x]")
    try:
        raw = list(calibration)
    except TypeError as exc:
        raise InputError(f"calibration= must be iterable, got "
                         f"{type(calibration).__name__}; pass a list of input tuples or "
                         "tensors") from exc
    if not raw:
        raise ConfigError("calibration= is empty; pass at least one batch of real inputs")
    example = [t.detach().cpu().numpy() for t in tree_leaves(example_inputs)]
    items = []
    for k, item in enumerate(raw):
        leaves = [item] if _array(item) is not None else tree_leaves(item)
        arrays = [_array(t) for t in leaves]
        if len(arrays) < len(example) or any(a is None for a in arrays[:len(example)]):
            raise InputError(
                f"calibration item {k} ({type(item).__name__}) does not hold the model's "
                f"{len(example)} input tensor(s); each item must be a Tensor or a tuple "
                "whose first entries are the model's inputs (like example_inputs)")
        arrays = arrays[:len(example)]
        for i, (a, e) in enumerate(zip(arrays, example)):
            same = (a.shape[1:] == e.shape[1:] and a.ndim == e.ndim) if batched else (
                a.shape == e.shape)
            if a.dtype != e.dtype or not same:
                free = " (dim 0, the batch, may differ)" if batched else ""
                raise InputError(
                    f"calibration item {k}, input {i}: shape {tuple(a.shape)} dtype {a.dtype} "
                    f"does not match example_inputs' {tuple(e.shape)} {e.dtype}{free}; pass "
                    "calibration batches shaped like example_inputs")
        items.append([np.ascontiguousarray(a) for a in arrays])
    return items
