"""Hand-written modules, one per pattern the family sweep found (issue 34).

Each: transform with ``capture="export"`` and ``granularity="channel"``, an L1 cut at
``target_macs=0.5``, ``shrink`` into the source class, outputs equal to the hard-masked
capture at another batch (after checking the output follows the input).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsify_fx as sf
from sparsify_fx.budgets.exact_cut import apply_budget
from sparsify_fx.mask_index import hard_masks
from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
from tests.helpers import assert_shrunk_parity


class SquaredMLP(nn.Module):
    """An ungated MLP whose activation is ``relu(x) ** 2`` (``torch.square``) or ``x * x``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.how == "square":
            h = torch.square(F.relu(h))
        elif self.how == "mul":
            h = h * h
        else:  # where on a comparison of the unit's own channels (exactly 0 at 0)
            h = torch.where(h > 0, h * h, 0.5 * h)
        return self.down(h)


class InterleavedAttention(nn.Module):
    """Fused q/k/v laid out per head (each head's q, k, v rows adjacent), per-head
    RMSNorm on q and k, scores by ``baddbmm`` with a bias that is the same for every head."""

    def __init__(self, d: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d // num_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        self.o = nn.Linear(d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.num_heads, 3, self.head_dim)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b * self.num_heads, s, self.head_dim)
        k = k.reshape(b * self.num_heads, s, self.head_dim)
        v = v.reshape(b * self.num_heads, s, self.head_dim)
        bias = torch.zeros(1, s, s) + torch.arange(s).float() * 0.1  # one bias for all heads
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=self.head_dim ** -0.5)
        a = torch.bmm(scores.softmax(-1), v).view(b, self.num_heads, s, self.head_dim)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, s, -1)))


def _cut_and_shrink(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sf.transform(model, granularity="channel", target_macs=0.5, example_inputs=(x,),
                          capture="export")
    apply_budget(gm, target_macs=0.5, scores=channel_l1_scores(gm))
    gm.eval()
    return gm, sf.shrink(gm).eval(), [w for w in caught if "Coupling" in type(w.message).__name__]


@pytest.mark.parametrize("how", ["square", "mul", "where"])
def test_elementwise_activation_on_a_units_channels_keeps_units_prunable(how: str) -> None:
    torch.manual_seed(0)
    model = SquaredMLP(how).eval()
    gm, small, coupling = _cut_and_shrink(model, torch.randn(4, 16))
    assert not coupling
    assert len(group_masks(gm)) == 1
    assert small.up.out_features == small.down.in_features < 48
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 16))


def test_interleaved_fused_qkv_with_qk_norms_and_baddbmm_prunes_whole_heads() -> None:
    torch.manual_seed(0)
    model = InterleavedAttention().eval()
    gm, small, coupling = _cut_and_shrink(model, torch.randn(2, 6, 32))
    assert not coupling
    heads = small.num_heads
    assert 1 <= heads < 4
    assert small.qkv.out_features == 3 * heads * 8 and small.o.in_features == heads * 8
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))  # a static capture


class HeadBias(InterleavedAttention):
    """As above, but the bias added by ``baddbmm`` differs per head (as ALiBi): removing a
    head would need slicing it, so the heads stay whole (exact, never wrong)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.num_heads, 3, self.head_dim)
        q, k, v = (qkv[..., i, :].transpose(1, 2).reshape(b * self.num_heads, s, self.head_dim)
                   for i in range(3))
        slopes = torch.arange(1, self.num_heads + 1).float().repeat(b)[:, None, None]
        scores = torch.baddbmm(slopes * torch.arange(s).float(), q, k.transpose(1, 2))
        a = torch.bmm(scores.softmax(-1), v).view(b, self.num_heads, s, self.head_dim)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, s, -1)))


def test_a_per_head_bias_keeps_heads_whole() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(HeadBias().eval(), granularity="channel",
                          example_inputs=(torch.randn(2, 6, 32),), capture="export")
    assert not group_masks(gm)  # the only group (heads) is kept whole


class UnknownOpMLP(nn.Module):
    """Two branches: one through an op the analysis does not know (``special.i0``: whole),
    one plain MLP (prunable)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 96), nn.Linear(96, 8)
        self.c, self.d = nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.special.i0(self.a(x))) + self.d(F.relu(self.c(x)))


def test_budget_error_names_the_layers_and_ops_that_hold_the_macs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(UnknownOpMLP().eval(), granularity="channel",
                          example_inputs=(torch.randn(3, 16),), capture="export")
    with pytest.raises(sf.BudgetError, match=r"most in a\.weight 0\.\d+.*kept whole at .*i0"):
        apply_budget(gm, target_macs=0.3)


class StridedAttention(nn.Module):
    """Attention whose output is merged by ``transpose(1, 2).view(b, s, -1)``: legal in eager
    because SDPA returns it in (batch, seq, heads, dim) memory order, so the capture holds
    a ``view`` of a transposed value (the walk replays it as a reshape)."""

    def __init__(self, d: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.h, self.hd = num_heads, d // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).view(b, s, -1))


def test_a_view_of_a_transposed_attention_output_keeps_heads_prunable() -> None:
    torch.manual_seed(0)
    model = StridedAttention().eval()
    gm, small, coupling = _cut_and_shrink(model, torch.randn(2, 6, 32))
    assert not coupling
    assert len(group_masks(gm)) == 1
    assert small.q.out_features == small.o.in_features < 32
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))


class ComplexRotary(StridedAttention):
    """Rotary embeddings through complex numbers: ``view_as_complex`` of (..., d/2, 2) pairs,
    a product with complex frequencies, ``view_as_real`` back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.hd) for p in (self.q, self.k, self.v))
        angles = torch.arange(s, dtype=torch.float)[:, None] * torch.arange(1, self.hd // 2 + 1)
        freqs = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]

        def rope(t: torch.Tensor) -> torch.Tensor:
            c = torch.view_as_complex(t.float().reshape(b, s, -1, self.hd // 2, 2))
            return torch.view_as_real(c * freqs).flatten(3)
        q, k, v = (t.transpose(1, 2) for t in (rope(q), rope(k), v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).reshape(b, s, -1))


def test_complex_rotary_embeddings_keep_heads_prunable() -> None:
    torch.manual_seed(0)
    model = ComplexRotary().eval()
    gm, small, coupling = _cut_and_shrink(model, torch.randn(2, 6, 32))
    assert not coupling
    assert len(group_masks(gm)) == 1
    assert small.q.out_features == small.k.out_features < 32
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))


class PerChannelScale(nn.Module):
    """A learned per-channel scale on the MLP units and a per-channel shift on the query
    heads' channels (1-D parameters along the last dim): shrink slices them."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)
        self.scale = nn.Parameter(torch.rand(48) + 0.5)
        self.shift = nn.Parameter(torch.randn(48))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.up(x) * self.scale)
        h = F.gelu(h + self.shift)
        return self.head(x + self.down(h))


def test_a_per_channel_parameter_is_sliced_with_its_channels() -> None:
    torch.manual_seed(0)
    model = PerChannelScale().eval()
    gm, small, coupling = _cut_and_shrink(model, torch.randn(4, 16))
    assert not coupling
    assert len(group_masks(gm)) == 1
    kept = small.up.out_features
    assert kept < 48 and small.scale.shape == small.shift.shape == (kept,)
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 16))


class UnitSphereMLP(nn.Module):
    """A gated MLP whose units are scaled by parameters times a constant (``suv * c``) and
    L2-normalised over the units (``h * rsqrt(h.pow(2).sum(-1))``): a pruned unit adds 0 to
    the sum, so the units stay prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 48), nn.Linear(16, 48), nn.Linear(48, 16)
        self.suv_gate = nn.Parameter(torch.rand(48) + 0.5)
        self.suv_up = nn.Parameter(torch.rand(48) + 0.5)
        self.register_buffer("c", torch.tensor(4.0))  # a 0-d constant tensor
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x) * (self.suv_gate * 4.0)
        u = self.up(x) * (self.suv_up * self.c)
        h = F.silu(g) * u
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + 1e-6)
        return self.head(x + self.down(h))


def test_units_scaled_by_computed_parameters_and_l2_normalised_stay_prunable() -> None:
    torch.manual_seed(0)
    model = UnitSphereMLP().eval()
    gm, small, coupling = _cut_and_shrink(model, torch.randn(4, 16))
    assert not coupling
    assert len(group_masks(gm)) == 1
    kept = small.gate.out_features
    assert kept < 48 and small.suv_gate.shape == small.suv_up.shape == (kept,)
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 16))


class LoopedMLP(nn.Module):
    """The same MLP applied three times (a loop over shared layers): each weight is read by
    several calls (a per-unit scale too), and a unit is removed from every pass at once."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)
        self.scale = nn.Parameter(torch.rand(48) + 0.5)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = x + self.down(F.gelu(self.up(x) * self.scale))
        return self.head(x)


def test_a_weight_read_by_several_calls_keeps_its_units_prunable() -> None:
    torch.manual_seed(0)
    model = LoopedMLP().eval()
    gm, small, coupling = _cut_and_shrink(model, torch.randn(4, 16))
    assert not coupling
    assert len(group_masks(gm)) == 1
    assert small.up.out_features == small.down.in_features == small.scale.shape[0] < 48
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 16))


class NoGradGate(nn.Module):
    """Part of ``forward`` under ``torch.no_grad()`` (a ``wrap_with_set_grad_enabled``
    region in the capture) reading the units' channels: walked with their ids."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        with torch.no_grad():
            gate = torch.sigmoid(h) * 2.0
        return x + self.down(h * gate)


def test_a_no_grad_region_on_unit_channels_keeps_units_prunable() -> None:
    torch.manual_seed(0)
    model = NoGradGate().eval()
    gm, small, coupling = _cut_and_shrink(model, torch.randn(2, 5, 16))
    assert not coupling
    assert len(group_masks(gm)) == 1
    assert small.up.out_features == small.down.in_features < 48
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 5, 16))


class KeywordAfterOptional(nn.Module):
    """``forward(x, cache=None, mask=None)`` called with keywords ``x`` and ``mask``: the
    capture takes them positionally, the source class must get them by name."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None:
            raise TypeError("a mask passed as the cache")
        return self.down(F.relu(self.up(x))) * mask[..., None]


def test_keyword_inputs_reach_the_shrunk_source_class_by_name() -> None:
    torch.manual_seed(0)
    make = lambda: {"x": torch.randn(2, 5, 16), "mask": (torch.rand(2, 5) > 0.3).float()}  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(KeywordAfterOptional().eval(), granularity="channel", target_macs=0.5,
                          example_inputs=make(), capture="export")
    apply_budget(gm, target_macs=0.5, scores=channel_l1_scores(gm))
    gm.eval()
    small = sf.shrink(gm).eval()
    assert small.up.out_features < 48
    a, b = make(), make()
    with torch.no_grad(), hard_masks(gm):
        ref = gm(a["x"], a["mask"])
        assert (ref - gm(b["x"], b["mask"])).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(small(**a), ref, rtol=1e-5, atol=1e-5)
