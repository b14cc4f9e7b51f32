"""report(): nonzeros and effective MACs from tensors, renderings, plot, CLI."""
from __future__ import annotations

import csv
import io
import json
import struct
import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import sparsify_fx
from sparsify_fx.cli.report import main as report_main

B = 1
X = torch.randn(B, 3, 64, 64)


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return tvm.resnet18().eval()


def _transformed(granularity: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = sparsify_fx.transform(_resnet18(), method="cs", granularity=granularity)
    with torch.no_grad():
        for e in sparsify_fx.masks(t):
            e.weight.copy_(e.weight.abs() + 0.01)  # no accidental zeros in raw weights
    return t


@pytest.fixture(scope="module")
def element_report():
    """resnet18, every masked weight keeps exactly the elements with flat index % 4 == 0."""
    t = _transformed("element")
    for e in sparsify_fx.masks(t):
        keep = torch.arange(e.mask.numel()) % 4 == 0
        e.mask.freeze(keep.reshape(e.mask.score_shape))
    return t, sparsify_fx.report(t, X)


def test_element_mask_nonzeros_and_effective_macs_by_hand(element_report):
    t, rep = element_report
    assert len(rep.rows) == 21 and all(r.masked for r in rep.rows)
    # Hand-computed dense MACs at 64x64, batch 1: out positions x (C_in/groups x kh x kw).
    hand = {
        "conv1.weight": 64 * 32 * 32 * (3 * 7 * 7),            # stride 2 -> 32x32
        "layer1.0.conv1.weight": 64 * 16 * 16 * (64 * 3 * 3),  # after maxpool -> 16x16
        "layer2.0.downsample.0.weight": 128 * 8 * 8 * 64,      # 1x1 stride 2 -> 8x8
        "layer4.1.conv2.weight": 512 * 2 * 2 * (512 * 3 * 3),
        "fc.weight": 1000 * 512,
    }
    for name, dense in hand.items():
        row = rep.row(name)
        assert row.dense_macs == dense
        assert row.params % 4 == 0 and row.nonzeros == row.params // 4
        assert row.sparsity == pytest.approx(0.75)
        assert row.macs == pytest.approx(dense / 4)
    folded = sparsify_fx.fold(t)
    for row in rep.rows:  # nonzeros agree with the folded tensors themselves
        assert row.nonzeros == int((folded.get_parameter(row.name) != 0).sum())
    assert rep.total_macs == pytest.approx(rep.total_dense_macs / 4)
    assert rep.weight_sparsity == pytest.approx(0.75) and rep.masked_sparsity == pytest.approx(0.75)


def test_transformed_folded_and_plain_reports_agree(element_report):
    t, rep = element_report
    plain = _resnet18()
    dense = sparsify_fx.report(plain, X)
    folded = sparsify_fx.report(sparsify_fx.fold(t), X)
    n_params = sum(p.numel() for p in plain.parameters())
    # mask scores are not model parameters
    assert rep.total_params == folded.total_params == dense.total_params == n_params
    assert rep.total_dense_macs == folded.total_dense_macs == dense.total_dense_macs
    assert [(r.name, r.nonzeros, r.macs) for r in rep.rows] == \
        [(r.name, r.nonzeros, r.macs) for r in folded.rows]
    assert folded.masked_sparsity is None and dense.macs_ratio == pytest.approx(1.0, abs=1e-4)
    shared = rep.total_nonzeros - rep.layer_nonzeros  # biases/norms are untouched by masks
    assert shared == folded.total_nonzeros - folded.layer_nonzeros


def test_channel_masks_count_kept_channels_and_smaller_layer_macs():
    t = _transformed("channel")
    for e in sparsify_fx.masks(t):
        out = e.mask.score_shape[0]
        e.mask.freeze((torch.arange(out) < out // 2).reshape(e.mask.score_shape))
    rep = sparsify_fx.report(t, X)
    masked = {e.name for e in sparsify_fx.masks(t)}
    assert len(masked) >= 20
    for row in rep.rows:
        assert row.masked == (row.name in masked)
        if not row.masked:  # left dense by transform (e.g. the classifier)
            assert row.nonzeros == row.params and row.macs == row.dense_macs
            continue
        assert row.out_channels_kept == row.out_channels // 2
        assert row.in_channels_kept == row.in_channels
        assert row.nonzeros == row.params // 2
        assert row.macs == pytest.approx(row.dense_macs / 2)  # MACs of the half-width layer
    conv1 = rep.row("conv1.weight")
    assert conv1.macs == 32 * 32 * 32 * 3 * 49  # 32 of 64 output channels


def test_zero_input_channels_reduce_macs():
    model = _resnet18()
    with torch.no_grad():
        model.layer1[0].conv1.weight[:, :16] = 0
        model.layer1[0].conv2.weight[:8] = 0
    rep = sparsify_fx.report(model, X)
    r1, r2 = rep.row("layer1.0.conv1.weight"), rep.row("layer1.0.conv2.weight")
    assert (r1.in_channels_kept, r1.out_channels_kept) == (48, 64)
    assert r1.macs == 64 * 16 * 16 * 48 * 9
    assert (r2.in_channels_kept, r2.out_channels_kept) == (64, 56)
    assert r2.macs == 56 * 16 * 16 * 64 * 9


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.up = nn.ConvTranspose1d(16, 8, 2, stride=2)

    def forward(self, q, kv):
        a = self.mha(q, kv, kv, need_weights=False)[0]   # (B, 10, 16)
        return self.up(a.transpose(1, 2))                # (B, 8, 20)


def test_attention_projections_use_per_block_density():
    torch.manual_seed(0)
    model = CrossAttention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = sparsify_fx.transform(model, method="cs")
    entries = {e.name: e for e in sparsify_fx.masks(t)}
    assert {"mha.in_proj_weight", "mha.out_proj.weight"} <= set(entries)
    with torch.no_grad():
        for e in entries.values():
            e.weight.copy_(e.weight.abs() + 0.01)
    in_proj = entries["mha.in_proj_weight"].mask
    in_proj.freeze(torch.arange(48).reshape(48, 1).expand(48, 16) < 16)  # keep the q block only
    q, kv = torch.randn(2, 10, 16), torch.randn(2, 6, 16)
    rep = sparsify_fx.report(t, (q, kv))
    row = rep.row("mha.in_proj_weight")
    assert row.kind == "attention_in_proj"
    assert row.dense_macs == 2 * (10 + 6 + 6) * 16 * 16
    assert row.macs == 2 * 10 * 16 * 16
    assert row.nonzeros == 16 * 16 and row.out_channels_kept == 16
    attention = [o for o in rep.other if o.op == "attention"]
    assert sum(o.macs for o in attention) == 2 * 2 * 10 * 6 * 16
    up = rep.row("up.weight")
    assert up.kind == "conv_transpose" and up.dense_macs == 2 * 10 * 16 * 8 * 2


def test_renderings(element_report):
    _, rep = element_report
    data = json.loads(rep.to_json())
    assert data["schema"] == "sparsify_fx.report/v1"
    assert data["units"]["flops"] == "2 x macs"
    assert len(data["layers"]) == 21 and data["layers"][0]["name"] == "conv1.weight"
    assert data["totals"]["dense_macs"] == rep.total_dense_macs
    assert data["totals"]["flops"] == pytest.approx(2 * rep.total_macs)
    assert set(data["layers"][0]) >= {"name", "kind", "weight_shape", "params", "nonzeros",
                                      "sparsity", "dense_macs", "macs", "output_shape",
                                      "out_channels_kept"}
    rows = list(csv.DictReader(io.StringIO(rep.to_csv())))
    assert len(rows) == 21 and int(rows[-1]["nonzeros"]) == rep.row("fc.weight").nonzeros
    md = rep.to_markdown()
    assert "FLOPs = 2 x MACs" in md and "| `layer4.1.conv2.weight` |" in md
    text = str(rep)
    assert "layer3.0.downsample.0.weight" in text and "FLOPs = 2 x MACs" in text
    assert len(text.splitlines()) == 21 + 3 + 4


def test_compare_before_after(element_report):
    _, after = element_report
    before = sparsify_fx.report(_resnet18(), X)
    cmp = before.compare(after)
    assert "75.0%" in str(cmp) and "0.0%" in str(cmp)
    data = cmp.to_dict()
    assert data["totals"]["before"]["macs"] > data["totals"]["after"]["macs"]
    assert len(data["layers"]) == 21
    md = cmp.to_markdown()
    assert "| `fc.weight` | 512,000 | 512,000 | 0.0% | 75.0% |" in md
    # flat index % 4 == 0 on a 1000x512 weight keeps columns 0, 4, 8, ...: every output
    # row keeps weights, only 128 of the 512 inputs do
    assert "| 1000/1000 | 1000/1000 | 512/512 | 128/512 |" in md
    ratio = after.total_macs / before.total_macs
    assert f"| effective MACs after / before | | {ratio:.4f} |" in md
    assert abs(ratio - 0.25) < 0.01
    rows = list(csv.DictReader(io.StringIO(cmp.to_csv())))
    assert len(rows) == 21
    fc = next(r for r in rows if r["name"] == "fc.weight")
    assert (fc["out_channels_before"], fc["in_channels_kept_after"]) == ("1000", "128")
    assert float(fc["macs_after"]) == after.row("fc.weight").macs


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_png_of_expected_size(element_report, tmp_path):
    import matplotlib.image as mpimg
    _, rep = element_report
    path = rep.plot(str(tmp_path / "r.png"))
    # 10 in wide, 1.6 + 0.17 in per layer high (21 layers), dpi 100
    assert _png_size(path) == (1000, 517)
    img = mpimg.imread(path)
    assert img.shape[:2] == (517, 1000) and img.std() > 0.05  # not a blank canvas


def test_plot_fits_fifty_layers_on_one_screen(tmp_path):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(50)])
    rep = sparsify_fx.report(model, torch.randn(1, 8))
    assert len(rep.rows) == 50
    assert _png_size(rep.plot(str(tmp_path / "fifty.png"))) == (1000, 1010)


def test_report_does_not_mutate_the_model(element_report):
    model = _resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsify_fx.report(model, torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    t, _ = element_report
    assert all(not e.mask._forward_hooks for e in sparsify_fx.masks(t))


def test_cli_prints_table_for_name_and_saved_model(element_report, tmp_path, capsys):
    assert report_main(["resnet18", "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.conv2.weight" in out and "FLOPs = 2 x MACs" in out
    t, rep = element_report
    path = tmp_path / "pruned.pt"
    torch.save(t, path)
    png = tmp_path / "p.png"
    assert report_main([str(path), "--input-shape", "1,3,64,64", "--format", "json",
                        "--plot", str(png), "--trust-pickle"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["nonzeros"] == rep.total_nonzeros
    assert data["totals"]["macs"] == pytest.approx(rep.total_macs)
    assert _png_size(png)[0] == 1000
    assert report_main(["resnt18"]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err
