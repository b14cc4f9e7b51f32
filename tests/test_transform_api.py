"""transform/masks/fold API behaviour and bad input (issue 2, acceptance 3)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sparsify_fx as sf
from sparsify_fx.models import DigitsCNN
from tests.helpers import max_diff, randomize_scores


def small() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN(width=4, hidden=8).eval()


def test_mask_nodes_in_graph_and_state_dict_keys() -> None:
    gm = sf.transform(small())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"
               and n.target.startswith("sparsify_masks.")]
    assert targets == ["sparsify_masks.features__0__weight", "sparsify_masks.features__3__weight",
                       "sparsify_masks.classifier__1__weight", "sparsify_masks.classifier__3__weight"]
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith("sparsify_masks."):
            assert node.args[0].op == "get_attr"
    assert "sparsify_masks.features__0__weight.scores" in gm.state_dict()
    assert [e.name for e in sf.masks(gm)] == ["features.0.weight", "features.3.weight",
                                              "classifier.1.weight", "classifier.3.weight"]


def test_save_load_round_trip_restores_masks() -> None:
    gm = sf.transform(small())
    randomize_scores(gm, 3)
    sf.masks(gm)[1].mask.freeze(torch.rand(sf.masks(gm)[1].mask.score_shape) > 0.5)
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    fresh = sf.transform(small())
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for a, b in zip(sf.masks(gm), sf.masks(fresh)):
        assert torch.equal(a.mask.hard_mask(), b.mask.hard_mask())
    x = torch.randn(3, 1, 8, 8)
    sf.set_hard(gm)
    sf.set_hard(fresh)
    assert torch.equal(gm(x), fresh(x))


def test_channel_granularity_scores_broadcast() -> None:
    gm = sf.transform(small(), granularity="channel")
    weights = [e for e in sf.masks(gm) if not e.mask.auxiliary]
    # the last Linear feeds the model output: its channels stay whole
    assert [e.mask.score_shape for e in weights] == [(4, 1, 1, 1), (8, 1, 1, 1), (8, 1)]
    with torch.no_grad():
        for e in sf.masks(gm):
            for src in getattr(e.mask, "sources", []):
                src.scores.copy_(torch.randn(src.score_shape))
                src.mark_trained()
    sf.set_hard(gm)
    folded = sf.fold(gm)
    w = dict(folded.named_parameters())["features.0.weight"]
    zero_rows = (w.reshape(4, -1) == 0).all(1)
    assert torch.equal(zero_rows, ~weights[0].mask.hard_mask().reshape(-1))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert max_diff(folded(x), gm(x)) <= 1e-6


def test_include_exclude_keep_first_last() -> None:
    names = lambda gm: [e.name for e in sf.masks(gm)]  # noqa: E731
    assert names(sf.transform(small(), include=["classifier.*"])) == [
        "classifier.1.weight", "classifier.3.weight"]
    assert names(sf.transform(small(), exclude=["features.0"])) == [
        "features.3.weight", "classifier.1.weight", "classifier.3.weight"]
    assert names(sf.transform(small(), keep_first=True, keep_last=True)) == [
        "features.3.weight", "classifier.1.weight"]


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.linear1 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.self_attn(x, x, x, need_weights=False)
        return self.linear1(x + y)


def test_multihead_attention_parametrized_exact() -> None:
    torch.manual_seed(0)
    layer = AttentionBlock().eval()
    x = torch.randn(2, 5, 16)
    gm = sf.transform(layer)
    routes = {e.name: e.route for e in sf.masks(gm)}
    assert routes["self_attn.in_proj_weight"] == "parametrize"
    assert routes["self_attn.out_proj.weight"] == "parametrize"
    assert routes["linear1.weight"] == "graph"
    with torch.no_grad():
        assert max_diff(gm(x), layer(x)) == 0.0
    randomize_scores(gm)
    sf.set_hard(gm)
    folded = sf.fold(gm)
    with torch.no_grad():
        assert max_diff(folded(x), gm(x)) <= 1e-6
    assert not hasattr(folded.self_attn, "parametrizations")


def test_input_model_not_mutated_and_training_mode_kept() -> None:
    model = small().train()
    before = copy.deepcopy(model.state_dict())
    gm = sf.transform(model)
    assert gm.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(isinstance(m, sf.Mask) for m in model.modules())


# -- bad input ------------------------------------------------------------------------

def test_non_module_input() -> None:
    with pytest.raises(sf.InputError, match="torch.nn.Module"):
        sf.transform(lambda x: x)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.inner(x)
        return x


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Untraceable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_untraceable_raises_trace_error_with_fix() -> None:
    with pytest.raises(sf.TraceError) as info:
        sf.transform(Wrapper())
    msg = str(info.value)
    assert "block" in msg and "leaf_modules" in msg and "concrete_args" in msg
    assert "x.sum() > 0" in msg


def test_leaf_modules_make_it_traceable() -> None:
    gm = sf.transform(Wrapper(), leaf_modules=[Untraceable])
    assert [(e.name, e.route) for e in sf.masks(gm)] == [("block.inner.weight", "parametrize")]


def test_empty_selection() -> None:
    with pytest.raises(sf.SelectionError, match="Loosen"):
        sf.transform(small(), include=["nothing.*"])


def test_fold_twice_and_fold_plain() -> None:
    folded = sf.fold(sf.transform(small()))
    with pytest.raises(sf.FoldError, match="transform"):
        sf.fold(folded)
    with pytest.raises(sf.FoldError):
        sf.fold(small())


def test_unknown_method_granularity_option() -> None:
    with pytest.raises(sf.ConfigError, match="unknown method"):
        sf.transform(small(), method="nope")
    with pytest.raises(sf.ConfigError, match="granularity"):
        sf.transform(small(), granularity="block")
    with pytest.raises(sf.ConfigError, match="s_init"):
        sf.transform(small(), s_init=40.0)
    with pytest.raises(sf.ConfigError, match="does not take"):
        sf.transform(small(), beta_typo=3)
    with pytest.raises(sf.ConfigError, match="target_sparsity"):
        sf.transform(small(), target_sparsity=1.5)


def test_errors_share_one_root() -> None:
    for cls in (sf.InputError, sf.ConfigError, sf.TraceError, sf.SelectionError, sf.FoldError,
                sf.BudgetError, sf.TrainingError, sf.ExportError, sf.ShrinkError):
        assert issubclass(cls, sf.SparsifyError)


def test_frozen_mask_forward_follows_every_new_keep() -> None:
    """Frozen masks reuse a cached float factor; it must follow freeze, in-place edits
    of ``keep`` and state_dict loads."""
    mask = sf.FixedMask((4, 3))
    w = torch.randn(4, 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        keep = torch.rand(4, 3, generator=g) > 0.5
        mask.freeze(keep)
        mask.freeze(~keep)  # twice in a row, no forward in between
        assert torch.equal(mask(w), w * (~keep).float())
    mask.keep[0, 0] = not bool(mask.keep[0, 0])
    assert torch.equal(mask(w), w * mask.keep.float())
    other = sf.FixedMask((4, 3))
    other.freeze(torch.zeros(4, 3, dtype=torch.bool))
    mask.load_state_dict(other.state_dict())
    assert torch.equal(mask(w), torch.zeros_like(w))
