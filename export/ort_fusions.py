"""Operator fusions for onnxruntime on an exported transformer graph.

``torch.onnx.export`` writes a decoder layer as dozens of small ops: RMSNorm as
``Pow/ReduceMean/Add/Sqrt/Div/Mul``, rotary embeddings as slices, negations and
concatenations, attention as ``MatMul/Softmax/MatMul`` around reshapes. In a decode
step (one token) each of those ops costs a kernel launch over a tiny tensor, so the
non-MatMul ops take a large share of the step (issue 33: about 2,150 nodes per step on
SmolLM2-135M). :func:`fuse_for_onnxruntime` rewrites them into onnxruntime's fused
contrib ops (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``,
``RotaryEmbedding``, ``MultiHeadAttention``, ...) with the pattern rewriter that ships
with the ONNX exporter (``onnxscript.rewriter.ort_fusions.optimize_for_ort``).

Contract: ``proto`` is not mutated; the result computes the same function up to
float rounding (callers verify it: :func:`sparsify_fx.export.onnx_decoder.export_decoder`
runs its generation check on the fused file). The fused file needs onnxruntime (the
``com.microsoft`` domain): other runtimes should ask for ``fuse=False``. When the
rewriter is missing or fails, or the caller's ``accept`` check refuses every level
(:data:`LEVELS`), the original graph is returned with a :class:`FusionWarning` naming
the reasons, never a half-rewritten graph. (The attention rewrite, for instance, breaks
GPT-2's ``Gemm`` over a flattened view in onnxscript 0.7: the norms-only level is then
used.)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx


class FusionWarning(UserWarning):
    """The fusion pass could not run; the graph was exported unfused."""


@dataclass(frozen=True)
class FusionResult:
    """``proto``: the fused (or, on failure, the original) graph; ``counts``: fused
    patterns by name (only those found); ``nodes_before`` / ``nodes_after``: top-level
    node counts; ``skipped``: why nothing was fused (``None`` when the pass ran);
    ``level``: the :data:`LEVELS` entry used; ``refused``: why earlier levels were not."""

    proto: onnx.ModelProto
    counts: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    skipped: str | None = None
    level: str | None = None
    refused: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.skipped is not None:
            return f"not fused ({self.skipped})"
        found = ", ".join(f"{name} {n}" for name, n in sorted(self.counts.items()))
        return (f"onnxruntime fusions ({self.level}): {found or 'none found'}; "
                f"{self.nodes_before} -> {self.nodes_after} nodes")


#: fusion levels tried in order: everything onnxruntime's rewriter knows (attention
#: included), then normalisations and rotary embeddings only
LEVELS = ("attention", "norms")

#: ``accept(fused_proto)``: ``None`` when the fused graph is acceptable (e.g. it loads
#: in onnxruntime and matches reference outputs), else the reason it is not
Accept = Callable[[onnx.ModelProto], "str | None"]


def _fuse_norms(model: Any) -> dict[str, int]:
    """Normalisation and rotary-embedding fusions only (no attention rewrite)."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.rotary_embedding import (
        fuse_partial_rotary_embedding, fuse_rotary_embedding)
    from onnxscript.rewriter.ort_fusions.skip_normalization import (
        fuse_skip_layer_normalization, fuse_skip_rms_normalization)
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    steps = {"rms_normalization": fuse_rms_normalization,
             "skip_layer_normalization": fuse_skip_layer_normalization,
             "skip_rms_normalization": fuse_skip_rms_normalization,
             "rotary_embedding": fuse_rotary_embedding, "cos_sin_cache": fuse_cos_sin_cache,
             "partial_rotary_embedding": fuse_partial_rotary_embedding}
    counts = {name: step(model) for name, step in steps.items()}
    optimize(model)
    return counts


def _fused(proto: onnx.ModelProto, level: str) -> tuple[onnx.ModelProto, dict[str, int]]:
    import onnx_ir as ir
    model = ir.serde.deserialize_model(proto)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if level == "attention":
            from onnxscript.rewriter.ort_fusions import optimize_for_ort
            model, counts = optimize_for_ort(model)
        else:
            counts = _fuse_norms(model)
    return ir.serde.serialize_model(model), {k: int(n) for k, n in counts.items() if n}


def fuse_for_onnxruntime(proto: onnx.ModelProto, accept: Accept | None = None) -> FusionResult:
    """Fuse ``proto``'s transformer patterns into onnxruntime contrib ops (module
    docstring). The levels of :data:`LEVELS` are tried in order; the first whose graph
    ``accept`` takes (any graph when ``accept`` is ``None``) is returned, with its
    level; when none is taken, ``proto`` itself with a :class:`FusionWarning` giving
    each level's reason."""
    before = len(proto.graph.node)
    try:
        import onnx_ir  # noqa: F401
        import onnxscript.rewriter.ort_fusions  # noqa: F401
    except ImportError as exc:
        return _unfused(proto, f"onnxscript's ORT fusions are not importable: {exc}")
    reasons = []
    for level in LEVELS:
        try:
            fused, counts = _fused(proto, level)
        except Exception as exc:  # noqa: BLE001 - the rewriter raises many types
            reasons.append(f"{level}: the rewriter failed: {type(exc).__name__}: {exc}"[:300])
            continue
        if not counts:
            reasons.append(f"{level}: no pattern found")
            continue
        refused = accept(fused) if accept is not None else None
        if refused is None:
            return FusionResult(fused, counts, before, len(fused.graph.node), level=level,
                                refused=tuple(reasons))
        reasons.append(f"{level}: {refused}"[:300])
    return _unfused(proto, "; ".join(reasons))


def _unfused(proto: onnx.ModelProto, reason: str) -> FusionResult:
    warnings.warn(f"the graph is exported without onnxruntime fusions ({reason}); pass "
                  "fuse=False to skip the attempt", FusionWarning, stacklevel=3)
    before = len(proto.graph.node)
    return FusionResult(proto, nodes_before=before, nodes_after=before, skipped=reason)


__all__ = ["LEVELS", "FusionResult", "FusionWarning", "fuse_for_onnxruntime"]
