"""Further int8 forms of a decoder file (``export/int8_forms.py``): what each form holds
(op types, weight dtypes, no fp32 copy of the embedding table for ``nbits8``), its
teacher-forced logits against the fp32 file, and that the check catches a broken file.

The decoder export takes ~20 s on 2 cores (a tiny random Llama): those tests are slow.
"""
from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from sparsify_fx.errors import ConfigError
from sparsify_fx.export.int8_forms import INT8_VARIANTS, densify, quantize_form, verify_form

transformers = pytest.importorskip("transformers")


def test_densify_restores_sparse_initializers() -> None:
    dense = np.zeros((3, 4), np.float32)
    dense[0, 1], dense[2, 3] = 1.5, -2.0
    flat = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.reshape(-1)[flat], "w"),
                                       numpy_helper.from_array(flat.astype(np.int64), "w_i"),
                                       [3, 4])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        sparse_initializer=[sparse])
    model = densify(helper.make_model(graph))
    assert len(model.graph.sparse_initializer) == 0
    (w,) = model.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(w), dense)


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nbits8"):
        quantize_form(tmp_path / "a.onnx", tmp_path / "b.onnx", "int3")


@pytest.fixture(scope="module")
def fp32_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sparsify_fx as sf
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, use_cache=False)).eval()
    path = tmp_path_factory.mktemp("int8_forms") / "dense.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sf.export_decoder(model, path)
    return path


def _ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _float_tables(path: Path) -> list[str]:
    return [t.name for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and sorted(t.dims) == [64, 256]]


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(INT8_VARIANTS))
def test_variant_is_int8_and_close_to_fp32(fp32_decoder: Path, variant: str) -> None:
    dst = quantize_form(fp32_decoder, fp32_decoder.with_name(f"{variant}.onnx"), variant)
    ops = _ops(dst)
    assert "MatMul" in _ops(fp32_decoder) and _float_tables(fp32_decoder)
    if variant == "nbits8":  # 2 layers x 7 Linears + lm_head; the attention stays fp32
        assert ops["MatMulNBits"] == 15
        assert _float_tables(dst) == []  # no fp32 copy of the tied table
        assert ops["DequantizeLinear"] == 1  # the gathered embedding rows
    else:  # per-channel: a scale per output column of every quantized weight
        assert ops["MatMulInteger"] == 15
        scales = [t for t in onnx.load(str(dst)).graph.initializer if t.name.endswith("_scale")
                  and len(t.dims) == 1 and t.dims[0] > 1]
        assert len(scales) >= 15
    check = verify_form(fp32_decoder, dst)
    assert check["logit_scale"] > 0.1  # logits are not all zero
    assert check["ratio"] < 0.1, check
    assert check["agreement"] >= 0.8, check
    assert dst.stat().st_size < 0.6 * fp32_decoder.stat().st_size


@pytest.mark.slow
def test_verify_form_catches_a_broken_file(fp32_decoder: Path) -> None:
    dst = quantize_form(fp32_decoder, fp32_decoder.with_name("broken.onnx"), "nbits8")
    model = onnx.load(str(dst))
    for t in model.graph.initializer:  # every block scale of the lm_head x 5
        if t.name.endswith("_scales") and 256 in t.dims:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 5, t.name))
    onnx.save(model, str(dst))
    assert verify_form(fp32_decoder, dst)["ratio"] > 1.0
