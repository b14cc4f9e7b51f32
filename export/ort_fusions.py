"""Operator fusions for onnxruntime on an exported transformer graph.

``torch.onnx.export`` writes a decoder layer as dozens of small ops: RMSNorm as
``Pow/ReduceMean/Add/Sqrt/Div/Mul``, rotary embeddings as slices, negations and
concatenations, attention as ``MatMul/Softmax/MatMul`` around reshapes. In a decode
step (one token) each of those ops costs a kernel launch over a tiny tensor, so the
non-MatMul ops take a large share of the step (issue 33: about 2,150 nodes per step on
SmolLM2-135M). :func:`fuse_for_onnxruntime` rewrites them into onnxruntime's fused
contrib ops (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``,
``RotaryEmbedding``, ``MultiHeadAttention``, ...) with the fusion rules of the pattern
rewriter that ships with the ONNX exporter (``onnxscript.rewriter.ort_fusions``), in
the order of its ``optimize_for_ort`` but without its ``FusedMatMul`` rules (see
:func:`_steps`).

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
from typing import Callable

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


def _steps(level: str) -> list[tuple[str, Callable[..., int]]]:
    """The rewriter's fusions of ``level``, in the order onnxscript's own
    ``optimize_for_ort`` applies them. Left out on purpose: its ``FusedMatMul`` /
    softmax rule sets (a weight ``MatMul`` turned into ``FusedMatMul`` is no longer
    quantized by ``quantize_dynamic``: the tied lm_head stayed fp32, 13 % of an int8
    decode step; onnxruntime makes the same fusion itself when it loads the file)."""
    from onnxscript.rewriter.ort_fusions import (attention, bias_gelu, cos_sin_cache, erfgelu,
                                                 gelu, gqa, gqa_packed_qkv, mha, mha_bias,
                                                 mha_scale, rms_normalization, rotary_embedding,
                                                 sdpa, sdpa_via_mha, skip_normalization)
    norms = [("erf_gelu", erfgelu.fuse_erfgelu),
             ("rms_normalization", rms_normalization.fuse_rms_normalization),
             ("skip_layer_normalization", skip_normalization.fuse_skip_layer_normalization),
             ("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization),
             ("rotary_embedding", rotary_embedding.fuse_rotary_embedding),
             ("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache),
             ("partial_rotary_embedding", rotary_embedding.fuse_partial_rotary_embedding)]
    if level == "norms":
        return norms
    return norms + [
        ("sdpa", lambda m: sdpa.fuse_sdpa(m, apply_shape_inference=True)),
        ("gqa", gqa.fuse_gqa), ("packed_qkv_for_gqa", gqa_packed_qkv.fuse_qkv_gqa),
        ("mha1", mha.fuse_mha1), ("mha2", mha.fuse_mha2), ("mha_scale", mha_scale.fuse_mha_scale),
        ("mha_bias", mha_bias.fuse_mha_bias), ("attention", attention.fuse_attention),
        ("gelu", gelu.fuse_gelu), ("bias_gelu", bias_gelu.fuse_bias_gelu),
        ("sdpa_via_mha", sdpa_via_mha.replace_sdpa_by_mha)]


def _fused(proto: onnx.ModelProto, level: str) -> tuple[onnx.ModelProto, dict[str, int]]:
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import shape_optimization
    model = ir.serde.deserialize_model(proto)
    counts: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        common_passes.ShapeInferencePass()(model)
        optimize(model)
        shape_optimization.rules.apply_to_model(model)
        optimize(model)
        for name, step in _steps(level):
            if name in ("mha_bias", "attention") and not (counts.get("mha1") or counts.get("mha2")):
                continue  # these complete an MHA fusion; without one they have nothing to do
            counts[name] = int(step(model))
        optimize(model)  # inline what no later fusion consumed, drop unused nodes
    return ir.serde.serialize_model(model), {k: n for k, n in counts.items() if n}


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
