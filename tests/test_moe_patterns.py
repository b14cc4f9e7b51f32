"""Hand-written mixture-of-experts modules, one per pattern (issue 34).

Experts as fused 3-D parameters (``gate_up`` ``(E, 2I, H)``, ``down`` ``(E, H, I)``, or
stored ``(E, in, out)``) called through a grouped matmul over tokens sorted by expert
(``transformers::grouped_mm_fallback``, what transformers 5 exports on CPU), routed by
``softmax`` + ``topk`` over a router linear, routing weights picked with ``index``.
Each: transform with ``capture="export"`` and ``granularity="channel"``, an exact cut
at ``target_macs=0.5``, ``shrink`` into the source class, outputs equal to the
hard-masked capture at another batch (after checking the output follows the input).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import sparsify_fx as sf
from sparsify_fx.budgets.cost_model import channel_macs
from sparsify_fx.budgets.exact_cut import apply_budget, weight_costs
from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
from tests.helpers import assert_shrunk_parity

moe = pytest.importorskip("transformers.integrations.moe")  # registers the grouped matmul op
grouped_mm = torch.ops.transformers.grouped_mm_fallback


class GroupedExperts(nn.Module):
    """Top-k routed experts, weights ``(E, out, in)`` (``transposed=False``) or stored
    ``(E, in, out)`` (``transposed=True``); a dense residual stream and output head."""

    has_shared = False  # a shared expert MLP beside the routed ones (SharedExpertMoE)

    def __init__(self, hidden: int = 16, units: int = 12, experts: int = 4, top_k: int = 2,
                 transposed: bool = False, clamped: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.top_k, self.experts, self.transposed = top_k, experts, transposed
        self.clamped, self.bias = clamped, bias
        if bias:  # per-expert biases, picked per token: out.add_(b[expert_ids])
            self.gate_up_bias = nn.Parameter(torch.randn(experts, 2 * units) * 0.3)
            self.down_bias = nn.Parameter(torch.randn(experts, hidden) * 0.3)
        self.intermediate_dim = units
        self.router = nn.Linear(hidden, experts, bias=False)
        shape_up = (experts, hidden, 2 * units) if transposed else (experts, 2 * units, hidden)
        shape_down = (experts, units, hidden) if transposed else (experts, hidden, units)
        self.gate_up_proj = nn.Parameter(torch.randn(shape_up) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(shape_down) * 0.3)
        self.head = nn.Linear(hidden, 5)

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.transposed else w.transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        probs = F.softmax(self.router(flat), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        expert_ids, perm = torch.sort(top_i.reshape(-1))
        tokens = flat[perm // self.top_k]  # tokens grouped by expert
        weights = top_w.reshape(-1)[perm]
        counts = torch.histc(expert_ids.float(), bins=self.experts, min=0, max=self.experts - 1)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        gate_up = grouped_mm(tokens, self._weight(self.gate_up_proj), offs)
        if self.bias:
            gate_up = gate_up.add_(self.gate_up_bias[expert_ids])
        gate, up = gate_up.chunk(2, dim=-1)
        if self.clamped:  # a swiglu with a limit: clamps around 0, (up + 1) * glu
            gate, up = gate.clamp(max=0.5), up.clamp(min=-0.5, max=0.5)
            act = (up + 1) * (gate * torch.sigmoid(gate * 1.702))
        else:
            act = F.silu(gate) * up
        out = grouped_mm(act, self._weight(self.down_proj), offs)
        if self.bias:
            out = out.add_(self.down_bias[expert_ids])
        out = out * weights.unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        y = out[inv].view(b * s, self.top_k, h).sum(1).view(b, s, h)
        return self.head(x + y + self.shared(x)) if self.has_shared else self.head(x + y)


def _transform(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sf.transform(model, granularity="channel", target_macs=0.5, example_inputs=(x,),
                          capture="export", dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    return gm, [w for w in caught if "Coupling" in type(w.message).__name__]


@pytest.mark.parametrize("transposed,clamped,bias", [(False, False, False), (True, False, False),
                                                    (False, True, False), (True, True, True)])
def test_grouped_matmul_experts_units_are_groups_and_shrink_exactly(transposed: bool,
                                                                      clamped: bool,
                                                                      bias: bool) -> None:
    """Each expert's MLP units are channel groups (unit i shared by every expert of the
    layer, so the fused 3-D tensors stay one tensor); routing (softmax, topk, sort, the
    index of tokens and of routing weights) only reads the router: no warning, the hidden
    size stays whole, the router keeps its expert columns. ``clamped``: a gate clamped
    below a positive limit and an up clamped around 0 keep a pruned unit at 0. ``bias``:
    per-expert biases picked per token (``out.add_(b[expert_ids])``) are gated and sliced
    with their units."""
    torch.manual_seed(0)
    model = GroupedExperts(transposed=transposed, clamped=clamped, bias=bias).eval()
    x = torch.randn(2, 8, 16)
    gm, warned = _transform(model, x)
    assert not warned, [str(w.message) for w in warned]
    groups = group_masks(gm)
    assert [m.score_shape for m in groups.values()] == [(12,)]  # one slot per unit
    apply_budget(gm, target_macs=0.5, scores=channel_l1_scores(gm))
    gm.eval()
    small = sf.shrink(gm).eval()
    kept = int(next(iter(groups.values())).hard_mask().sum())
    assert 0 < kept < 12
    width = -(-kept // 4) * 4  # 16-byte aligned fp32 expert rows (zero units added)
    up_dim, down_dim = (2, 1) if transposed else (1, 2)
    assert small.gate_up_proj.shape[0] == 4 and small.gate_up_proj.shape[up_dim] == 2 * width
    assert small.down_proj.shape[down_dim] == width
    assert small.intermediate_dim == width
    assert small.router.weight.shape == (4, 16) and small.head.weight.shape == (5, 16)
    if bias:
        assert small.gate_up_bias.shape == (4, 2 * width) and small.down_bias.shape == (4, 16)
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 7, 16), rtol=1e-4)


def test_expert_weight_costs_count_each_token_once_per_chosen_expert() -> None:
    """A grouped matmul's MACs are charged to its 3-D weight: tokens x top_k x in x out,
    so one (out, in) pair of the weight costs tokens x top_k / E per sample per expert."""
    torch.manual_seed(0)
    model = GroupedExperts().eval()
    x = torch.randn(2, 8, 16)
    gm, _ = _transform(model, x)
    costs = weight_costs(gm, (x,))
    name = next(k for k in costs if k.endswith("gate_up_proj"))
    assert costs[name] == pytest.approx(8 * 2 / 4)  # tokens per sample x top_k / experts



class SharedExpertMoE(GroupedExperts):
    """Routed experts plus a shared expert: a dense gated MLP of ``shared`` x the experts'
    units, which a config holds with the same field (``moe_intermediate_size x
    n_shared_experts``)."""

    def __init__(self, shared: int) -> None:
        super().__init__()
        self.shared_gate = nn.Linear(16, 12 * shared, bias=False)
        self.shared_up = nn.Linear(16, 12 * shared, bias=False)
        self.shared_down = nn.Linear(12 * shared, 16, bias=False)

    has_shared = True

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_down(F.silu(self.shared_gate(x)) * self.shared_up(x))


@pytest.mark.parametrize("shared", [1, 2])
def test_a_uniform_cut_keeps_one_aligned_width_for_experts_and_their_shared_expert(
        shared: int) -> None:
    """``uniform=True``: the experts' units and a shared MLP of ``shared`` x as many units
    keep one count per expert unit (one config field holds both), a multiple of the
    grouped-matmul alignment (4 fp32 units), so shrink adds no padding and the widths
    agree."""
    torch.manual_seed(0)
    model = SharedExpertMoE(shared).eval()
    gm, _ = _transform(model, torch.randn(2, 8, 16))
    groups = group_masks(gm)
    assert sorted(m.score_shape for m in groups.values()) == sorted([(12,), (12 * shared,)])
    apply_budget(gm, target_macs=0.6, scores=channel_l1_scores(gm), uniform=True)
    kept = sorted(int(m.hard_mask().sum()) for m in groups.values())
    width = kept[0]
    assert width % 4 == 0 and 0 < width < 12 and kept[1] == shared * width
    gm.eval()
    small = sf.shrink(gm).eval()
    assert small.shared_up.weight.shape == (shared * width, 16)
    assert small.down_proj.shape[2] == width
    # the MACs the cut counted are the shrunk model's (its grouped matmuls counted in eager)
    x = torch.randn(2, 8, 16)
    fraction = channel_macs(gm, weight_costs(gm, (x,))).hard_fraction()
    dense, shrunk = sf.report(model, (x,)).total_macs, sf.report(small, (x,)).total_macs
    assert shrunk / dense == pytest.approx(fraction, rel=1e-9) and fraction < 0.95
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 7, 16), rtol=1e-4)
