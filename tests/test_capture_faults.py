"""Capture faults found by trying models as users hold them: random layer skipping
(LayerDrop) and weight-norm parametrized convolutions."""
from __future__ import annotations

import pathlib
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import sparsify_fx as sf


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(x))


class LayerDropEncoder(nn.Module):
    """A speech-style encoder: a weight-norm conv, then blocks skipped at random in training
    (LayerDrop, drawn with ``draw``: torch, Python's random or NumPy)."""

    def __init__(self, draw: str = "torch") -> None:
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(4, 8, 3, padding=1), dim=2)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 3)
        self.draw = draw

    def _skip(self) -> bool:
        if not self.training:
            return False
        p = {"torch": lambda: float(torch.rand(())), "python": random.random,
             "numpy": np.random.uniform}[self.draw]()
        return p < 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)
        for layer in self.layers:
            if self._skip():
                continue
            h = layer(h)
        return self.head(h.mean(1))


@pytest.mark.parametrize("draw", ["torch", "python", "numpy"])
def test_layerdrop_is_left_in_python_and_nothing_is_printed(draw: str, capfd) -> None:
    torch.manual_seed(0)
    model = LayerDropEncoder(draw)
    x = torch.randn(2, 4, 10)
    state = torch.random.get_rng_state(), random.getstate()
    with pytest.warns(sf.PartialTraceWarning, match="random numbers were drawn"):
        gm = sf.transform(model, example_inputs=(x,))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no graph dumped by a failed torch.export
    assert torch.equal(state[0], torch.random.get_rng_state()) and state[1] == random.getstate()
    names = {e.name for e in sf.masks(gm)}
    assert {"layers.0.fc.weight", "layers.1.fc.weight", "layers.2.fc.weight"} <= names
    # the skipping still happens in training (it is not frozen into a graph) ...
    gm.train()
    outs = {tuple(gm(x).detach().flatten().tolist()) for _ in range(12)}
    assert len(outs) > 1
    # ... and masks at 1 give the source model's function in eval mode
    gm.eval(), model.eval()
    assert torch.allclose(gm(x), model(x), atol=1e-6)


def test_weight_norm_model_masks_fold_report_and_export(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = LayerDropEncoder().eval()
    model.layers = nn.ModuleList(Block() for _ in range(2))
    x = torch.randn(3, 4, 10)
    gm = sf.transform(model, method="magnitude", target_sparsity=0.5, example_inputs=(x,))
    entries = sf.masks(gm)
    assert entries and abs(sf.sparsity(gm) - 0.5) < 0.02
    gm.eval()
    with sf.hard_masks(gm):
        expected = gm(x)
    assert expected.std(0).abs().max() > 1e-4  # the output follows the input
    folded = sf.fold(gm)
    assert torch.allclose(folded(x), expected, atol=1e-5)
    rows = sf.report(gm, (x,)).rows
    assert {r.name for r in rows} >= {e.name for e in entries}
    result = sf.export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert result.max_abs_diff < 1e-4
