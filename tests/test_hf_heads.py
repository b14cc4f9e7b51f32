"""``plan_hf`` / ``shrink_hf``: the one-shot L1 preset over the general structured path.

The plan is the hard-masked torch.export capture (structure read from the ATen graph,
no attribute names); ``shrink_hf`` returns the smaller source class. Random weights
from configs; nothing downloads.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify_fx
from sparsify_fx.errors import ConfigError, ShrinkError
from sparsify_fx.hf.heads import plan_hf
from sparsify_fx.hf.shrink import shrink_hf

transformers = pytest.importorskip("transformers")

VOCAB = 100


def _bert(hidden: int = 64, layers: int = 2, heads: int = 4, inter: int = 128,
          max_pos: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=max_pos)).eval()


def _hidden(out) -> torch.Tensor:
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out.logits if hasattr(out, "logits") else out[0]


def _ids(seed: int, seq: int = 16, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _capture(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify_fx.transform(model, example_inputs=(ids,), capture="export").eval()


def _check_parity(source: nn.Module, target: float, selection: str, seq: int) -> nn.Module:
    """Shrunk source == the plan's hard-masked capture on new inputs; returns the shrunk."""
    plan = plan_hf(source, target_macs=target, seq_len=seq, selection=selection)
    assert 0.8 * target < plan.macs_ratio <= target + 0.02, plan.summary()
    small = shrink_hf(source, plan).eval()
    assert type(small) is type(source)
    ids, other = _ids(1, seq), _ids(2, seq)
    with torch.no_grad():
        ref, out = _hidden(plan.model(ids)), _hidden(small(ids))
        varies = (_hidden(small(other)) - out).abs().max().item()
        dense = _hidden(source(ids))
    assert varies > 0.1, "output must depend on the input for parity to mean anything"
    assert (dense - ref).abs().max().item() > 1e-3, "the plan must change the model"
    assert (ref - out).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in source.parameters())
    return small


@pytest.mark.parametrize("selection", ["uniform", "global"])
def test_shrink_parity_small_bert(selection: str) -> None:
    _check_parity(_bert(), 0.5, selection, seq=16)


def test_uniform_keeps_one_width_per_layer() -> None:
    source = _bert(layers=3)
    for target in (0.3, 0.7):
        small = shrink_hf(source, plan_hf(source, target_macs=target, seq_len=16))
        layers = small.encoder.layer
        assert len({ly.attention.self.num_attention_heads for ly in layers}) == 1
        assert len({ly.intermediate.dense.out_features for ly in layers}) == 1
        assert layers[0].intermediate.dense.out_features < 128


def test_structure_heads_only_and_units_only() -> None:
    source = _bert()
    heads = plan_hf(source, target_macs=0.8, seq_len=16, structure="heads")
    small = shrink_hf(source, heads)
    assert all(ly.intermediate.dense.out_features == 128 for ly in small.encoder.layer)
    assert all(ly.attention.self.num_attention_heads < 4 for ly in small.encoder.layer)
    assert heads.kept["units"] == (256, 256) and heads.kept["heads"][0] < 8
    units = plan_hf(source, target_macs=0.8, seq_len=16, structure="units", selection="global")
    small = shrink_hf(source, units)
    assert all(ly.attention.self.num_attention_heads == 4 for ly in small.encoder.layer)
    assert units.kept["heads"] == (8, 8) and units.macs_ratio <= 0.8 + 0.02


def test_plan_macs_match_report_of_exported_models() -> None:
    """The plan's MACs saving equals what ``report`` counts on the captured dense and
    shrunk models (ATen level: projections, attention matmuls, MLP)."""
    source = _bert()
    ids = _ids(0)
    plan = plan_hf(source, target_macs=0.5, seq_len=16, selection="global")
    dense = sparsify_fx.report(_capture(source, ids), (ids,)).total_dense_macs
    small = sparsify_fx.report(_capture(shrink_hf(source, plan), ids), (ids,)).total_dense_macs
    assert dense - small == pytest.approx(plan.dense_macs - plan.macs, rel=1e-6)


def test_l1_ranking_keeps_the_larger_head() -> None:
    source = _bert(layers=1)
    sa = source.encoder.layer[0].attention.self
    with torch.no_grad():
        for p in (sa.query, sa.key, sa.value):
            p.weight[32:48] *= 10.0  # head 2 much larger
    plan = plan_hf(source, target_macs=0.65, seq_len=16, structure="heads")
    small = shrink_hf(source, plan)
    kept = small.encoder.layer[0].attention.self
    assert kept.num_attention_heads == 1
    assert torch.equal(kept.query.weight, sa.query.weight[32:48])


def test_decoder_llm_gets_a_plan() -> None:
    """A grouped-query decoder (which the attribute-matched plan refused) plans and shrinks
    to its own class; greedy tokens follow the hard-masked capture."""
    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    plan = plan_hf(source, target_macs=0.5, seq_len=16)
    small = shrink_hf(source, plan)
    assert type(small) is transformers.LlamaForCausalLM
    assert small.model.layers[0].mlp.down_proj.in_features < 128
    ids, other = _ids(1), _ids(2)
    with torch.no_grad():
        out = small(ids).logits
        assert (small(other).logits - out).abs().max() > 0.1
        assert (plan.model(ids).logits - out).abs().max() <= 1e-4


def test_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="selection"):
        plan_hf(_bert(), target_macs=0.5, seq_len=16, selection="best")
    with pytest.raises(ConfigError, match="target_macs"):
        plan_hf(_bert(), target_macs=1.5, seq_len=16)
    with pytest.raises(ConfigError, match="example_inputs"):
        plan_hf(nn.Sequential(nn.Linear(4, 4)), target_macs=0.5)
    source = _bert()
    plan = plan_hf(source, target_macs=0.5, seq_len=16)
    with pytest.raises(ShrinkError, match="plan_hf"):
        shrink_hf(_bert(), plan)


@pytest.mark.slow
def test_shrink_parity_bert_base_config() -> None:
    """BERT-base sized (hidden 768, 12 layers, 12 heads, 3072), sequence 128, 0.5 MACs."""
    source = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB)).eval()
    _check_parity(source, 0.5, "uniform", seq=128)


def test_public_names() -> None:
    assert sparsify_fx.plan_hf is plan_hf and sparsify_fx.shrink_hf is shrink_hf


def test_shrunk_bert_exports_to_onnx(tmp_path) -> None:
    """The shrunk model (captured again) exports and matches in onnxruntime, and the
    ONNX output equals the hard-masked model's."""
    from sparsify_fx.export.onnx_export import export_onnx, run_onnx
    source = _bert()
    ids = _ids(3)
    plan = plan_hf(source, target_macs=0.5, seq_len=16)
    done = export_onnx(_capture(shrink_hf(source, plan), ids), (ids,), tmp_path / "small.onnx",
                       sparse=False, latency_runs=0)
    assert done.max_abs_diff is not None and done.max_abs_diff <= 1e-4
    with torch.no_grad():
        ref = _hidden(plan.model(ids)).numpy()
    assert abs(run_onnx(tmp_path / "small.onnx", (ids,)) - ref).max() <= 1e-4
