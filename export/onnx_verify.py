"""Verification of an exported ONNX file in onnxruntime, at every shape it claims to take.

``export_onnx`` exports the batch dim and the sequence dims as dynamic ONNX dims
(``dim_param``; :mod:`sparsify_fx.export.onnx_dims` reads them back from the file's graph
inputs). :func:`shape_variants` builds inputs at the example shape, at twice the batch, and at a
second length of every dynamic non-batch dim (:func:`other_length`: a few tokens
shorter, so it stays within position embeddings), each alone and together; and
:func:`verify` compares onnxruntime with PyTorch on each (``atol + rtol * max|ref|``).
:func:`feeds` gives a session its inputs by name (keyword inputs) or in order
(positional ones). Read-only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from sparsify_fx.capture.inputs import ModelInputs
from sparsify_fx.errors import ExportError, InputError


@dataclass(frozen=True)
class ShapeCheck:
    """One verified shape: ``what`` (for messages) and the flat input shapes."""

    what: str
    shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float


def feeds(session: Any, inputs: ModelInputs | Mapping[str, Any] | Sequence[Any]
          ) -> dict[str, np.ndarray]:
    """``{session input name: array}``: a mapping or keyword inputs by name when the
    session's inputs are the keywords, otherwise every flat tensor in order. InputError
    on a count mismatch or a missing name."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(f"the ONNX model takes inputs {', '.join(names)}; "
                             f"{missing[0]!r} was not given")
        return {n: _array(inputs[n]) for n in names}
    if isinstance(inputs, ModelInputs):
        if inputs.keywords and not inputs.args and set(names) <= set(inputs.kwargs):
            return {n: _array(inputs.kwargs[n]) for n in names}
        arrays = [_array(t) for t in inputs.tensors()]
    else:
        arrays = [_array(t) for t in inputs]
    if len(names) != len(arrays):
        raise InputError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), "
                         f"got {len(arrays)}")
    return dict(zip(names, arrays))


def _array(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


def run(session: Any, inputs: ModelInputs | Sequence[Any]) -> list[np.ndarray]:
    """Every output of ``session`` on ``inputs``."""
    return session.run(None, feeds(session, inputs))


def compare(outputs: list[np.ndarray], expected: list[np.ndarray], rtol: float,
            atol: float, what: str) -> tuple[float, float]:
    """Largest abs diff and its bound; raises :class:`ExportError` past the bound."""
    if len(outputs) != len(expected):
        raise ExportError(f"onnxruntime returned {len(outputs)} outputs for {what}, "
                          f"PyTorch {len(expected)}")
    scale = max(float(np.abs(e).max()) if e.size else 0.0 for e in expected)
    bound = atol + rtol * scale
    worst = 0.0
    for i, (o, e) in enumerate(zip(outputs, expected)):
        if o.shape != e.shape:
            raise ExportError(f"output {i} has shape {o.shape} in onnxruntime and {e.shape} in "
                              f"PyTorch for {what}")
        diff = float(np.abs(o.astype(np.float64) - e.astype(np.float64)).max()) if o.size else 0.0
        if not np.isfinite(diff) or diff > bound:
            raise ExportError(
                f"verification failed for {what}: output {i} max abs diff {diff:.4g} > "
                f"tolerance {bound:.4g} (atol {atol:g} + rtol {rtol:g} x output scale "
                f"{scale:.4g}); the ONNX file does not reproduce the PyTorch model")
        worst = max(worst, diff)
    return worst, bound


def other_length(size: int) -> int:
    """The second length a dynamic non-batch dim is verified at: a few tokens shorter
    (within the position embeddings the example fits), at least 2; longer by 2 when the
    example is too short to shrink."""
    shorter = size - max(1, min(4, size // 3))
    return shorter if shorter >= 2 else size + 2


def _resize(t: Tensor, dim: int, size: int) -> Tensor:
    if size <= t.shape[dim]:
        return t.narrow(dim, 0, size).contiguous()
    extra = t.narrow(dim, 0, size - t.shape[dim])  # first entries repeated: valid tokens
    return torch.cat([t, extra], dim)


def shape_variants(inputs: ModelInputs, names: Sequence[str],
                   dims: Mapping[str, Mapping[int, str]], batched: bool
                   ) -> list[tuple[str, ModelInputs, bool]]:
    """(what, inputs, doubled batch) to verify: the example; twice the batch when it is
    dynamic; each at :func:`other_length` of every dynamic non-batch dim (one new size
    per symbol, so dims the file ties stay equal)."""
    out = [("the example inputs", inputs, False)]
    if batched:
        out.append((f"batch {2 * inputs.batch_size} (dynamic batch check; pass "
                    "dynamic_batch=False if the model fixes its batch size)",
                    inputs.repeat_batch(), True))
    sizes: dict[str, int] = {}
    tensors = inputs.tensors()
    plan: dict[int, dict[int, int]] = {}
    for i, name in enumerate(names[:len(tensors)]):
        for d, sym in dims.get(name, {}).items():
            if (d == 0 and batched) or d >= tensors[i].dim():
                continue
            key = sym or f"{name}:{d}"
            sizes.setdefault(key, other_length(int(tensors[i].shape[d])))
            plan.setdefault(i, {})[d] = sizes[key]
    if not plan:
        return out
    counter = iter(range(len(tensors)))

    def resize(t: Tensor) -> Tensor:
        i = next(counter)
        for d, size in plan.get(i, {}).items():
            t = _resize(t, d, size)
        return t
    varied = inputs.map(resize)
    lengths = ", ".join(f"{k}={v}" for k, v in sizes.items())
    out.append((f"dynamic dims at {lengths} (pass dynamic_sequence=False or "
                "dynamic_shapes= to keep them static)", varied, False))
    if batched:
        out.append((f"batch {2 * inputs.batch_size} with {lengths}", varied.repeat_batch(),
                    True))
    return out


def verify(session: Any, variants: list[tuple[str, ModelInputs, bool]],
           reference: Callable[[ModelInputs], list[Tensor]], example_reference: list[Tensor],
           rtol: float, atol: float, tile_reference: bool
           ) -> tuple[float, float, list[ShapeCheck]]:
    """Compare onnxruntime with PyTorch at every variant: the example against
    ``example_reference``, the others against ``reference(inputs)`` (PyTorch on those
    inputs) or, for the doubled example with ``tile_reference`` (user-given reference
    outputs), that reference tiled along dim 0. Returns (worst diff, bound, checks)."""
    worst, bound, checks = 0.0, 0.0, []
    batch = variants[0][1].batch_size
    for k, (what, inputs, doubled) in enumerate(variants):
        if k == 0:
            expected = [t.numpy() for t in example_reference]
        elif doubled and tile_reference and inputs.shapes() == variants[1][1].shapes():
            expected = [np.concatenate([e, e]) if e.ndim and e.shape[0] == batch else e
                        for e in (t.numpy() for t in example_reference)]
        else:
            expected = [t.numpy() for t in reference(inputs)]
        diff, b = compare(run(session, inputs), expected, rtol, atol, what)
        worst = max(worst, diff)
        bound = b if k == 0 else bound
        checks.append(ShapeCheck(what.split(" (")[0], tuple(inputs.shapes()), diff))
    return worst, bound, checks


__all__ = ["ShapeCheck", "feeds", "run", "compare", "other_length", "shape_variants", "verify"]
