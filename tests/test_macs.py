"""MAC counting: torchvision metadata, FlopCounterMode parity over the zoo, op rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparsify_fx
from tests.zoo import build, detection_model, zoo_params

# torchvision publishes `_ops` (GMACs, labelled GFLOPS) and `num_params` per weight enum.
METADATA = [
    pytest.param("resnet18", tvm.ResNet18_Weights.IMAGENET1K_V1, id="resnet18"),
    pytest.param("mobilenet_v2", tvm.MobileNet_V2_Weights.IMAGENET1K_V1, id="mobilenet_v2"),
    pytest.param("resnet50", tvm.ResNet50_Weights.IMAGENET1K_V1, id="resnet50",
                 marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", tvm.EfficientNet_B0_Weights.IMAGENET1K_V1,
                 id="efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("vit_b_16", tvm.ViT_B_16_Weights.IMAGENET1K_V1, id="vit_b_16",
                 marks=pytest.mark.slow),
    pytest.param("swin_t", tvm.Swin_T_Weights.IMAGENET1K_V1, id="swin_t", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,weights", METADATA)
def test_dense_macs_and_params_match_torchvision_metadata(name, weights):
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None).eval()
    rep = sparsify_fx.report(model, torch.randn(1, 3, 224, 224))
    assert rep.counting == "fx"
    published = weights.meta["_ops"]
    decimals = len(str(published).split(".")[1])
    assert round(rep.total_dense_macs / 1e9, decimals) == pytest.approx(published, abs=1e-9)
    assert rep.total_params == weights.meta["num_params"]
    # random init leaves few exact zeros (vit's zero-initialised head is one)
    assert 0.99 * rep.total_dense_macs < rep.total_macs <= rep.total_dense_macs


def _fcm_macs(model: nn.Module, x) -> tuple[float, dict[str, float]]:
    """FlopCounterMode / 2 with gradients enabled (under no_grad it misses fused MHA)."""
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        model(x)
    by_op = {str(k): v / 2 for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() / 2, by_op


@pytest.mark.parametrize("name", zoo_params())
def test_dense_macs_agree_with_flop_counter(name):
    model, x = build(name)
    x = x[:1]
    rep = sparsify_fx.report(model, x)
    fcm, by_op = _fcm_macs(model, x)
    assert rep.counting == "fx"
    if name == "vit_b_16":
        # FlopCounterMode has no formula for the CPU SDPA kernel
        # (aten._scaled_dot_product_flash_attention_for_cpu) that nn.MultiheadAttention
        # uses, so it counts neither attention matmul. Everything else agrees exactly.
        attention = sum(o.macs for o in rep.other if o.op == "attention")
        assert attention > 0 and "aten.bmm" not in by_op
        assert rep.total_dense_macs - attention == pytest.approx(fcm, rel=1e-9)
    else:
        assert rep.total_dense_macs == pytest.approx(fcm, rel=0.01)


class Functional(nn.Module):
    """Ops module hooks miss: functional conv/linear on parameters, activation matmuls."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.proj = nn.Parameter(torch.randn(16, 4))
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        y = F.conv2d(x, self.w, padding=1)              # (B, 8, 6, 6)
        y = F.conv2d(y, self.dw, padding=1, groups=8)   # depthwise
        y = self.up(y)                                   # (B, 4, 12, 12)
        t = y.flatten(2).transpose(1, 2)                 # (B, 144, 4)
        t = F.linear(t, self.proj)                       # (B, 144, 16)
        s = t @ t.transpose(1, 2)                        # (B, 144, 144)
        e = torch.einsum("bij,bjk->bik", s, t)           # (B, 144, 16)
        q = e.reshape(-1, 144, 4, 4).transpose(1, 2)     # (B, 4, 144, 4)
        a = F.scaled_dot_product_attention(q, q, q)      # (B, 4, 144, 4)
        a = a.transpose(1, 2).reshape(-1, 144, 16)
        return self.mha(a, t[:, :36], t[:, :36], need_weights=False)[0]


def _expected_functional(b: int) -> dict[str, int]:
    return {
        "w": b * 8 * 6 * 6 * 3 * 9, "dw": b * 8 * 6 * 6 * 9,
        "up.weight": b * 8 * 6 * 6 * 4 * 4, "proj": b * 144 * 16 * 4,
        "mha.in_proj_weight": b * (144 + 36 + 36) * 16 * 16,
        "mha.out_proj.weight": b * 144 * 16 * 16,
    }


@pytest.mark.parametrize("eager", [False, True], ids=["fx", "eager"])
def test_functional_ops_counted_by_hand_formula(eager):
    torch.manual_seed(0)
    model = Functional().eval()
    b = 2
    rep = sparsify_fx.report(model, torch.randn(b, 3, 6, 6), eager=eager)
    assert rep.counting == ("eager" if eager else "fx")
    got = {r.name: r.dense_macs for r in rep.rows}
    assert got == _expected_functional(b)
    kinds = {r.name: r.kind for r in rep.rows}
    assert kinds["w"] == "conv" and kinds["dw"] == "depthwise_conv"
    assert kinds["up.weight"] == "conv_transpose" and kinds["mha.in_proj_weight"] == "attention_in_proj"
    other = sum(o.macs for o in rep.other)
    matmul = b * 144 * 144 * 16
    einsum = b * 144 * 144 * 16
    sdpa = b * 4 * 144 * 144 * (4 + 4)
    mha_attention = b * 144 * 36 * 16 * 2
    assert other == matmul + einsum + sdpa + mha_attention
    if not eager:  # eager counting sees the flattened (B*L, E) mm output instead
        assert rep.row("mha.out_proj.weight").output_shape == (b, 144, 16)
        assert rep.row("w").output_shape == (b, 8, 6, 6)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent branch: fx cannot trace this
            x = self.conv(x)
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_aten_counting():
    model = Untraceable().eval()
    rep = sparsify_fx.report(model, torch.randn(2, 3, 10, 10))
    assert rep.counting == "eager"
    assert rep.notes and "could not trace" in rep.notes[0]
    assert {r.name: r.dense_macs for r in rep.rows} == {
        "conv.weight": 2 * 8 * 10 * 10 * 27, "fc.weight": 2 * 5 * 8}


def test_bad_example_inputs_raise_input_error():
    model = tvm.resnet18().eval()
    with pytest.raises(sparsify_fx.InputError, match="example inputs"):
        sparsify_fx.report(model, torch.randn(1, 5, 32, 32))
    with pytest.raises(sparsify_fx.InputError, match="example_inputs"):
        sparsify_fx.report(model, 3)
    with pytest.raises(sparsify_fx.InputError):
        sparsify_fx.report("resnet18", torch.randn(1, 3, 32, 32))


@pytest.mark.slow
def test_detection_model_counts_with_eager_fallback():
    model = detection_model()
    images = [torch.rand(3, 128, 128)]
    rep = sparsify_fx.report(model, (images,))
    fcm, _ = _fcm_macs(model, images)
    assert rep.counting == "eager"
    assert rep.total_params == sum(p.numel() for p in model.parameters())
    assert any(r.name.startswith("backbone.") for r in rep.rows)
    assert any(r.name.startswith("roi_heads.") for r in rep.rows)
    assert rep.total_dense_macs == pytest.approx(fcm, rel=0.01)

