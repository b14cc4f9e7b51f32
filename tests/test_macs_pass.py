"""The one MAC counter (passes/macs/count.py) as a pass: node meta, weight_costs read from
it, counted once per transform when example inputs are known."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import sparsify_fx as sf
from sparsify_fx.budgets.exact_cut import weight_costs
from sparsify_fx.budgets.cost_model import channel_macs
from sparsify_fx.models import Conv2, DigitsCNN
from sparsify_fx.passes.macs.count import MACS_META, GraphCounter
from tests.test_heads import small_swin, small_vit


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _transform(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # channel coupling warnings (LayerNorm, heads)
        return sf.transform(model, **kw)


def _shape_costs(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """What weight_costs computed before the one counter, from module output shapes:
    Conv/Linear: output elements per output channel per sample; ConvTranspose: input
    elements per input channel; MultiheadAttention (self-attention): query tokens."""
    n = x.shape[0]
    out: dict[str, float] = {}
    hooks = []
    for path, m in model.named_modules():
        def hook(mod: nn.Module, args: tuple, res, p: str = path) -> None:
            if isinstance(mod, nn.MultiheadAttention):
                tokens = math.prod(args[0].shape[:-1]) / n
                out[f"{p}.in_proj_weight"] = out[f"{p}.out_proj.weight"] = tokens
            elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
                out[f"{p}.weight"] = args[0].numel() / (n * args[0].shape[1])
            elif isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                channels = res.shape[1] if isinstance(mod, nn.modules.conv._ConvNd) else res.shape[-1]
                out[f"{p}.weight"] = res.numel() / (n * channels)
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


CASES = [
    ("digits_cnn", DigitsCNN, (4, 1, 8, 8)),
    ("digits_mlp", DigitsMLP, (4, 1, 8, 8)),
    ("conv2", lambda: Conv2(), (2, 1, 28, 28)),
    ("resnet18", tvm.resnet18, (2, 3, 64, 64)),
    ("mobilenet_v2", tvm.mobilenet_v2, (2, 3, 64, 64)),
    ("small_vit", small_vit, (2, 3, 32, 32)),
    pytest.param("vit_b_16", tvm.vit_b_16, (1, 3, 224, 224), marks=pytest.mark.slow,
                 id="vit_b_16"),
]


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("name,build,shape", CASES)
def test_weight_costs_unchanged_from_shape_formulas(name, build, shape, granularity) -> None:
    """The old implementation's values (shapes of each layer's call) on every masked
    weight, and on every unmasked Conv/Linear weight of a coupled channel model."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    want = _shape_costs(model, x)
    gm = _transform(model, granularity=granularity)
    costs = weight_costs(gm, x)
    entries = sf.masks(gm)
    assert {e.name for e in entries} <= set(costs)
    for e in entries:
        assert costs[e.name] == (0.0 if e.mask.auxiliary else want[e.name]), e.name
    extra = set(costs) - {e.name for e in entries}
    if granularity == "channel" and name in ("digits_mlp", "resnet18"):
        assert extra  # the last Linear keeps its outputs: unmasked, its inputs still shrink
    for w in extra:
        assert costs[w] == want[w], w


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_weight_costs_times_size_equals_report_macs(granularity) -> None:
    """cost x weight size x batch is the MACs report counts for the weight, on every
    masked weight: one counter, so this holds by construction, swin's windowed
    attention (qkv and proj run on the padded windows) included."""
    for model, x in ((small_swin(), torch.randn(2, 3, 36, 36)),
                     (small_vit(), torch.randn(2, 3, 32, 32)),
                     (tvm.resnet18().eval(), torch.randn(2, 3, 40, 40))):
        gm = _transform(model, granularity=granularity)
        costs = weight_costs(gm, x)
        counted = {r.name: r.dense_macs for r in sf.report(gm, x).rows}
        for e in sf.masks(gm):
            if not e.mask.auxiliary:
                assert costs[e.name] * math.prod(e.mask.weight_shape) * 2 == counted[e.name]


def test_swin_window_projections_cost_the_padded_tokens() -> None:
    """9x9 tokens in 4x4 windows are padded to 12x12 = 144 tokens before qkv and proj
    (torchvision's shifted_window_attention); the old shape reading gave qkv 81 / 3 = 27
    (output elements over the qkv weight's 3C rows) and proj 81 (unpadded tokens)."""
    gm = _transform(small_swin())
    costs = weight_costs(gm, torch.randn(2, 3, 36, 36))
    for block in ("features.1.0", "features.1.1"):
        assert costs[f"{block}.attn.qkv.weight"] == costs[f"{block}.attn.proj.weight"] == 144.0
        assert costs[f"{block}.mlp.0.weight"] == 81.0  # the MLP runs on the 9x9 tokens


def test_weight_costs_sum_every_call_and_read_matmul_weights_right() -> None:
    """``x @ W`` with W (in, out): tokens per sample (the old reading divided the output
    by W's first dim: tokens x out / in). Cross-attention in-projection: mean tokens of
    q, k, v (the report's q/k/v blocks)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 24))
            self.att = nn.MultiheadAttention(24, 2, batch_first=True)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            q = x @ self.w
            return self.att(q, y, y, need_weights=False)[0]

    gm = _transform(Model())
    x, y = torch.randn(2, 5, 8), torch.randn(2, 7, 24)
    costs = weight_costs(gm, (x, y))
    assert costs == {"w": 5.0, "att.in_proj_weight": (5 + 7 + 7) / 3,
                     "att.out_proj.weight": 5.0}


def _count_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    runs: list[int] = []
    run = GraphCounter.run

    def counted(self, *args, **kwargs):
        runs.append(1)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(GraphCounter, "run", counted)
    return runs


def test_transform_counts_once_then_weight_costs_runs_nothing(monkeypatch) -> None:
    runs = _count_runs(monkeypatch)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    gm = _transform(tvm.resnet18(), granularity="channel", example_inputs=x)
    assert len(runs) == 1
    calls: list[str] = []
    for path, m in gm.named_modules():
        m.register_forward_pre_hook(lambda *a, p=path: calls.append(p))
    costs = weight_costs(gm, x)
    copied = copy.deepcopy(gm)  # gm.meta and node.meta travel with the copy
    assert weight_costs(copied, x) == costs
    cm = channel_macs(gm, costs)  # the channel analysis finds the shapes stored on the nodes
    assert calls == [] and len(runs) == 1
    # the same numbers as a fresh count on a model transformed without inputs
    assert costs == weight_costs(_transform(tvm.resnet18(), granularity="channel"), x)
    assert len(runs) == 2
    assert cm.dense == pytest.approx(sf.report(gm, x).total_dense_macs / x.shape[0])
    assert len(runs) == 3  # report runs the counter (with hard-masked weights) itself
    # other input shapes: counted again (per-sample costs of this CNN scale with H x W)
    small = weight_costs(gm, x[:1, :, :16])
    assert len(runs) == 4 and small["conv1.weight"] == costs["conv1.weight"] / 2


def test_stored_macs_recounted_after_shape_prop_with_other_inputs(monkeypatch) -> None:
    runs = _count_runs(monkeypatch)
    x = torch.randn(2, 1, 8, 8)
    gm = _transform(DigitsCNN(), example_inputs=x)
    ShapeProp(gm).propagate(torch.randn(3, 1, 8, 8))  # node shapes no longer for x
    costs = weight_costs(gm, x)
    assert len(runs) == 2 and costs["features.0.weight"] == 64.0
    weight_costs(gm, x)
    assert len(runs) == 2
    for node in gm.graph.nodes:  # node meta lost (as in a pickled GraphModule): counted again
        node.meta.pop(MACS_META)
    assert weight_costs(gm, x) == costs and len(runs) == 3


def test_transform_without_inputs_counts_nothing(monkeypatch) -> None:
    runs = _count_runs(monkeypatch)
    gm = _transform(DigitsCNN())
    assert runs == [] and all(MACS_META not in n.meta for n in gm.graph.nodes)


def test_node_meta_holds_shapes_and_macs_like_shape_prop() -> None:
    x = torch.randn(2, 3, 40, 40)
    gm = _transform(tvm.mobilenet_v2(), example_inputs=x)
    counted = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
    ShapeProp(gm).propagate(x)
    shapes = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert counted.keys() == shapes.keys() and len(counted) > 100
    assert all(counted[k].shape == shapes[k].shape for k in counted)
    total = sum(n.meta[MACS_META].total for n in gm.graph.nodes)
    assert total == sf.report(gm, x).total_dense_macs
    conv = next(n for n in gm.graph.nodes if n.target is torch.conv2d)
    weight = conv.meta[MACS_META].weights
    assert list(weight) == ["features.0.0.weight"]
    assert weight["features.0.0.weight"] == 2 * 32 * 20 * 20 * 3 * 9  # out elements x C_in x k


def test_partial_trace_counts_real_macs() -> None:
    """A model whose root does not trace (its children do): counted from the aten ops, so a
    strided conv costs its output positions (the old hook reading took the input's)."""

    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
            self.fc = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1e9:  # data-dependent branch: the root stays untraced
                x = self.body(x)
            return self.fc(x.mean((2, 3)))

    with pytest.warns(sf.PartialTraceWarning):
        gm = sf.transform(Partial())
    assert weight_costs(gm, torch.randn(2, 3, 10, 10)) == {"body.0.weight": 16.0, "fc.weight": 1.0}

