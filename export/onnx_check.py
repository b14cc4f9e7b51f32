"""The first two checks every written ONNX file passes: ``onnx.checker``, then onnxruntime loads it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import onnx

from sparsify_fx.errors import ExportError


def checked_session(path: Path, what: str, open_session: Callable[[Path], Any]) -> Any:
    """``open_session(path)`` after ``onnx.checker`` accepts the file; ExportError naming
    ``what`` ("the exported model", "the int8 model") when either refuses it."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {what}: {exc}") from exc
    try:
        return open_session(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        raise ExportError(f"onnxruntime could not load {what}: {exc}") from exc
