"""Hand-written modules for the grouped and per-head projection patterns the family sweep
found in causal LMs (issue 34, fifth session): a grouped linear (a weight viewed as
``(groups, out / groups, in)`` and applied per group by ``bmm``), a ``(K, N)`` parameter
shared by the heads (``x.view(b, t, H, K) @ P``) then a gather of relative positions.

Each: ``transform(capture="export", granularity="channel")``, an L1 cut at
``target_macs=0.5``, ``shrink`` into the source class, outputs equal to the hard-masked
capture on a new batch (after checking the output follows the input), and the width
actually cut (counted from the shrunk weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import assert_shrunk_parity, l1_cut_and_shrink


class GroupedOut(nn.Module):
    """Heads, then a grouped low-rank output: ``o_a`` (groups * rank, in / groups) viewed
    per group and applied by ``bmm``, then ``o_b`` back to the model width."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8, groups: int = 4,
                 rank: int = 16) -> None:
        super().__init__()
        self.heads, self.head_dim, self.groups = heads, head_dim, groups
        self.v = nn.Linear(d, heads * head_dim, bias=False)
        self.o_a = nn.Linear(heads * head_dim // groups, groups * rank, bias=False)
        self.o_b = nn.Linear(groups * rank, d, bias=False)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = torch.tanh(self.v(x)).reshape(b, t, self.groups, -1)
        w = self.o_a.weight.view(self.groups, -1, h.shape[-1])
        y = torch.bmm(h.reshape(-1, self.groups, h.shape[-1]).transpose(0, 1), w.transpose(1, 2))
        y = y.transpose(0, 1).reshape(b, t, -1)
        return self.head(x + self.o_b(y))


def test_grouped_linear_rows_cut_in_units_across_groups():
    torch.manual_seed(0)
    model = GroupedOut().eval()
    gm, small, caught = l1_cut_and_shrink(model, (torch.randn(2, 6, 32),))
    rows = small.o_a.weight.shape[0]
    assert rows < 64 and rows % 4 == 0  # cut, the same width in every group
    assert small.o_b.weight.shape[1] == rows
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))


class SharedRelativeBias(nn.Module):
    """Attention whose per-head relative-position bias comes from a per-head projection
    ``rel(x).view(b, t, H, K)`` times one ``(K, E)`` parameter shared by the heads, then a
    gather of each (query, key) pair's relative offset along ``E``; sinks from a linear
    concatenated to the scores."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8, k: int = 4,
                 extent: int = 16) -> None:
        super().__init__()
        self.heads, self.head_dim, self.k, self.extent = heads, head_dim, k, extent
        self.q = nn.Linear(d, heads * head_dim, bias=False)
        self.kv = nn.Linear(d, 2 * heads * head_dim, bias=False)
        self.rel = nn.Linear(d, heads * k, bias=False)
        self.proj = nn.Parameter(torch.randn(k, extent) / k ** 0.5)
        self.sink = nn.Linear(d, heads, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.kv(x).chunk(2, -1))
        rel = (self.rel(x).view(b, t, self.heads, self.k) @ self.proj).transpose(1, 2)
        pos = torch.arange(t)
        offset = (pos[:, None] - pos[None, :]).clamp(0, self.extent - 1)
        bias = rel.gather(-1, offset.expand(b, self.heads, t, t))
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias
        scores = torch.cat([scores, self.sink(x).transpose(1, 2).unsqueeze(-1)], -1)
        a = torch.softmax(scores, -1)[..., :-1] @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_per_head_projection_relative_gather_and_linear_sinks_cut_heads():
    torch.manual_seed(0)
    model = SharedRelativeBias().eval()
    gm, small, caught = l1_cut_and_shrink(model, (torch.randn(2, 6, 32),))
    assert small.q.weight.shape[0] < 32 and small.q.weight.shape[0] % 8 == 0  # whole heads cut
    assert small.rel.weight.shape[0] == small.q.weight.shape[0] // 2  # k=4 rows per head
    assert small.sink.weight.shape[0] == small.q.weight.shape[0] // 8  # one sink per head
    assert tuple(small.proj.shape) == (4, 16)  # the shared parameter is not sliced
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))


class BucketBias(nn.Module):
    """Attention with a relative-position bias whose linear is viewed ``(buckets, heads)``
    with the heads last, moved forward by ``permute``, and gathered per (query, key) bucket
    along the buckets; a causal mask ``mask[None, None].expand(b, heads, t, t)`` added."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8, buckets: int = 6) -> None:
        super().__init__()
        self.heads, self.head_dim, self.buckets = heads, head_dim, buckets
        self.qkv = nn.Linear(d, 3 * heads * head_dim)
        self.rel = nn.Linear(d, buckets * heads)
        self.o = nn.Linear(heads * head_dim, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        rel = self.rel(x).view(b, t, self.buckets, self.heads).permute(0, 3, 1, 2)
        pos = torch.arange(t)
        bucket = (pos[:, None] - pos[None, :]).clamp(0, self.buckets - 1)
        bias = rel.reshape(-1, self.buckets).gather(1, bucket.repeat(b * self.heads, 1))
        causal = torch.full((t, t), float("-inf")).triu(1)
        mask = causal[None, None].expand(b, self.heads, t, t)
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias.view(b, self.heads, t, t)
        a = torch.softmax(scores + mask, -1) @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_heads_last_bucket_gather_and_expanded_mask_cut_heads():
    torch.manual_seed(0)
    model = BucketBias().eval()
    gm, small, caught = l1_cut_and_shrink(model, (torch.randn(2, 6, 32),))
    kept = small.o.weight.shape[1] // 8
    assert 0 < kept < 4  # whole heads cut
    assert small.rel.weight.shape[0] == 6 * kept  # each kept head's buckets
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))



class ChunkMix(nn.Module):
    """A linear-attention chunk: a per-head position matrix summed over the head's
    channels (``(k_i * k_j).sum(-1)``), masked causally, applied to the values (``A @ v``);
    ``k`` and ``v`` are split into heads by one head count, so their heads go together."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.k = nn.Linear(d, heads * head_dim, bias=False)
        self.v = nn.Linear(d, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.k, self.v))
        a = (k.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1).tril()  # (b, heads, t, t)
        return self.head(x + self.o((a @ v).transpose(1, 2).reshape(b, t, -1)))


def test_sum_over_a_heads_channels_keeps_the_head():
    from sparsify_fx.mask_index import main_graph
    from sparsify_fx.passes.stored_analysis import channel_graph_of
    torch.manual_seed(0)
    gm, small, caught = l1_cut_and_shrink(ChunkMix().eval(), (torch.randn(2, 6, 32),))
    cg = channel_graph_of(main_graph(gm))
    products = [p for p in cg.producers.values() if p.kind == "attention_matmul"]
    assert products and all(bool((cg.slots(p.out_ids)[0] >= 0).all()) for p in products)
    assert small.k.weight.shape[0] == small.v.weight.shape[0] < 32  # whole heads, together
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))


class SdpaBias(nn.Module):
    """``scaled_dot_product_attention`` whose float mask is a per-head bias made from the
    input (a per-head relative-position projection, gathered by offset)."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8, extent: int = 8) -> None:
        super().__init__()
        self.heads, self.extent = heads, extent
        self.qkv = nn.Linear(d, 3 * heads * head_dim, bias=False)
        self.rel = nn.Linear(d, heads * extent, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        rel = self.rel(x).view(b, t, self.heads, self.extent).transpose(1, 2)
        pos = torch.arange(t)
        offset = (pos[:, None] - pos[None, :]).clamp(0, self.extent - 1)
        bias = rel.gather(-1, offset.expand(b, self.heads, t, t))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_sdpa_mask_carrying_heads_is_tied_to_them():
    torch.manual_seed(0)
    gm, small, caught = l1_cut_and_shrink(SdpaBias().eval(), (torch.randn(2, 6, 32),))
    kept = small.o.weight.shape[1] // 8
    assert 0 < kept < 4  # whole heads cut
    assert small.rel.weight.shape[0] == 8 * kept  # each kept head's bias rows
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))


class HeadConvAttention(nn.Module):
    """Attention whose value heads also go through a depthwise conv along positions, one
    conv channel per head (``Conv2d(H, H, (k, 1), groups=H)`` on ``(b, H, t, head_dim)``),
    added to the attention output (Nyströmformer's value conv); no MLP, so a cut to half
    the MACs must remove heads."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8, kernel: int = 5) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.k, self.v = (nn.Linear(d, heads * head_dim) for _ in range(3))
        self.conv = nn.Conv2d(heads, heads, (kernel, 1), padding=(kernel // 2, 0), groups=heads,
                              bias=False)
        self.o = nn.Linear(heads * head_dim, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ v
        a = a + self.conv(v)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_depthwise_conv_over_heads_is_cut_with_its_heads():
    torch.manual_seed(3)
    model = HeadConvAttention().eval()
    gm, small, caught = l1_cut_and_shrink(model, (torch.randn(2, 6, 32),),
                                          ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    kept = small.q.weight.shape[0] // 8
    assert 0 < kept < 4  # heads were cut
    assert small.conv.weight.shape == (kept, 1, 5, 1) and small.conv.groups == kept
    assert small.k.weight.shape[0] == small.v.weight.shape[0] == kept * 8
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))
