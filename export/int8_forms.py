"""Further int8 forms of a verified fp32 decoder file, for speed comparisons.

``quantize="dynamic"`` (:mod:`sparsify_fx.export.quantize`) writes onnxruntime's
``quantize_dynamic`` form: per-tensor int8 MatMul weights, a ``DynamicQuantizeLinear``
per MatMul input at run time (fused by onnxruntime into ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat``), the tied embedding table kept in fp32 for the ``Gather``.
:func:`quantize_form` writes the others of :data:`INT8_VARIANTS` from the fp32 file:

- ``"dynamic_pc"``: ``quantize_dynamic`` with per-channel (per output column) weights;
- ``"nbits8"``: ``MatMulNBits`` with 8-bit symmetric weights in blocks of
  :data:`NBITS_BLOCK` along K (one fp32 scale per block) and ``accuracy_level=4``
  (onnxruntime quantizes the activations to int8 per block and runs int8 dot products;
  ``accuracy_level=0``, fp32 compute, has no 8-bit kernel on CPU and measured 100x
  slower); the embedding table is then quantized by ``quantize_dynamic`` on ``Gather``
  (int8 table + ``DequantizeLinear`` of the gathered rows; ``MatMulNBits`` quantizes
  ``Gather`` to 4 bits only), so no fp32 copy of the tied table is left.

:func:`verify_form` compares the new file with the fp32 file (which ``export_decoder``
verified against PyTorch): greedy tokens of the fp32 file for ``new_tokens`` steps,
then the int8 file teacher-forced on them, logits per step.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from sparsify_fx.errors import ConfigError, ExportError

#: variant name -> what it is
INT8_VARIANTS: dict[str, str] = {
    "dynamic_pc": "dynamic int8, per-channel weights (onnxruntime quantize_dynamic "
                  "per_channel=True); fp32 embedding table for the Gather",
    "nbits8": "int8 weights in blocks of 64 (onnxruntime MatMulNBits bits=8, symmetric, "
              "accuracy_level=4: int8 activations per block at run time) + int8 embedding "
              "table (Gather, quantize_dynamic)",
}
NBITS_BLOCK = 64


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every sparse initializer of ``model`` as a dense one (onnxruntime's quantizers
    do not see sparse initializers). Mutates and returns ``model``."""
    graph = model.graph
    for sp in graph.sparse_initializer:
        values, indices = numpy_helper.to_array(sp.values), numpy_helper.to_array(sp.indices)
        dense = np.zeros(tuple(sp.dims), values.dtype)
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values
        else:
            dense[tuple(indices.T)] = values
        graph.initializer.append(numpy_helper.from_array(dense, sp.values.name))
    del graph.sparse_initializer[:]
    return model


def quantize_form(fp32: Path, dst: Path, variant: str) -> Path:
    """Write ``variant`` (:data:`INT8_VARIANTS`) of the fp32 decoder file ``fp32`` at
    ``dst`` (one file, no external data: decoders under 2 GiB). Raises
    :class:`ConfigError` for an unknown variant, :class:`ExportError` when onnxruntime's
    quantizer fails."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from sparsify_fx.export.quantize import preprocess_for_quantization
    if variant not in INT8_VARIANTS:
        raise ConfigError(f"int8 variant {variant!r} is unknown; use one of "
                          f"{', '.join(INT8_VARIANTS)}")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    work = dst.parent
    dense, pre = work / f"{dst.stem}.dense.onnx", work / f"{dst.stem}.pre.onnx"
    mid = work / f"{dst.stem}.mid.onnx"
    try:
        onnx.save(densify(onnx.load(str(fp32))), str(dense))
        preprocess_for_quantization(dense, pre, False)
        if variant == "dynamic_pc":
            quantize_dynamic(str(pre), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                             per_channel=True, weight_type=QuantType.QInt8)
        else:
            q = MatMulNBitsQuantizer(onnx.load(str(pre)), bits=8, block_size=NBITS_BLOCK,
                                     is_symmetric=True, accuracy_level=4,
                                     op_types_to_quantize=("MatMul",))
            q.process()
            q.model.save_model_to_file(str(mid), False)
            quantize_dynamic(str(mid), str(dst), op_types_to_quantize=["Gather"],
                             per_channel=False, weight_type=QuantType.QInt8)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime.quantization raises anything
        raise ExportError(f"int8 variant {variant} of {fp32} failed: {type(exc).__name__}: "
                          f"{exc}"[:2000]) from exc
    finally:
        for f in (dense, pre, mid):
            f.unlink(missing_ok=True)
    return dst


def verify_form(fp32: Path, int8: Path, *, new_tokens: int = 16, seed: int = 0,
                threads: int | None = 2) -> dict[str, Any]:
    """Teacher-forced logits of ``int8`` against the fp32 file's greedy generation on the
    export's two default prompts (one row of 5 tokens; two rows of 7, one left-padded).
    Returns ``max_abs_diff`` (over steps, rows, vocabulary), ``logit_scale`` (max |fp32
    logits| at that step), ``ratio`` (their quotient) and the greedy ``agreement`` (the
    int8 file's own arg-max equal to the fp32 token)."""
    from sparsify_fx.export.decoder_verify import default_prompts
    from sparsify_fx.export.onnx_generate import OnnxDecoder, greedy_generate
    ref, new = OnnxDecoder(fp32, threads), OnnxDecoder(int8, threads)
    worst = {"max_abs_diff": 0.0, "logit_scale": 1.0, "ratio": 0.0}
    agree, total = 0, 0
    for ids, mask in default_prompts(ref.vocab or 2, seed):
        ids, mask = ids.numpy(), mask.numpy()
        g32 = greedy_generate(ref, ids, mask, max_new_tokens=new_tokens)
        g8 = greedy_generate(new, ids, mask, max_new_tokens=new_tokens,
                             forced_tokens=g32.new_tokens)
        for step32, step8, token in zip(g32.logits, g8.logits, g32.new_tokens.T):
            diff = float(np.abs(step8 - step32).max())
            scale = float(np.abs(step32).max())
            if diff / scale > worst["ratio"]:
                worst = {"max_abs_diff": diff, "logit_scale": scale, "ratio": diff / scale}
            agree += int((step8.argmax(-1) == token).sum())
            total += len(token)
    return {**worst, "agreement": agree / max(total, 1), "new_tokens": new_tokens}
