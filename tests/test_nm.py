"""N:M granularity (issue 12): every group of m consecutive input weights keeps n."""
from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

import sparsify_fx as sf
from sparsify_fx.data import digits
from sparsify_fx.granularity import parse_granularity


def groups_zeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Zeros per full group of ``m`` consecutive entries along dim 1 (input dim)."""
    moved = weight.detach().movedim(1, -1)
    full = (moved.shape[-1] // m) * m
    return (moved[..., :full].reshape(*moved.shape[:-1], full // m, m) == 0).sum(-1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("shape", [(6, 8), (4, 12, 3, 3), (5, 10)])
def test_pattern_keeps_exactly_n_of_every_m(shape: tuple[int, ...]) -> None:
    gran = parse_granularity("2:4")
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    keep = gran.pattern_keep(scores)
    assert keep.shape == scores.shape
    assert torch.all(groups_zeros(keep.float(), 4) == 2)  # zeros of `keep`: pruned entries
    # the kept two are the two largest scores of each group
    moved_s, moved_k = scores.movedim(1, -1), keep.movedim(1, -1)
    full = (moved_s.shape[-1] // 4) * 4
    g_s = moved_s[..., :full].reshape(-1, 4)
    g_k = moved_k[..., :full].reshape(-1, 4)
    top = torch.topk(g_s, 2, dim=-1).indices
    assert torch.equal(torch.zeros_like(g_k).scatter_(-1, top, True), g_k)
    if shape[1] % 4:  # trailing group of 2 keeps ceil(2 * 2 / 4) = 1
        tail = moved_k[..., full:]
        assert torch.all(tail.sum(-1) == 1)


def test_pattern_along_dim_0_for_matmul_weights() -> None:
    """``x @ W`` weights are (in, out): the groups run along dim 0."""
    gran = parse_granularity("2:4")
    scores = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    keep = gran.pattern_keep(scores, input_dim=0)
    assert torch.equal(keep.T, gran.pattern_keep(scores.T.contiguous()))
    assert torch.all(keep.reshape(2, 4, 6).sum(1) == 2)


def test_granularity_parsing_and_target_checks() -> None:
    assert parse_granularity("2:4").density == 0.5
    with pytest.raises(sf.ConfigError, match="N:M pattern"):
        parse_granularity("4:2")
    with pytest.raises(sf.ConfigError, match="fixes the sparsity at 0.5"):
        sf.transform(mlp(), granularity="2:4", target_sparsity=0.9)
    with pytest.raises(sf.ConfigError, match="fixes the sparsity"):
        sf.transform(mlp(), granularity="2:4", target_macs=0.5,
                     example_inputs=torch.randn(1, 1, 8, 8))


def test_magnitude_2_4_counts_and_folds() -> None:
    torch.manual_seed(0)
    model = mlp()
    gm = sf.transform(model, method="magnitude", granularity="2:4")
    assert sf.sparsity(gm) == 0.5
    x = torch.randn(4, 1, 8, 8)
    rep = sf.report(gm, x)
    assert all(r.sparsity == 0.5 for r in rep.rows if r.masked)
    folded = sf.fold(gm)
    for e in sf.masks(gm):
        w = folded.get_parameter(e.name)
        assert torch.all(groups_zeros(w, 4) >= 2), e.name
        # the kept weights are the two largest |w| of each group
        orig = model.get_parameter(e.name).detach().reshape(-1, 4).abs()
        kept = (w.reshape(-1, 4) != 0)
        assert torch.all(orig[kept].reshape(-1, 2).min(-1).values
                         >= orig[~kept].reshape(-1, 2).max(-1).values)


def test_cs_2_4_training_ends_on_the_pattern() -> None:
    torch.manual_seed(0)
    gm = sf.transform(mlp(), method="cs", granularity="2:4")
    run = sf.Trainer(gm, digits(0).train, epochs=3, lr=0.05, mask_lr=0.01,
                     progress=False).fit()
    assert run.cut is not None and run.cut.sparsity == 0.5
    folded = sf.fold(gm)
    for e in sf.masks(gm):
        assert torch.all(groups_zeros(folded.get_parameter(e.name), 4) >= 2)


def _resnet18() -> tuple[nn.Module, torch.Tensor]:
    return torchvision.models.resnet18(weights=None).eval(), torch.randn(2, 3, 64, 64)


def _vit_b_16() -> tuple[nn.Module, torch.Tensor]:
    model = torchvision.models.vit_b_16(weights=None).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits the head
    return model, torch.randn(2, 3, 224, 224)


@pytest.mark.parametrize("build", [_resnet18, pytest.param(_vit_b_16, marks=pytest.mark.slow)],
                         ids=["resnet18", "vit_b_16"])
def test_fold_parity_2_4(build) -> None:
    torch.manual_seed(0)
    model, x = build()
    gm = sf.transform(model, method="magnitude", granularity="2:4").eval()
    folded = sf.fold(gm).eval()
    with torch.no_grad(), sf.hard_masks(gm):
        want = gm(x)
    assert float((want[0] - want[1]).abs().max()) > 1e-4  # the output varies with the input
    with torch.no_grad():
        assert torch.allclose(folded(x), want, atol=1e-5, rtol=1e-4)
    for e in sf.masks(gm):
        w = folded.get_parameter(e.name) if e.route == "graph" else dict(
            folded.named_parameters())[e.name]
        if w.shape[1] >= 4:
            assert torch.all(groups_zeros(w, 4) >= 2), e.name


def test_export_keeps_the_pattern(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    gm = sf.transform(mlp(), method="magnitude", granularity="2:4")
    x = torch.randn(3, 1, 8, 8)
    path = tmp_path / "nm.onnx"
    sf.export_onnx(gm, x, path, min_sparsity=0.4)
    proto = onnx.load(str(path))
    arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    for sp in proto.graph.sparse_initializer:
        dense = np.zeros(list(sp.dims), dtype=np.float32).reshape(-1)
        idx = numpy_helper.to_array(sp.indices).reshape(-1)
        dense[idx] = numpy_helper.to_array(sp.values)
        arrays.append(dense.reshape(list(sp.dims)))
    checked = 0
    for shape in [(32, 64), (10, 32)]:
        found = [a for a in arrays if a.shape in (shape, shape[::-1])]
        assert found, shape
        a = torch.from_numpy(found[0].copy())
        w = a if tuple(a.shape) == shape else a.T  # MatMul stores (in, out)
        assert torch.all(groups_zeros(w, 4) >= 2)
        checked += 1
    assert checked == 2


class MatmulNet(nn.Module):
    """A weight used as ``x @ W`` (stored ``(in, out)``, like GPT-2's Conv1D)."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W


def test_2_4_on_a_matmul_weight_groups_its_input_dim() -> None:
    torch.manual_seed(0)
    gm = sf.transform(MatmulNet(), method="magnitude", granularity="2:4")
    assert [e.kind for e in sf.masks(gm)] == ["matmul"]
    folded = sf.fold(gm)
    w = folded.get_parameter("W")
    assert torch.all((w.reshape(4, 4, 8) == 0).sum(1) == 2)  # groups of 4 input rows
    x = torch.randn(3, 16)
    with torch.no_grad(), sf.hard_masks(gm):
        assert torch.allclose(folded(x), gm(x))
