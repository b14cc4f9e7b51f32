"""onnxruntime operator fusions in exported decoders (issue 33: the non-MatMul ops of a
decode step): ``export_decoder(fuse=True)`` (the default) rewrites RMSNorm, rotary and
attention patterns into onnxruntime's fused ops, keeps the generation check, falls back
level by level when a fused graph is refused, and never changes what the file computes.
"""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import sparsify_fx as sf
from sparsify_fx.errors import ExportError
from sparsify_fx.export.onnx_check import checked_session
from sparsify_fx.export.onnx_generate import greedy_generate
from sparsify_fx.export.ort_fusions import FusionWarning, fuse_for_onnxruntime
from tests.test_onnx_decoder import VOCAB, _llama

pytest.importorskip("transformers")


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fusions")
    model = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = sf.export_decoder(model, tmp / "fused.onnx")
        plain = sf.export_decoder(model, tmp / "plain.onnx", fuse=False, sparse=False,
                                   verify=False)
    return model, fused, plain


def test_fused_decoder_uses_runtime_ops_and_generates_the_unfused_tokens(exported) -> None:
    model, fused, plain = exported
    assert fused.fusion is not None and fused.fusion.skipped is None
    assert fused.fusion.counts.get("rms_normalization", 0) >= 2, fused.fusion.counts
    assert fused.fusion.nodes_after < fused.fusion.nodes_before
    ops, plain_ops = _ops(fused.path), _ops(plain.path)
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] >= 2
    assert "SimplifiedLayerNormalization" not in plain_ops and "Pow" in plain_ops
    assert sum(ops.values()) < sum(plain_ops.values())
    assert plain.fusion is None and all(c.tokens_equal for c in fused.checks)
    # same tokens and logits as the unfused file, on prompts that lead to different text
    outs = []
    for seed in (1, 2):
        ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
        a = greedy_generate(fused.decoder(), ids, max_new_tokens=12)
        b = greedy_generate(plain.decoder(), ids, max_new_tokens=12)
        np.testing.assert_array_equal(a.sequences, b.sequences)
        for x, y in zip(a.logits, b.logits):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
        outs.append(a.new_tokens)
    assert not np.array_equal(outs[0], outs[1])


def test_refused_levels_fall_back_then_leave_the_graph_unfused(exported, tmp_path) -> None:
    _, _, plain = exported
    proto = onnx.load(str(plain.path))
    seen: list[set[str]] = []

    def no_attention(p: onnx.ModelProto) -> str | None:
        ops = {n.op_type for n in p.graph.node}
        seen.append(ops)
        return "attention refused by the test" if "MultiHeadAttention" in ops else None

    result = fuse_for_onnxruntime(proto, no_attention)
    assert "MultiHeadAttention" in seen[0]  # the first level fused attention
    assert result.level == "norms" and result.refused and "by the test" in result.refused[0]
    assert "MultiHeadAttention" not in {n.op_type for n in result.proto.graph.node}
    assert result.counts.get("rms_normalization", 0) >= 2
    with pytest.warns(FusionWarning, match="refused everything"):
        none = fuse_for_onnxruntime(proto, lambda p: "refused everything")
    assert none.proto is proto and none.skipped and none.counts == {}


def test_checker_leaves_runtime_ops_to_onnxruntime(exported) -> None:
    _, fused, _ = exported
    with pytest.raises(ExportError, match="onnx.checker"):
        checked_session(fused.path, "the fused decoder", lambda p: p)
    assert checked_session(fused.path, "the fused decoder", lambda p: "opened",
                           runtime_ops=True) == "opened"


def test_weight_matmuls_stay_plain_so_int8_quantizes_them(exported) -> None:
    """A weight MatMul rewritten as ``FusedMatMul`` is skipped by ``quantize_dynamic`` (the
    tied lm_head stayed fp32): every MatMul reading an initializer stays ``MatMul``."""
    _, _, plain = exported
    fused = fuse_for_onnxruntime(onnx.load(str(plain.path))).proto
    weights = {t.name for t in fused.graph.initializer}
    readers = [n for n in fused.graph.node if set(n.input) & weights
               and "MatMul" in n.op_type]
    assert len(readers) >= 2 * 7 + 1  # q k v o gate up down per layer + lm_head
    assert {n.op_type for n in readers} == {"MatMul"}


def test_int8_preprocess_of_a_fused_graph_skips_symbolic_shapes_and_leaves_no_files(
        exported, tmp_path, monkeypatch) -> None:
    """Symbolic shape inference cannot finish on fused ops and then saves the model into
    the current directory (a 538 MB file for SmolLM2): a fused graph skips it."""
    from sparsify_fx.export.quantize import preprocess_for_quantization
    _, fused, plain = exported
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    out.mkdir()
    assert "without symbolic" in preprocess_for_quantization(fused.path, out / "f.onnx", False)
    assert preprocess_for_quantization(plain.path, out / "p.onnx", False) == "quant_pre_process"
    assert list(cwd.iterdir()) == []
    assert (out / "f.onnx").exists() and (out / "p.onnx").exists()
