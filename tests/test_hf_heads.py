"""Head and MLP-unit pruning of Hugging Face BERT-style encoders (issue 14, torch.export path).

``plan_hf`` picks heads/units under a MACs budget, ``freeze_plan`` writes the
plan into the element masks of the torch.export-captured model (the
hard-masked reference), ``shrink_hf`` builds the smaller source model. Random
weights from configs; nothing downloads.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify_fx
from sparsify_fx.errors import ConfigError, SelectionError, ShrinkError
from sparsify_fx.hf.heads import find_hf_layers, freeze_plan, plan_hf
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
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _capture(model: nn.Module, ids: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify_fx.transform(model, example_inputs=(ids,), capture="export").eval()


def _check_parity(source: nn.Module, target: float, selection: str, seq: int) -> float:
    """Shrunk source == hard-masked exported model; returns the max abs difference."""
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(2))
    plan = plan_hf(source, target_macs=target, seq_len=seq, selection=selection)
    assert 0.8 * target < plan.macs_ratio <= target
    masked = _capture(source, ids)
    freeze_plan(masked, plan)
    small = shrink_hf(source, plan).eval()
    with torch.no_grad():
        ref, out = _hidden(masked(ids)), _hidden(small(ids))
        dense = _hidden(source(ids))
        varies = (_hidden(small(other)) - out).abs().max().item()
    assert varies > 0.1, "output must depend on the input for parity to mean anything"
    assert (dense - ref).abs().max().item() > 1e-3, "the plan must change the model"
    diff = (ref - out).abs().max().item()
    assert diff <= 1e-5, diff
    return diff


def test_finds_bert_layers() -> None:
    layers = find_hf_layers(_bert())
    assert [ly.name for ly in layers] == ["encoder.layer.0", "encoder.layer.1"]
    ly = layers[0]
    assert (ly.heads, ly.head_dim, ly.units, ly.hidden) == (4, 16, 128, 64)
    assert ly.attn_out == "encoder.layer.0.attention.output.dense"
    assert ly.mlp_out == "encoder.layer.0.output.dense"


@pytest.mark.parametrize("selection", ["uniform", "global"])
def test_shrink_parity_small_bert(selection: str) -> None:
    _check_parity(_bert(), 0.5, selection, seq=16)


def test_uniform_keeps_same_heads_per_layer_and_cuts_to_budget() -> None:
    source = _bert(layers=3)
    for target in (0.3, 0.7):
        plan = plan_hf(source, target_macs=target, seq_len=16)
        heads = {len(k.heads) for k in plan.layers}
        units = {len(k.units) for k in plan.layers}
        assert heads == {round(target * 4)} and len(units) == 1
        # the largest unit count that fits: one more unit per layer would break the budget
        unit_step = sum(k.layer.macs(0, 1, 16) for k in plan.layers)
        assert plan.macs <= target * plan.dense_macs < plan.macs + unit_step


def test_structure_heads_only_and_units_only() -> None:
    source = _bert()
    heads = plan_hf(source, target_macs=0.8, seq_len=16, structure="heads")
    assert all(len(k.units) == k.layer.units for k in heads.layers)
    assert all(len(k.heads) < k.layer.heads for k in heads.layers)
    units = plan_hf(source, target_macs=0.8, seq_len=16, structure="units", selection="global")
    assert all(len(k.heads) == k.layer.heads for k in units.layers)
    assert units.macs_ratio <= 0.8


def test_plan_macs_match_report_of_exported_models() -> None:
    """The plan's MACs saving equals what ``report`` counts on the captured dense and
    shrunk models (ATen level: projections, attention matmuls, MLP)."""
    source = _bert()
    ids = torch.randint(0, VOCAB, (1, 16))
    plan = plan_hf(source, target_macs=0.5, seq_len=16, selection="global")
    dense = sparsify_fx.report(_capture(source, ids), (ids,)).total_dense_macs
    small = sparsify_fx.report(_capture(shrink_hf(source, plan), ids), (ids,)).total_dense_macs
    assert dense - small == plan.dense_macs - plan.macs


def test_l1_ranking_keeps_the_larger_head() -> None:
    source = _bert(layers=1)
    sa = source.encoder.layer[0].attention.self
    with torch.no_grad():
        for p in (sa.query, sa.key, sa.value):
            p.weight[32:48] *= 10.0  # head 2 much larger
    plan = plan_hf(source, target_macs=0.65, seq_len=16, structure="heads")  # 1 head
    assert plan.layers[0].heads == (2,)


def test_errors_name_the_fix() -> None:
    with pytest.raises(SelectionError, match="BERT-style"):
        find_hf_layers(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="selection"):
        plan_hf(_bert(), target_macs=0.5, seq_len=16, selection="best")
    with pytest.raises(ConfigError, match="target_macs"):
        plan_hf(_bert(), target_macs=1.5, seq_len=16)
    source = _bert()
    plan = plan_hf(source, target_macs=0.5, seq_len=16)
    with pytest.raises(ShrinkError, match="plan_hf"):
        shrink_hf(_bert(layers=1, heads=2), plan)
    ids = torch.randint(0, VOCAB, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partial = sparsify_fx.transform(source, example_inputs=(ids,), capture="export",
                                        exclude=["*intermediate*"])
    with pytest.raises(SelectionError, match="no mask"):
        freeze_plan(partial, plan)


@pytest.mark.slow
def test_shrink_parity_bert_base_config() -> None:
    """BERT-base sized (hidden 768, 12 layers, 12 heads, 3072), sequence 128, 0.5 MACs."""
    source = transformers.BertModel(transformers.BertConfig()).eval()
    _check_parity(source, 0.5, "uniform", seq=128)


def test_public_names() -> None:
    assert sparsify_fx.plan_hf is plan_hf and sparsify_fx.freeze_plan is freeze_plan
    assert sparsify_fx.shrink_hf is shrink_hf


def test_shrunk_bert_exports_to_onnx(tmp_path) -> None:
    """The shrunk model (captured again) exports and matches in onnxruntime, and the
    ONNX output equals the hard-masked model's."""
    from sparsify_fx.export.onnx_export import export_onnx, run_onnx
    source = _bert()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    plan = plan_hf(source, target_macs=0.5, seq_len=16)
    done = export_onnx(_capture(shrink_hf(source, plan), ids), (ids,), tmp_path / "small.onnx",
                       sparse=False, latency_runs=0)
    assert done.max_abs_diff is not None and done.max_abs_diff <= 1e-4
    masked = _capture(source, ids)
    freeze_plan(masked, plan)
    with torch.no_grad():
        ref = _hidden(masked(ids)).numpy()
    assert abs(run_onnx(tmp_path / "small.onnx", (ids,)) - ref).max() <= 1e-4
