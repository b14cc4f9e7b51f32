"""A model loaded from GGUF saves as a plain float ``save_pretrained`` folder (transformers
keeps its ``GgufHfQuantizer`` after de-quantizing, and ``save_pretrained`` refused: "The
model is quantized with gguf and is not serializable"; the prune job then failed after
its cut). Needs the ``pretrained`` extra (skips with the install line)."""
from __future__ import annotations

import pathlib

import pytest
import torch

from sparsify_fx.hf.pretrained import INSTALL, MissingCheckpointError, pretrained_path
from sparsify_fx.prune.hf_task import drop_dequantized_gguf


def test_plain_model_untouched() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    assert drop_dequantized_gguf(model) is False
    assert getattr(model, "hf_quantizer", None) is None


@pytest.mark.slow
def test_gguf_model_saves_and_reloads(tmp_path: pathlib.Path) -> None:
    transformers = pytest.importorskip("transformers")
    try:
        path = pretrained_path("smollm2")
    except MissingCheckpointError:
        pytest.skip(f"needs the pretrained extra: {INSTALL}")
    from sparsify_fx.hf.checkpoint_files import load_pretrained
    model, _ = load_pretrained(path, "causal-lm")
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    assert drop_dequantized_gguf(model) is True
    assert not model.is_quantized
    model.save_pretrained(tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "saved", local_files_only=True).eval()
    ids = torch.tensor([[1, 422, 3125, 28, 253, 1876, 30, 2]])
    with torch.no_grad():
        want, got = model.eval()(ids).logits[0, -1], again(ids).logits[0, -1]
    assert float(want.std()) > 0.1  # a real row, not constant
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
