"""The first two checks every written ONNX file passes: ``onnx.checker``, then onnxruntime loads it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import onnx

from sparsify_fx.errors import ExportError

#: the domain onnx.checker leaves to its runtime (it checks only the standard domains)
RUNTIME_DOMAIN = "com.microsoft"
#: the domain names of the standard ONNX operator set
STANDARD_DOMAINS = ("", "ai.onnx")


def is_runtime_op(node: onnx.NodeProto) -> bool:
    """A node no standard ONNX schema describes: a custom domain (onnxruntime's
    ``com.microsoft``), or a default-domain op only onnxruntime registers
    (``SimplifiedLayerNormalization`` and kin)."""
    return node.domain not in STANDARD_DOMAINS or not onnx.defs.has(node.op_type)


def _runtime_ops_aside(path: Path) -> onnx.ModelProto:
    """The file's graph (weights left on disk) with default-domain nodes that no ONNX
    schema describes (onnxruntime's ``SimplifiedLayerNormalization`` and kin) moved to
    :data:`RUNTIME_DOMAIN`, so the checker checks everything else."""
    proto = onnx.load(str(path), load_external_data=False)
    moved = False
    for node in proto.graph.node:
        if node.domain in STANDARD_DOMAINS and is_runtime_op(node):
            node.domain = RUNTIME_DOMAIN
            moved = True
    if moved and not any(o.domain == RUNTIME_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(RUNTIME_DOMAIN, 1))
    return proto


def checked_session(path: Path, what: str, open_session: Callable[[Path], Any],
                    runtime_ops: bool = False) -> Any:
    """``open_session(path)`` after ``onnx.checker`` accepts the file; ExportError naming
    ``what`` ("the exported model", "the int8 model") when either refuses it.
    ``runtime_ops``: the file holds onnxruntime's fused ops (some registered in the
    default domain, which ``onnx.checker`` does not know): the checker checks the
    graph's structure without matching nodes to ONNX schemas, and onnxruntime, which
    owns those ops, checks them when it loads the file."""
    try:
        onnx.checker.check_model(_runtime_ops_aside(path) if runtime_ops else str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {what}: {exc}") from exc
    try:
        return open_session(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        raise ExportError(f"onnxruntime could not load {what}: {exc}") from exc
