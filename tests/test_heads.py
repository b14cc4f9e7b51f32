"""Attention heads as channel groups: analysis, masks, budgets, shrink parity, ONNX."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import sparsify_fx
from sparsify_fx.budgets.exact_cut import apply_budget, macs_fraction, weight_costs
from sparsify_fx.budgets.cost_model import channel_macs
from sparsify_fx.export.report import report
from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks, select_channels
from sparsify_fx.passes.shrink.pruned_attention import PrunedSelfAttention, pruned_window_attention
from sparsify_fx.passes.shrink.shrink_graph import plan_shrink, shrink

TOL = 1e-5


def small_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                          mlp_dim=128, num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.2)  # torchvision zero-inits the head
    return m.eval()


def small_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10).eval()


def transformed(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorm / residual stream warnings
        return sparsify_fx.transform(model, granularity="channel", **kw)


def hard_out(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), sparsify_fx.hard_masks(gm):
        return gm(x)


def random_select(gm: nn.Module, keep: float, seed: int = 0) -> dict[str, int]:
    g = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
    return select_channels(gm, keep, scores)


def check_parity(gm: nn.Module, x: torch.Tensor) -> nn.Module:
    ref = hard_out(gm, x)
    other = hard_out(gm, torch.randn_like(x))
    assert float((ref - other).abs().max()) > 1e-3, "output does not vary with the input"
    small = shrink(gm)
    with torch.no_grad():
        out = small(x)
    assert float((out - ref).abs().max()) <= TOL
    return small


def test_vit_heads_and_units_are_groups() -> None:
    gm = transformed(small_vit())
    sizes = sorted(math.prod(m.score_shape) for m in group_masks(gm).values())
    assert sizes == [4, 4, 128, 128]  # 2 layers x (4 heads, 128 MLP units)
    names = {e.name: e for e in sparsify_fx.masks(gm)}
    e = names["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"]
    assert e.route == "parametrize" and e.mask.score_shape == (192, 1)
    # one head's q, k and v rows read the same slot
    idx = e.mask.index.reshape(3, 4, 16)
    assert (idx == idx[0:1, :, 0:1]).all() and len(set(idx[0, :, 0].tolist())) == 4
    assert names["encoder.layers.encoder_layer_0.self_attention.in_proj_bias"].mask.auxiliary
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" not in names


@pytest.mark.parametrize("prune", [0.3, 0.6])
def test_vit_shrink_parity(prune: float) -> None:
    gm = transformed(small_vit())
    kept = random_select(gm, 1.0 - prune, seed=1)
    assert sorted(kept.values()) == sorted([round((1 - prune) * 4)] * 2
                                           + [round((1 - prune) * 128)] * 2)
    x = torch.randn(3, 3, 32, 32)
    small = check_parity(gm, x)
    heads = round((1 - prune) * 4)
    for i in range(2):
        att = small.get_submodule(f"encoder.layers.encoder_layer_{i}.self_attention")
        assert isinstance(att, PrunedSelfAttention) and att.num_heads == heads
        assert tuple(att.qkv.weight.shape) == (3 * heads * 16, 64)
        assert tuple(att.out_proj.weight.shape) == (64, heads * 16)
    plan = plan_shrink(gm)
    assert plan.heads == {f"encoder.layers.encoder_layer_{i}.self_attention": (heads, 4)
                          for i in range(2)}


@pytest.mark.parametrize("prune", [0.3, 0.6])
def test_swin_shrink_parity(prune: float) -> None:
    gm = transformed(small_swin())
    sizes = sorted(math.prod(m.score_shape) for m in group_masks(gm).values())
    assert sizes == [2, 2, 4, 4, 128, 128, 256, 256]
    random_select(gm, 1.0 - prune, seed=2)
    x = torch.randn(2, 3, 36, 36)  # 9x9 tokens: padded windows, shifted windows
    small = check_parity(gm, x)
    calls = [n for n in small.graph.nodes if n.target is pruned_window_attention]
    assert len(calls) == 4
    table = small.get_parameter("features.3.0.attn.relative_position_bias_table")
    assert table.shape[1] == round((1 - prune) * 4)


def test_macs_agree_with_report_before_and_after_shrink() -> None:
    for model, x in ((small_vit(), torch.randn(2, 3, 32, 32)),
                     (small_swin(), torch.randn(2, 3, 36, 36))):
        gm = transformed(model)
        costs = weight_costs(gm, x)
        cm = channel_macs(gm, costs)
        dense = report(gm, x).total_dense_macs / 2
        assert cm.dense == pytest.approx(dense, rel=1e-9)
        apply_budget(gm, target_macs=0.5, costs=costs, scores=channel_l1_scores(gm, True))
        frac = macs_fraction(gm, costs)
        assert 0.45 < frac <= 0.5 + 1e-9
        shrunk_macs = report(shrink(gm), x).total_macs / 2
        assert shrunk_macs == pytest.approx(frac * dense, rel=1e-9)


def test_include_globs_choose_heads_or_mlp() -> None:
    heads_only = transformed(small_vit(), include=["*self_attention*"])
    assert sorted(math.prod(m.score_shape) for m in group_masks(heads_only).values()) == [4, 4]
    mlp_only = transformed(small_vit(), exclude=["*self_attention*"])
    assert sorted(math.prod(m.score_shape) for m in group_masks(mlp_only).values()) == [128, 128]
    random_select(heads_only, 0.5)
    small = check_parity(heads_only, torch.randn(2, 3, 32, 32))
    assert small.get_parameter("encoder.layers.encoder_layer_1.mlp.0.weight").shape[0] == 128


def test_shrunk_vit_exports_to_onnx(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    gm = transformed(small_vit())
    random_select(gm, 0.5, seed=3)
    x = torch.randn(2, 3, 32, 32)
    small = shrink(gm)
    res = sparsify_fx.export_onnx(small, x, tmp_path / "vit.onnx", sparse=False)
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ref = hard_out(gm, x).numpy()
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(ref - hard_out(gm, torch.randn_like(x)).numpy()).max() > 1e-3


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 32)
        self.post = nn.Linear(32, 8)
        self.q = nn.Linear(8, 16)
        self.kv = nn.Linear(8, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.post(self.pre(x).relu())
        kv = self.kv(x)
        return self.out(self.att(self.q(x), kv, kv)[0])


def test_cross_attention_keeps_its_heads() -> None:
    with pytest.warns(UserWarning, match="cross-attention"):
        gm = sparsify_fx.transform(CrossAttention(), granularity="channel")
    assert sorted(math.prod(m.score_shape) for m in group_masks(gm).values()) == [8, 32]
    assert plan_shrink(gm).heads == {}
    random_select(gm, 0.5)
    small = check_parity(gm, torch.randn(2, 5, 8))
    assert isinstance(small.get_submodule("att"), nn.MultiheadAttention)


def test_cs_learns_heads_under_macs_budget() -> None:
    torch.manual_seed(0)
    model = small_vit().train()
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    gm = transformed(model, method="cs", target_macs=0.5)
    opt = torch.optim.SGD(sparsify_fx.param_groups(gm, lr=0.05), momentum=0.9)
    cs = sparsify_fx.CSScheduler(gm, epochs=2, example_inputs=x[:1])
    for _ in range(2):
        for _ in range(2):
            loss = nn.functional.cross_entropy(gm(x), y) + cs.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        cs.step()
    cs.finalize()
    gm.eval()
    costs = weight_costs(gm, x[:1])
    frac = macs_fraction(gm, costs)
    assert 0.4 < frac <= 0.5 + 1e-9
    group_keep = [m.hard_mask().float().mean().item() for m in group_masks(gm).values()]
    assert min(group_keep) < 1.0
    check_parity(gm, x[:4])


@pytest.mark.slow
def test_vit_b_16_shrink_parity() -> None:
    import torchvision.models as tvm
    torch.manual_seed(0)
    m = tvm.vit_b_16().eval()
    nn.init.normal_(m.heads.head.weight, std=0.02)
    gm = transformed(m)
    random_select(gm, 0.5, seed=4)
    small = check_parity(gm, torch.randn(1, 3, 224, 224))
    assert small.encoder.layers.encoder_layer_0.self_attention.num_heads == 6


@pytest.mark.slow
def test_swin_t_shrink_parity() -> None:
    import torchvision.models as tvm
    torch.manual_seed(0)
    gm = transformed(tvm.swin_t().eval())
    random_select(gm, 0.6, seed=5)
    check_parity(gm, torch.randn(1, 3, 224, 224))


def test_report_shows_heads_kept_before_and_after_shrink() -> None:
    gm = transformed(small_vit())
    random_select(gm, 0.5, seed=6)
    x = torch.randn(1, 3, 32, 32)
    masked, small = report(gm, x), report(shrink(gm), x)
    expect = {f"encoder.layers.encoder_layer_{i}.self_attention": (2, 4) for i in range(2)}
    assert masked.heads == expect and small.heads == expect
    assert "attention heads kept: 4 / 8" in str(small)
    md = report(small_vit(), x).compare(small).to_markdown()
    assert "| `encoder.layers.encoder_layer_1.self_attention` | 4 | 2 |" in md
    assert report(small_swin(), torch.randn(1, 3, 32, 32)).heads["features.3.1.attn"] == (4, 4)
