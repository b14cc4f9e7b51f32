"""Pretrained checkpoints of the ``pretrained`` extra (SmolLM2 GGUF, MiniLM folder) through
the public loading path, compared with transformers' own model; and the path rules
(folder / .gguf / folder holding one .gguf), which need no extra."""
from __future__ import annotations

import pathlib

import pytest
import torch

from sparsify_fx.errors import InputError
from sparsify_fx.hf.checkpoint_files import resolve_checkpoint
from sparsify_fx.hf.pretrained import INSTALL, MissingCheckpointError, pretrained_path


def _need(name: str) -> pathlib.Path:
    try:
        return pretrained_path(name)
    except MissingCheckpointError:
        pytest.skip(f"needs the pretrained extra: {INSTALL}")


def test_checkpoint_paths(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    assert resolve_checkpoint(tmp_path / "a") == (tmp_path / "a", None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "m.gguf").write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "b") == (tmp_path / "b", "m.gguf")
    assert resolve_checkpoint(tmp_path / "b" / "m.gguf") == (tmp_path / "b", "m.gguf")
    (tmp_path / "b" / "n.gguf").write_bytes(b"")
    with pytest.raises(InputError, match="several GGUF files"):
        resolve_checkpoint(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(InputError, match="no config.json and no .gguf"):
        resolve_checkpoint(tmp_path / "c")
    with pytest.raises(InputError, match="no such folder"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(InputError, match="unknown pretrained checkpoint"):
        pretrained_path("gpt5")


@pytest.mark.slow
def test_smollm2_gguf_loads_through_hf_prefix() -> None:
    import transformers
    from sparsify_fx.prune.hf_task import load_hf
    gguf = _need("smollm2")
    hf = load_hf(f"hf:{gguf.parent}", "causal-lm")  # the folder holding one .gguf file
    assert type(hf.source).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in hf.source.parameters()) == 134_515_008
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True).eval()
    ids = torch.tensor([hf.preprocessor("def add(a, b):\n    return a + b")["input_ids"]])
    other = torch.tensor([hf.preprocessor("The json module encodes objects.")["input_ids"]])
    with torch.no_grad():
        ours = hf.adapter(ids)[0, :, -1]  # adapter layout (B, V, T)
        theirs = ref(ids, use_cache=False).logits[0, -1]
        else_ = hf.adapter(other)[0, :, -1]
    assert float((ours - else_).abs().max()) > 1.0  # the logits depend on the input
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # a pretrained model predicts its own text: "return a + b" after "def add(a, b):"
    assert float(torch.nn.functional.cross_entropy(
        hf.adapter(ids)[:, :, :-1], ids[:, 1:])) < 4.0


@pytest.mark.slow
def test_minilm_folder_loads_through_public_path() -> None:
    import transformers
    from sparsify_fx.hf.checkpoint_files import load_pretrained
    folder = _need("minilm")
    model, tok = load_pretrained(folder, "feature-extraction")
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 384
    ref = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(["sorted returns a new list", "open a file for reading"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).last_hidden_state[:, 0]
        theirs = ref(**batch).last_hidden_state[:, 0]
    assert float((ours[0] - ours[1]).abs().max()) > 1e-2  # varies with the input
    assert torch.allclose(ours, theirs, atol=1e-5)
