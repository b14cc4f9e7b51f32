"""Hand-written state-space / short-convolution mixers, one per pattern the family sweep
found in Mamba-style and linear-attention decoders (issue 34).

Each: ``transform(capture="export", granularity="channel")``, an L1 cut at
``target_macs=0.5``, ``shrink`` into the source class, outputs equal to the hard-masked
capture on a new batch (after checking the output follows the input), and the inner
width actually cut (counted from the shrunk weights).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import sparsify_fx as sf
from sparsify_fx.passes.channels.couple import group_masks
from tests.helpers import assert_shrunk_parity, l1_cut_and_shrink


class Block(nn.Module):
    """``x + mixer(norm(x))`` and a head: the residual stream stays whole."""

    def __init__(self, mixer: nn.Module, d: int = 32) -> None:
        super().__init__()
        self.norm, self.mixer, self.head = nn.LayerNorm(d), mixer, nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.mixer(self.norm(x)))


class ShortConvMixer(nn.Module):
    """A gated depthwise causal convolution whose weight is read through a view
    (``w.squeeze(1)`` then ``unsqueeze(1)``, as the reference causal-conv1d path does)."""

    def __init__(self, d: int = 32, inner: int = 48, k: int = 4) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * inner)
        self.conv1d = nn.Conv1d(inner, inner, k, groups=inner, padding=k - 1)
        self.out_proj = nn.Linear(inner, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, gate = self.in_proj(h).chunk(2, -1)
        w = self.conv1d.weight.squeeze(1)
        c = F.conv1d(u.transpose(1, 2), w.unsqueeze(1), self.conv1d.bias,
                     padding=w.shape[-1] - 1, groups=u.shape[-1])[..., :h.shape[1]]
        return self.out_proj(F.silu(c).transpose(1, 2) * F.silu(gate))


class SelectiveScanMixer(nn.Module):
    """A Mamba-style selective scan (the reference slow path): ``dt_proj.weight @ dt``,
    per-channel ``A_log`` / ``D`` / ``dt`` bias read through ``p[None, :, None]`` views,
    outer products ``dt[..., None] * B[:, None]``, a zero initial state, ``state @ C``,
    gating by ``silu(z)``. ``dt_rank`` splits ``x_proj``'s output and equals
    ``conv_kernel`` (the padding), so a shrink that rescales every attribute equal to a
    width would break the convolution."""

    def __init__(self, d: int = 32, inner: int = 48, state: int = 8, dt_rank: int = 4,
                 k: int = 4) -> None:
        super().__init__()
        self.dt_rank, self.state, self.conv_kernel = dt_rank, state, k
        self.in_proj = nn.Linear(d, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, k, groups=inner)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1.0)).repeat(inner, 1)
                                  + 0.1 * torch.randn(inner, state))
        self.D = nn.Parameter(1 + 0.1 * torch.randn(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, _ = h.shape
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # (B, I, L) each
        x = F.silu(F.conv1d(x, self.conv1d.weight, self.conv1d.bias,
                            padding=self.conv_kernel - 1, groups=x.shape[1])[..., :length])
        params = self.x_proj(x.transpose(1, 2))
        dt, b, c = torch.split(params, [self.dt_rank, self.state, self.state], dim=-1)
        dt = F.softplus(self.dt_proj.weight @ dt.transpose(1, 2) + self.dt_proj.bias[:, None])
        a = -torch.exp(self.A_log)
        decay = torch.exp(a[None, :, None, :] * dt[:, :, :, None])  # (B, I, L, N)
        drive = dt[:, :, :, None] * b[:, None, :, :] * x[:, :, :, None]
        s = torch.zeros(batch, x.shape[1], self.state)
        ys = []
        for i in range(length):
            s = decay[:, :, i, :] * s + drive[:, :, i, :]
            ys.append(torch.matmul(s, c[:, i, :].unsqueeze(-1))[:, :, 0])
        y = torch.stack(ys, dim=-1) + x * self.D[None, :, None]
        return self.out_proj((y * F.silu(z)).transpose(1, 2))


class ChunkPadMixer(nn.Module):
    """Per-channel decay over chunks: the length is padded (``F.pad``, constant) to whole
    chunks, summed per chunk, and cut back."""

    def __init__(self, d: int = 32, inner: int = 48, chunk: int = 4) -> None:
        super().__init__()
        self.chunk = chunk
        self.in_proj = nn.Linear(d, 2 * inner)
        self.out_proj = nn.Linear(inner, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, gate = self.in_proj(h).chunk(2, -1)
        length = h.shape[1]
        pad = (-length) % self.chunk
        v = F.pad(u.transpose(1, 2), (0, pad))  # (B, I, L + pad)
        chunks = v.reshape(v.shape[0], v.shape[1], -1, self.chunk).cumsum(-1)
        y = chunks.reshape(v.shape)[..., :length].transpose(1, 2)
        return self.out_proj(torch.tanh(y) * F.silu(gate))


class HeadDecayMixer(nn.Module):
    """A per-head decay stored as ``(1, 1, H, 1)`` (its channel dim is not dim 0) and a
    per-channel bias read through ``view(1, 1, -1)`` before the heads are split."""

    def __init__(self, d: int = 32, num_heads: int = 6, head_dim: int = 8) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.in_proj = nn.Linear(d, 2 * num_heads * head_dim)
        self.dt_bias = nn.Parameter(0.1 * torch.randn(num_heads * head_dim))
        self.A_log = nn.Parameter(0.5 + torch.rand(1, 1, num_heads, 1))
        self.out_proj = nn.Linear(num_heads * head_dim, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, _ = h.shape
        u, g = self.in_proj(h).chunk(2, -1)
        g = (g + self.dt_bias.view(1, 1, -1)).view(b, length, self.num_heads, self.head_dim)
        decay = -torch.exp(self.A_log.float()) * F.softplus(g)
        y = u.view(b, length, self.num_heads, self.head_dim) * torch.exp(decay)
        return self.out_proj(y.reshape(b, length, -1))


class FusedSplitMixer(nn.Module):
    """q, k and v from one projection through a depthwise convolution, split with sizes the
    module keeps as ``key_dim`` / ``value_dim`` (a gated delta net's layout): cutting heads
    must update both attributes, which no known width name holds."""

    def __init__(self, d: int = 32, heads: int = 4, head_k: int = 8, head_v: int = 16,
                 k: int = 4) -> None:
        super().__init__()
        self.head_k_dim, self.head_v_dim = head_k, head_v
        self.key_dim, self.value_dim = heads * head_k, heads * head_v
        width = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv = nn.Linear(d, width, bias=False)
        self.conv1d = nn.Conv1d(width, width, k, groups=width, padding=k - 1, bias=False)
        self.out_proj = nn.Linear(self.value_dim, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, _ = h.shape
        qkv = self.conv1d(self.in_proj_qkv(h).transpose(1, 2))[..., :length]
        q, k, v = torch.split(F.silu(qkv).transpose(1, 2),
                              [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = (t.reshape(b, length, -1, self.head_k_dim).transpose(1, 2) for t in (q, k))
        v = v.reshape(b, length, -1, self.head_v_dim).transpose(1, 2)
        scores = torch.tril(q @ k.transpose(-1, -2))  # a causal linear attention per head
        y = (scores @ v).transpose(1, 2)
        return self.out_proj(y.reshape(b, length, -1))


def _cut_and_shrink(mixer: type[nn.Module], length: int = 7, dynamic_length: bool = True
                    ) -> tuple[nn.Module, nn.Module, list[str]]:
    """``Block(mixer())`` (seed 0) captured on a batch of 2 x ``length`` (batch dynamic, and
    the length unless the mixer loops over it), L1 cut to 0.5 of its MACs, shrunk; and the
    warnings the capture raised."""
    torch.manual_seed(0)
    dynamic = {0: Dim.AUTO, 1: Dim.AUTO} if dynamic_length else {0: Dim.AUTO}
    return l1_cut_and_shrink(Block(mixer()).eval(), (torch.randn(2, length, 32),), (dynamic,))


def test_depthwise_conv_weight_read_through_a_view_is_cut() -> None:
    gm, small, warned = _cut_and_shrink(ShortConvMixer, length=7)
    assert not any("squeeze" in w for w in warned)
    assert [m.score_shape for m in group_masks(gm).values()] == [(48,)]
    conv = small.mixer.conv1d
    assert conv.weight.shape[0] == conv.groups == conv.in_channels < 48
    assert small.mixer.in_proj.weight.shape[0] == 2 * conv.groups
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


def test_selective_scan_channels_are_cut_with_their_state_parameters() -> None:
    gm, small, warned = _cut_and_shrink(SelectiveScanMixer, length=6, dynamic_length=False)
    assert not any("channel coupling" in w for w in warned), warned
    mixer = small.mixer
    inner = mixer.D.shape[0]
    assert 0 < inner < 48  # the scan's channels were cut, not kept whole
    assert mixer.A_log.shape == (inner, 8) and mixer.dt_proj.weight.shape[0] == inner
    assert mixer.conv1d.weight.shape[0] == inner and mixer.out_proj.weight.shape[1] == inner
    assert mixer.in_proj.weight.shape[0] == 2 * inner
    # dt_rank follows x_proj's dt rows; the kernel size (the same number) is left alone
    assert mixer.x_proj.weight.shape[0] == mixer.dt_rank + 16
    assert mixer.dt_proj.weight.shape[1] == mixer.dt_rank and mixer.conv_kernel == 4
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 6, 32))


def test_constant_pad_along_the_length_keeps_channels_prunable() -> None:
    gm, small, warned = _cut_and_shrink(ChunkPadMixer, length=7)
    assert not any("pad" in w for w in warned), warned
    assert small.mixer.out_proj.weight.shape[1] < 48
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 10, 32))


def test_pad_in_reflect_mode_keeps_its_channels_whole_with_a_warning() -> None:
    class ReflectPad(ChunkPadMixer):
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            u, gate = self.in_proj(h).chunk(2, -1)
            v = F.pad(u.transpose(1, 2), (1, 1), mode="reflect")[..., 1:-1]
            return self.out_proj(v.transpose(1, 2) * F.silu(gate))

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = sf.transform(Block(ReflectPad()).eval(), granularity="channel", target_macs=0.5,
                          example_inputs=(torch.randn(2, 7, 32),), capture="export")
    assert any("pad" in str(w.message) for w in caught)
    assert not group_masks(gm) or all(m.score_shape != (48,) for m in group_masks(gm).values())


def test_per_head_parameter_stored_along_a_later_dim_is_sliced_there() -> None:
    gm, small, warned = _cut_and_shrink(HeadDecayMixer, length=7)
    assert not any("channel coupling" in w for w in warned), warned
    mixer = small.mixer
    heads = mixer.A_log.shape[2]
    assert 0 < heads < 6 and mixer.A_log.shape == (1, 1, heads, 1)
    assert mixer.num_heads == heads and mixer.dt_bias.shape == (heads * 8,)
    assert mixer.out_proj.weight.shape[1] == heads * 8
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


def test_split_sizes_held_in_attributes_follow_the_cut() -> None:
    gm, small, warned = _cut_and_shrink(FusedSplitMixer, length=7)
    assert not any("channel coupling" in w for w in warned), warned
    mixer = small.mixer
    heads = mixer.value_dim // 16
    assert 0 < heads < 4 and mixer.key_dim == heads * 8
    assert mixer.in_proj_qkv.weight.shape[0] == mixer.conv1d.groups == heads * (2 * 8 + 16)
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


class NormGateMixer(nn.Module):
    """A gated RMS norm over each head (``F.rms_norm`` of a zero head is zero), or an ``exp``
    that is 1 on a pruned channel before the out-projection (``not_zero``)."""

    def __init__(self, d: int = 32, num_heads: int = 4, head_dim: int = 8,
                 not_zero: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.not_zero = num_heads, head_dim, not_zero
        self.in_proj = nn.Linear(d, 2 * num_heads * head_dim)
        self.norm_weight = nn.Parameter(1 + 0.1 * torch.randn(head_dim))
        self.out_proj = nn.Linear(num_heads * head_dim, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, _ = h.shape
        u, g = self.in_proj(h).chunk(2, -1)
        if self.not_zero:
            return self.out_proj(torch.exp(u) * torch.sigmoid(g))
        y = F.rms_norm(u.view(b, length, self.num_heads, self.head_dim), (self.head_dim,),
                       self.norm_weight, eps=1e-6)
        return self.out_proj(y.reshape(b, length, -1) * F.silu(g))


def test_rms_norm_per_head_keeps_pruned_heads_zero() -> None:
    gm, small, warned = _cut_and_shrink(NormGateMixer, length=7)
    assert not any("channel coupling" in w for w in warned), warned
    assert small.mixer.out_proj.weight.shape[1] < 32
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


def test_a_value_not_zero_when_pruned_is_cut_through_the_out_projection_columns() -> None:
    """``exp(u)`` is 1 on a pruned channel: out_proj's input columns are gated with the
    channel's score (``tests/test_column_gate.py``), so the mixer's channels are still cut."""
    gm, small, warned = _cut_and_shrink(lambda: NormGateMixer(not_zero=True), length=7)
    assert not any("not exactly zero" in w for w in warned), warned
    assert 0 < small.mixer.out_proj.weight.shape[1] < 32
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


class ForgetGate(nn.Module):
    """A decay gate with its own head count: a per-channel bias ``dt_bias`` of
    ``heads x head_dim`` read as ``view(1, 1, heads, head_dim)`` (one dim per head and
    head channel) and a reshape by ``self.num_heads``, a head count of this submodule
    the shrink must find below the mixer."""

    def __init__(self, d: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.f_proj = nn.Linear(d, heads * head_dim, bias=False)
        self.dt_bias = nn.Parameter(0.1 * torch.randn(heads * head_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = (*h.shape[:2], self.num_heads, self.head_dim)
        g = self.f_proj(h).view(shape) + self.dt_bias.view(1, 1, self.num_heads, self.head_dim)
        return -F.softplus(g)


class GatedHeadMixer(nn.Module):
    """Heads split with sizes in ``qkv_dim``, decayed by :class:`ForgetGate`, and a
    low-rank output gate ``g_b(g_a(h))`` of rank 8: a second channel group owned by the
    same module (its rank is cut apart from the heads)."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.head_dim, self.qkv_dim = head_dim, heads * head_dim
        self.qkv = nn.Linear(d, 3 * self.qkv_dim, bias=False)
        self.forget_gate = ForgetGate(d, heads, head_dim)
        self.g_a, self.g_b = nn.Linear(d, 8, bias=False), nn.Linear(8, self.qkv_dim, bias=False)
        self.out_proj = nn.Linear(self.qkv_dim, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, _ = h.shape
        shape = (b, length, -1, self.head_dim)
        q, k, v = (t.view(shape) for t in torch.split(self.qkv(h), [self.qkv_dim] * 3, dim=-1))
        decayed = v * torch.exp(self.forget_gate(h))
        scores = torch.tril((q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)))
        y = (scores @ decayed.transpose(1, 2)).transpose(1, 2).reshape(b, length, -1)
        return self.out_proj(y * torch.sigmoid(self.g_b(torch.tanh(self.g_a(h)))))


def test_vector_parameter_split_over_two_dims_and_sub_module_head_counts_follow_the_cut() -> None:
    gm, small, warned = _cut_and_shrink(GatedHeadMixer, length=7)
    assert not any("channel coupling" in w for w in warned), warned
    mixer = small.mixer
    heads = mixer.forget_gate.num_heads
    assert 0 < heads < 4 and mixer.qkv_dim == heads * 8  # both attributes follow
    assert mixer.forget_gate.dt_bias.shape == (heads * 8,)
    assert mixer.qkv.weight.shape[0] == 3 * heads * 8
    assert 0 < mixer.g_a.weight.shape[0] < 8  # the rank, a second group of the same owner
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


class HeadGateMixer(nn.Module):
    """Causal linear attention whose output is gated per channel by ``gate_proj(h)``
    reshaped with ``view_as`` (heads split like ``view``) plus one bias per head read as
    ``gate_bias[None, None, :, None]``, added before the gate meets the heads."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj, self.gate_proj = (
            nn.Linear(d, heads * head_dim, bias=False) for _ in range(4))
        self.gate_bias = nn.Parameter(0.1 * torch.randn(heads))
        self.o_proj = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, _ = h.shape
        q, k, v = (p(h).view(b, length, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = (torch.tril(q @ k.transpose(-1, -2)) @ v).transpose(1, 2)  # (b, length, H, D)
        gate = self.gate_proj(h).view_as(y) + self.gate_bias[None, None, :, None]
        return self.o_proj((y * torch.sigmoid(gate)).reshape(b, length, -1))


def test_view_as_splits_heads_and_a_per_head_bias_before_the_gate_is_sliced() -> None:
    gm, small, warned = _cut_and_shrink(HeadGateMixer, length=7)
    assert not any("channel coupling" in w for w in warned), warned
    heads = small.mixer.gate_bias.shape[0]
    assert 0 < heads < 4 and small.mixer.gate_proj.weight.shape[0] == heads * 8
    assert small.mixer.o_proj.weight.shape[1] == heads * 8
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


class ChunkedScanMixer(nn.Module):
    """A Mamba-2 style chunked scan written with ``einsum``: ``C B^T`` over the state
    (``"bclhn,bcshn->bclsh"``, B and C one state width shared by all heads), times a
    causal decay from a per-head step ``dt`` and ``A_log``, applied to the heads
    (``"bclsh,bcshp->bclhp"``)."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8, state: int = 8,
                 chunk: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim, self.state, self.chunk = heads, head_dim, state, chunk
        self.x_proj = nn.Linear(d, heads * head_dim, bias=False)
        self.dt_proj = nn.Linear(d, heads)
        self.bc_proj = nn.Linear(d, 2 * state, bias=False)
        self.A_log = nn.Parameter(0.5 * torch.rand(heads))
        self.out_proj = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, _ = h.shape
        c, l = length // self.chunk, self.chunk
        x = self.x_proj(h).view(b, c, l, self.heads, self.head_dim)
        dt = F.softplus(self.dt_proj(h)).view(b, c, l, self.heads)
        bm, cm = self.bc_proj(h).view(b, c, l, 1, 2 * self.state).expand(
            -1, -1, -1, self.heads, -1).split(self.state, dim=-1)
        g = torch.einsum("bclhn,bcshn->bclsh", cm, bm)
        cum = (dt * -torch.exp(self.A_log)).cumsum(2)
        causal = torch.tril(torch.ones(l, l))[:, :, None]
        decay = torch.exp(cum[:, :, :, None, :] - cum[:, :, None, :, :]) * causal
        y = torch.einsum("bclsh,bcshp->bclhp", g * decay, x * dt[..., None])
        return self.out_proj(y.reshape(b, length, -1))


def test_einsum_chunked_scan_cuts_heads_and_state_with_their_projections() -> None:
    gm, small, warned = _cut_and_shrink(ChunkedScanMixer, length=8, dynamic_length=False)
    assert not any("einsum" in w for w in warned), warned
    mixer = small.mixer
    heads = mixer.A_log.shape[0]
    assert 0 < heads < 4 and mixer.heads == heads and mixer.dt_proj.weight.shape[0] == heads
    assert mixer.x_proj.weight.shape[0] == mixer.out_proj.weight.shape[1] == heads * 8
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 8, 32))


class SinkAttention(nn.Module):
    """Attention with one learned sink logit per head (``sinks.reshape(1, -1, 1, 1)
    .expand(...)`` concatenated to the scores, dropped after the softmax), the logits
    shifted by their ``max(dim=-1).values`` first."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, heads * head_dim) for _ in range(3))
        self.sinks = nn.Parameter(torch.randn(heads))
        self.o_proj = nn.Linear(heads * head_dim, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        q, k, v = (p(h).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values  # max.dim: (values, indices)
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, s, -1))


def test_attention_sinks_are_sliced_with_their_heads() -> None:
    gm, small, warned = _cut_and_shrink(SinkAttention, length=7)
    assert not any("channel coupling" in w for w in warned), warned
    heads = small.mixer.sinks.shape[0]
    assert 0 < heads < 4 and small.mixer.q_proj.weight.shape[0] == heads * 8
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


class BlockDiagonalGateMixer(nn.Module):
    """A gate per head from a block-diagonal linear (``baddbmm(b[:, None, :], x, W)``
    with ``W`` of shape ``(heads, block, block)``, as RecurrentGemma's RG-LRU computes
    its gates): a pruned head loses its block of ``W`` and ``b``."""

    def __init__(self, d: int = 32, heads: int = 4, block: int = 8) -> None:
        super().__init__()
        self.heads, self.block = heads, block
        self.x_proj = nn.Linear(d, heads * block)
        self.gate_weight = nn.Parameter(0.3 * torch.randn(heads, block, block))
        self.gate_bias = nn.Parameter(0.1 * torch.randn(heads, block))
        self.out_proj = nn.Linear(heads * block, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, _ = h.shape
        x = self.x_proj(h)
        per_head = x.reshape(b * length, self.heads, self.block).permute(1, 0, 2)
        gate = torch.baddbmm(self.gate_bias[:, None, :], per_head, self.gate_weight)
        gate = torch.sigmoid(gate.transpose(0, 1).reshape(b, length, -1))
        return self.out_proj(x * gate)


def test_block_diagonal_gate_weights_are_sliced_per_head() -> None:
    gm, small, warned = _cut_and_shrink(BlockDiagonalGateMixer, length=7)
    assert not any("baddbmm" in w for w in warned), warned
    mixer = small.mixer
    heads = mixer.gate_weight.shape[0]
    assert 0 < heads < 4 and mixer.gate_bias.shape == (heads, 8)
    assert mixer.x_proj.weight.shape[0] == mixer.out_proj.weight.shape[1] == heads * 8
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


class ChunkViewMLP(nn.Module):
    """A fused gate/up split by ``view(b, t, 2, -1)`` and ``select`` along the new dim (as
    Moshi's gating MLP does): each piece is a tensor of its own, no head; units are cut."""

    def __init__(self, d: int = 32, inner: int = 48) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * inner), nn.Linear(inner, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        both = self.fc1(h).view(b, t, 2, -1)
        return self.fc2(F.silu(both[..., 0, :]) * both[..., 1, :])


def test_a_view_whose_pieces_are_selected_splits_no_head() -> None:
    gm, small, warned = _cut_and_shrink(ChunkViewMLP, length=7)
    assert not any("channel coupling" in w for w in warned), warned
    assert [m.score_shape for m in group_masks(gm).values()] == [(48,)]  # one slot per unit
    inner = small.mixer.fc2.weight.shape[1]
    assert 0 < inner < 48 and small.mixer.fc1.weight.shape[0] == 2 * inner
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))
