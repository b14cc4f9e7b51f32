"""``sparsify-fx prune hf:DIR --task causal-lm`` writes ``decoder.onnx`` (issue 33).

A tiny random GPT-2 folder (2 layers, hidden 64; tokenizer trained here), one-shot
magnitude pruning to 50 % with no training epochs, so the job is cheap. The decoder file must exist, generate greedily in onnxruntime what the saved
``hf/`` model generates with ``generate()``, and summary.json / report.md must hold
the prefill and decode tokens/s of the dense and the pruned decoder.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from sparsify_fx.cli.prune import main as prune_main
from sparsify_fx.prune import decoder_outputs
from tests.test_prune_hf import gpt2_folder, lm_text

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("hfdec")
    text = lm_text(12)
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    model = gpt2_folder(root / "gpt2", text.splitlines(), hidden=64)
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:  # one timing round: the fields, not their noise
        mp.setattr(decoder_outputs, "ROUNDS", 1)
        mp.setattr(decoder_outputs, "RUNS", 1)
        code = prune_main([
            f"hf:{model}", "--task", "causal-lm", "--data", f"text:{root / 'corpus.txt'}",
            "-o", str(out), "--method", "magnitude", "--target-sparsity", "0.5",
            "--block-size", "16", "--epochs", "0", "--finetune-epochs", "0",
            "--batch-size", "8", "--quiet"])
    assert code == 0
    return out


def test_causal_lm_job_writes_a_decoder_that_generates_as_pytorch(lm_run: pathlib.Path) -> None:
    from sparsify_fx.export.onnx_generate import greedy_generate
    assert (lm_run / "decoder.onnx").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(lm_run / "hf",
                                                              local_files_only=True).eval()
    w = model.transformer.h[0].mlp.c_fc.weight
    assert float((w == 0).float().mean()) > 0.3  # pruned
    outputs = []
    for seed in (1, 2):
        ids = torch.randint(3, model.config.vocab_size, (1, 6),
                            generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=12, min_new_tokens=12, use_cache=True,
                                  pad_token_id=model.config.eos_token_id).numpy()
        got = greedy_generate(str(lm_run / "decoder.onnx"), ids.numpy(), max_new_tokens=12)
        assert np.array_equal(got.sequences, want)
        outputs.append(want[0, 6:])
    assert not np.array_equal(outputs[0], outputs[1])  # the tokens follow the prompt


def test_summary_and_report_hold_tokens_per_second(lm_run: pathlib.Path) -> None:
    summary = json.loads((lm_run / "summary.json").read_text())
    dec = summary["decoder"]
    assert dec["file"] == "decoder.onnx"
    assert dec["bytes"] == (lm_run / "decoder.onnx").stat().st_size
    assert dec["verified"] and all(c["tokens_equal"] for c in dec["verified"])
    for side in ("dense", "pruned"):
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token"):
            assert dec[side][key] > 0
    assert dec["prefill_ratio"] > 0 and dec["decode_ratio"] > 0
    t = dec["timing"]
    assert t["prompt_length"] + t["decode_tokens"] < 64  # the GPT-2's 64 positions
    assert t["rounds"] == 1 and len(dec["verified"]) == 2  # two prompts verified
    report = (lm_run / "report.md").read_text()
    assert "## Generation" in report and "decode tokens/s" in report
