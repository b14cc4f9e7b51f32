"""Keyword example inputs (``model(**tokenizer(...))``) through capture, report, costs,
calibration and ONNX with a dynamic sequence length (issue 24).

Tiny random-weight configs; nothing downloads. Speech: transformers'
``Speech2TextForConditionalGeneration`` (``input_features``, ``attention_mask``,
``decoder_input_ids``), captured by torch.export with ``kwargs=``. Text: BERT with an
attention mask that has zeros in it and two token types.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import sparsify_fx
from sparsify_fx.budgets.exact_cut import weight_costs
from sparsify_fx.capture.exported_module import ExportedModule
from sparsify_fx.capture.inputs import ModelInputs, as_model_inputs
from sparsify_fx.errors import InputError, SparsifyError
from sparsify_fx.mask_index import hard_masks

transformers = pytest.importorskip("transformers")

AUTO = torch.export.Dim.AUTO
VOCAB = 100
BERT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3)).eval()


def _tok(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """What a tokenizer returns: ids, a padding mask with zeros, two segments."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - max(2, seq // 3):] = 0  # the first row is padded
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).clone()
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g),
            "attention_mask": mask, "token_type_ids": types}


def _speech() -> nn.Module:
    torch.manual_seed(0)
    return transformers.Speech2TextForConditionalGeneration(transformers.Speech2TextConfig(
        vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, input_feat_per_channel=8, input_channels=1, conv_channels=16,
        num_conv_layers=2, max_source_positions=64, max_target_positions=32,
        use_cache=False, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)).eval()


def _speech_inputs(seed: int = 0, frames: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, frames, dtype=torch.long)
    mask[1, frames - 6:] = 0
    return {"input_features": torch.randn(2, frames, 8, generator=g), "attention_mask": mask,
            "decoder_input_ids": torch.randint(3, 50, (2, 5), generator=g)}


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _magnitude_cut(gm: nn.Module, fraction: float = 0.5) -> None:
    sparsify_fx.apply_budget(gm, target_sparsity=fraction,
                             scores={e.name: e.weight.detach().abs()
                                     for e in sparsify_fx.masks(gm)})


@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, nn.Module]:
    source = _bert()
    kw = _tok(2, 12)
    spec = {k: {0: AUTO, 1: AUTO} for k in kw}
    gm = _quiet(sparsify_fx.transform, source, example_inputs=kw, dynamic_shapes=spec)
    return source, gm


def test_model_inputs_type(bert) -> None:
    source, _ = bert
    kw = _tok(2, 6)
    inputs = as_model_inputs(kw)
    assert isinstance(inputs, ModelInputs) and inputs.keywords and inputs.batch_size == 2
    assert as_model_inputs(inputs) is inputs
    assert as_model_inputs(torch.zeros(3, 2)).args[0].shape == (3, 2)
    assert inputs.repeat_batch().shapes() == [(4, 6)] * 3
    assert inputs.positional(source) == tuple(kw.values())
    skipped = as_model_inputs({"input_ids": kw["input_ids"], "token_type_ids": kw["token_type_ids"]})
    assert skipped.positional(source)[1] is None  # attention_mask's default fills the gap
    with pytest.raises(InputError, match="'attention_mask' holding list"):
        as_model_inputs({"input_ids": kw["input_ids"], "attention_mask": [1, 1]})


def test_speech_encoder_decoder_keyword_capture_fold_and_prune() -> None:
    source = _speech()
    kw = _speech_inputs()
    with torch.no_grad():
        ref = _logits(source(**kw))
        other = _logits(source(**_speech_inputs(seed=1)))
        unmasked = _logits(source(**{**kw, "attention_mask": torch.ones_like(kw["attention_mask"])}))
    assert (ref - other).abs().max() > 1e-3  # the output follows the inputs
    assert (ref[1] - unmasked[1]).abs().max() > 1e-4  # and the mask matters
    gm = _quiet(sparsify_fx.transform, source, example_inputs=kw)
    assert isinstance(gm, ExportedModule)
    assert gm.input_names == ("input_features", "attention_mask", "decoder_input_ids")
    assert len(sparsify_fx.masks(gm)) > 0
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(gm(**kw)), ref, rtol=0, atol=1e-5)
        # keywords in another order, or the same tensors positionally
        torch.testing.assert_close(_logits(gm(decoder_input_ids=kw["decoder_input_ids"],
                                              attention_mask=kw["attention_mask"],
                                              input_features=kw["input_features"])), ref,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(_logits(gm(*kw.values())), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(_logits(sparsify_fx.fold(gm)(**kw)), ref, rtol=0, atol=1e-5)
    _magnitude_cut(gm)
    assert sparsify_fx.sparsity(gm) == pytest.approx(0.5, abs=1e-3)
    with torch.no_grad(), hard_masks(gm):
        hard = _logits(gm(**kw))
    assert (hard - ref).abs().max() > 1e-4
    plain = sparsify_fx.fold(gm)
    assert not sparsify_fx.masks(plain)
    with torch.no_grad():
        torch.testing.assert_close(_logits(plain(**kw)), hard, rtol=0, atol=1e-5)


def test_bert_keyword_capture_parity_at_other_shapes(bert) -> None:
    source, gm = bert
    assert isinstance(gm, ExportedModule) and gm.input_names == BERT_KEYS
    assert gm.dynamic_dims == {k: (0, 1) for k in BERT_KEYS}
    kw = _tok(2, 12)
    with torch.no_grad():
        ref = _logits(source(**kw))
        assert (ref - _logits(source(**_tok(2, 12, seed=1)))).abs().max() > 1e-3
        no_pad = _logits(source(**{**kw, "attention_mask": torch.ones_like(kw["attention_mask"])}))
        assert (ref[0] - no_pad[0]).abs().max() > 1e-4  # the padded row depends on the mask
        for batch, seq in ((2, 12), (3, 12), (1, 7), (3, 20)):
            x = _tok(batch, seq, seed=batch + seq)
            torch.testing.assert_close(_logits(gm(**x)), _logits(source(**x)), rtol=0, atol=1e-5)
        torch.testing.assert_close(_logits(sparsify_fx.fold(gm)(**kw)), ref, rtol=0, atol=1e-5)


def test_report_and_weight_costs_with_keyword_inputs(bert) -> None:
    source, gm = bert
    kw = _tok(2, 12)
    rep = sparsify_fx.report(gm, example_inputs=kw)
    assert rep.total_dense_macs == sparsify_fx.report(source, tuple(kw.values())).total_dense_macs
    assert rep.total_dense_macs == sparsify_fx.report(source, example_inputs=kw).total_dense_macs
    assert rep.input_shapes == [(2, 12)] * 3
    longer = sparsify_fx.report(gm, example_inputs=_tok(2, 20))
    assert longer.total_dense_macs > rep.total_dense_macs  # counted at the keywords' length
    costs = weight_costs(gm, kw)
    assert costs == weight_costs(gm, tuple(kw.values()))
    encoder = {n: c for n, c in costs.items() if ".encoder." in n}
    assert encoder and set(encoder.values()) == {12.0}  # every token per sample
    assert costs["bert.pooler.dense.weight"] == 1.0 and costs["classifier.weight"] == 1.0


def test_bad_keyword_names_the_key_and_the_parameters(bert) -> None:
    source, gm = bert
    kw = _tok(2, 12)
    bad = {"input_ids": kw["input_ids"], "attn_mask": kw["attention_mask"]}
    with pytest.raises(SparsifyError, match=r"'attn_mask'.*accepts input_ids, attention_mask, "
                                            r"token_type_ids") as err:
        sparsify_fx.transform(source, example_inputs=bad)
    assert isinstance(err.value, InputError)
    with pytest.raises(InputError, match="'attn_mask'.*input_ids, attention_mask"):
        sparsify_fx.report(gm, example_inputs=bad)
    with pytest.raises(InputError, match="'attn_mask'"):
        weight_costs(gm, bad)


def test_bert_onnx_one_file_for_every_batch_and_sequence_length(bert, tmp_path) -> None:
    import onnxruntime as ort

    _, captured = bert
    gm = copy.deepcopy(captured)  # shares nothing with the fixture's model
    _magnitude_cut(gm)
    plain = sparsify_fx.fold(gm)
    path = tmp_path / "bert.onnx"
    result = sparsify_fx.export_onnx(gm, _tok(2, 12), path, latency_runs=0)
    assert result.input_names == list(BERT_KEYS)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == list(BERT_KEYS)
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    assert result.dynamic_dims == {k: {0: "batch", 1: "sequence"} for k in BERT_KEYS}
    verified = {c.shapes[0] for c in result.verified}
    assert (2, 12) in verified and (4, 12) in verified and any(s[1] != 12 for s in verified)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        for seq in (8, 24):
            x = _tok(batch, seq, seed=10 * batch + seq)
            got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
            with torch.no_grad():
                want = _logits(plain(**x)).numpy()
            assert got.shape == (batch, 3)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
            assert np.abs(got - result.run(**x)).max() == 0.0


def test_fx_capture_with_keyword_inputs_uses_concrete_defaults(tmp_path) -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.relu(self.inp(x))
            if mask is not None:  # branches on an absent input: traced at its default
                h = h * mask
            if bias is not None:
                h = h + bias
            return self.out(h)

    torch.manual_seed(0)
    model = Masked().eval()
    x, mask = torch.randn(4, 6), (torch.rand(4, 8) > 0.5).float()
    assert (model(x, mask) - model(x)).abs().max() > 1e-3
    gm = sparsify_fx.transform(model, example_inputs={"x": x, "mask": mask})
    assert isinstance(gm, torch.fx.GraphModule) and len(sparsify_fx.masks(gm)) == 2
    torch.testing.assert_close(gm(x=x, mask=mask), model(x, mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(gm(mask=mask, x=x), model(x, mask), rtol=0, atol=1e-6)
    rep = sparsify_fx.report(gm, example_inputs={"x": x, "mask": mask})
    assert rep.total_dense_macs == 4 * (6 * 8 + 8 * 3)
    result = sparsify_fx.export_onnx(gm, {"x": x, "mask": mask}, tmp_path / "m.onnx",
                                     latency_runs=0)
    assert [i.name for i in onnx.load(str(result.path)).graph.input] == ["x", "mask"]
    assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance


def test_calibrate_with_keyword_batches(bert) -> None:
    source, _ = bert
    gm = _quiet(sparsify_fx.transform, source, method="wanda", target_sparsity=0.5,
                example_inputs=_tok(2, 12),
                dynamic_shapes={k: {0: AUTO, 1: AUTO} for k in BERT_KEYS})
    with pytest.raises(InputError, match="keyword 'labels'"):
        sparsify_fx.calibrate(gm, [{**_tok(2, 12), "labels": torch.ones(2)}])
    result = sparsify_fx.calibrate(gm, [_tok(2, 12, seed=s) for s in range(3)])
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    with torch.no_grad(), hard_masks(gm):  # the cut model still runs on keywords
        assert _logits(gm(**_tok(3, 9))).shape == (3, 3)
