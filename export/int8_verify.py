"""Verification of an int8 ONNX file against the PyTorch model it came from.

Contract of :func:`verify_int8`: every verification item (each calibration item;
the example inputs without calibration or with ``reference_outputs=``) is run in
onnxruntime and compared with PyTorch's outputs on it; the check passes only when

- ``max |int8 - PyTorch| <= atol + rtol * max |PyTorch|`` over all outputs and items;
- for a classifier-shaped first output (2-D, at least 2 columns) with at least
  :data:`ARGMAX_MIN_ROWS` rows, the fraction of rows whose arg-max agrees is
  ``>= min_argmax_agreement`` (fewer rows: reported, not checked);
- with a ``metric`` callback, ``metric(int8) >= metric(PyTorch) - max_metric_drop *
  |metric(PyTorch)|`` (a higher-is-better score).

Anything else raises :class:`~sparsify_fx.errors.ExportError` naming the measured
value, its bound and the option that changes the bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from sparsify_fx.errors import ConfigError, ExportError

#: a prediction function: positional inputs (Tensors or arrays) -> first output as numpy
Predict = Callable[..., np.ndarray]
#: a higher-is-better score of a prediction function (e.g. accuracy on held-out data)
Metric = Callable[[Predict], float]

#: fewer rows than this: arg-max agreement is reported but not checked
ARGMAX_MIN_ROWS = 10


@dataclass(frozen=True)
class Int8Tolerance:
    """The documented int8 error budget (docs/export.md, "int8 quantization").

    ``rtol``/``atol``: ``max |int8 - PyTorch| <= atol + rtol * max |PyTorch output|``.
    Measured: 0.7 % of the scale for a trained digits CNN (static), 1.5 % for a
    random-weight resnet18 (static), 11.5 % for a random-weight BERT-base (dynamic),
    so the default 0.2 catches broken quantization, not int8 rounding.
    ``min_argmax_agreement``: classifier outputs (``None`` switches the check off, e.g.
    for box regressors). ``max_metric_drop``: allowed drop of the ``metric`` callback
    as a fraction of ``|metric(PyTorch)|``.
    """

    rtol: float = 0.2
    atol: float = 1e-3
    min_argmax_agreement: float | None = 0.9
    max_metric_drop: float = 0.01

    def __post_init__(self) -> None:
        for name in ("rtol", "atol", "max_metric_drop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ConfigError(f"Int8Tolerance.{name} must be a number >= 0, got {value!r}")
        agree = self.min_argmax_agreement
        if agree is not None and not (isinstance(agree, (int, float)) and 0 <= agree <= 1):
            raise ConfigError("Int8Tolerance.min_argmax_agreement must be in [0, 1] or None, "
                              f"got {agree!r}")


@dataclass(frozen=True)
class Int8Check:
    """What :func:`verify_int8` measured (all items together)."""

    max_abs_diff: float
    bound: float
    argmax_agreement: float | None
    rows: int
    metric_fp32: float | None = None
    metric_int8: float | None = None


def _flat(outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float64) for o in outputs]


def verify_int8(run: Callable[[list[np.ndarray]], list[np.ndarray]],
                items: list[list[np.ndarray]], references: list[list[np.ndarray]],
                tolerance: Int8Tolerance, metric: Metric | None = None,
                predict_fp32: Predict | None = None, predict_int8: Predict | None = None,
                ) -> Int8Check:
    """Check the int8 model (``run``: positional arrays -> all outputs) on ``items``
    against ``references`` (PyTorch's outputs on each item) within ``tolerance``;
    :class:`ExportError` on any failure. ``metric`` is called with ``predict_fp32``
    (PyTorch) and ``predict_int8`` (onnxruntime)."""
    outs = [_flat(run(item)) for item in items]
    refs = [_flat(r) for r in references]
    scale = max((float(np.abs(e).max()) for r in refs for e in r if e.size), default=0.0)
    bound = tolerance.atol + tolerance.rtol * scale
    worst = 0.0
    for k, (out, ref) in enumerate(zip(outs, refs)):
        if len(out) != len(ref):
            raise ExportError(f"the int8 model returned {len(out)} outputs for verification "
                              f"item {k}, PyTorch {len(ref)}")
        for i, (o, e) in enumerate(zip(out, ref)):
            if o.shape != e.shape:
                raise ExportError(f"int8 output {i} of verification item {k} has shape "
                                  f"{o.shape}, PyTorch {e.shape}")
            if o.size:
                worst = max(worst, float(np.abs(o - e).max()))
    if not np.isfinite(worst) or worst > bound:
        raise ExportError(
            f"int8 verification failed: max abs diff {worst:.4g} > tolerance {bound:.4g} "
            f"(atol {tolerance.atol:g} + rtol {tolerance.rtol:g} x output scale {scale:.4g}) "
            f"over {len(items)} verification item(s); calibrate on more representative "
            "batches, try quantize='dynamic', or loosen int8_tolerance=Int8Tolerance(rtol=...)")
    agreement, rows = _argmax(outs, refs)
    if (agreement is not None and tolerance.min_argmax_agreement is not None
            and rows >= ARGMAX_MIN_ROWS and agreement < tolerance.min_argmax_agreement):
        raise ExportError(
            f"int8 verification failed: arg-max agrees with PyTorch on {agreement:.3f} of "
            f"{rows} rows < min_argmax_agreement {tolerance.min_argmax_agreement:g}; "
            "calibrate on more representative batches, or pass int8_tolerance="
            "Int8Tolerance(min_argmax_agreement=None) if the first output is not class scores")
    m32 = m8 = None
    if metric is not None and predict_fp32 is not None and predict_int8 is not None:
        m32, m8 = _score(metric, predict_fp32, "PyTorch"), _score(metric, predict_int8, "int8")
        allowed = tolerance.max_metric_drop * abs(m32)
        if not np.isfinite(m8) or m32 - m8 > allowed:
            raise ExportError(
                f"int8 verification failed: metric {m8:.6g} (int8) vs {m32:.6g} (PyTorch), "
                f"a drop of {m32 - m8:.4g} > allowed {allowed:.4g} (max_metric_drop "
                f"{tolerance.max_metric_drop:g} x |PyTorch metric|); the metric must be "
                "higher-is-better; loosen int8_tolerance=Int8Tolerance(max_metric_drop=...)")
    return Int8Check(worst, bound, agreement, rows, m32, m8)


def _argmax(outs: list[list[np.ndarray]], refs: list[list[np.ndarray]]
            ) -> tuple[float | None, int]:
    """Arg-max agreement of the first output when every item's is ``[rows, classes>=2]``."""
    firsts = [(o[0], r[0]) for o, r in zip(outs, refs) if o and r]
    if not firsts or any(r.ndim != 2 or r.shape[1] < 2 for _, r in firsts):
        return None, 0
    same = sum(int((o.argmax(1) == r.argmax(1)).sum()) for o, r in firsts)
    rows = sum(r.shape[0] for _, r in firsts)
    return same / rows, rows


def _score(metric: Metric, predict: Predict, which: str) -> float:
    try:
        value = metric(predict)
    except Exception as exc:  # noqa: BLE001 - the user's callback raises anything
        raise ExportError(f"the metric callback failed on the {which} model "
                          f"({type(exc).__name__}: {exc}); it is called as metric(predict) "
                          "where predict(*inputs) returns the first output as numpy") from exc
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"the metric callback returned {value!r}; return a float "
                          "(higher is better)") from exc

