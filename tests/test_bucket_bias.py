"""A per-head bias looked up from a table by relative-position bucket (issue 34, sixth
session): ``table[bucket]`` of an ``(buckets, heads)`` embedding, permuted to
``(1, heads, t, t)``, computed once and added to every layer's attention scores (MPNet,
T5-style relative attention). The table's columns follow the heads: shrink slices them
with the heads each layer keeps, and a bias shared by two layers ties their heads.

Each: capture with dynamic batch and length, L1 cut at 0.5 of the MACs, shrink into
the source class, outputs equal to the hard-masked capture at another batch and length
(after checking they follow the input); widths counted from the shrunk tensors.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from tests.helpers import assert_shrunk_parity, l1_cut_and_shrink

DYNAMIC = ({0: Dim.AUTO, 1: Dim.AUTO},)


class BucketBiasEncoder(nn.Module):
    """Two attention layers (``heads`` x ``head_dim``), each adding one relative-position
    bias ``bias.weight[bucket(j - i)]`` (``bias``: ``nn.Embedding(buckets, heads)``, read
    once by the encoder); ``table_read_twice`` also reads the table in a second lookup
    added to the embedding (then its columns meet the hidden width, not a head)."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8, buckets: int = 8,
                 layers: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim, self.buckets = heads, head_dim, buckets
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * heads * head_dim) for _ in range(layers))
        self.o = nn.ModuleList(nn.Linear(heads * head_dim, d) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                 for _ in range(layers))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.bias = nn.Embedding(buckets, heads)
        nn.init.normal_(self.bias.weight, std=2.0)  # large enough to move the softmax
        self.head = nn.Linear(d, 5)

    def position_bias(self, t: int) -> torch.Tensor:
        pos = torch.arange(t)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.buckets // 2, self.buckets // 2 - 1)
        return self.bias(rel + self.buckets // 2).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        bias = self.position_bias(t).expand(b, -1, t, t).contiguous()
        for qkv, o, mlp, norm in zip(self.qkv, self.o, self.mlp, self.norm):
            q, k, v = (z.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
                       for z in qkv(x).chunk(3, -1))
            scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
            scores.add_(bias)
            a = torch.softmax(scores, -1) @ v
            x = x + o(a.transpose(1, 2).reshape(b, t, -1))
            x = norm(x + mlp(x))
        return self.head(x)


def _heads(small: BucketBiasEncoder, layer: int) -> int:
    return small.qkv[layer].weight.shape[0] // (3 * small.head_dim)


def test_bucket_bias_columns_follow_the_heads_of_every_layer():
    torch.manual_seed(0)
    model = BucketBiasEncoder().eval()
    gm, small, caught = l1_cut_and_shrink(model, (torch.randn(2, 6, 32),), DYNAMIC)
    assert not any("varies along a channel dim" in w for w in caught)
    kept = _heads(small, 0)
    assert 0 < kept < 4  # heads were cut ...
    assert _heads(small, 1) == kept  # ... the same in both layers (one table's columns)
    assert small.bias.weight.shape == (8, kept) and small.bias.embedding_dim == kept
    assert small.o[0].weight.shape[1] == kept * 8
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))


def test_bucket_bias_kept_columns_are_the_kept_heads():
    """The sliced table holds the kept heads' columns, in order (not just any of them)."""
    torch.manual_seed(1)
    model = BucketBiasEncoder().eval()
    gm, small, _ = l1_cut_and_shrink(model, (torch.randn(2, 6, 32),), DYNAMIC)
    rows = small.qkv[0].weight[:small.qkv[0].weight.shape[0] // 3]  # the kept q rows
    full = model.qkv[0].weight[:32].reshape(4, 8, 32)
    heads = [h for h in range(4) if any(torch.equal(rows[i * 8:(i + 1) * 8], full[h])
                                        for i in range(rows.shape[0] // 8))]
    assert len(heads) == _heads(small, 0)
    torch.testing.assert_close(small.bias.weight, model.bias.weight[:, heads])


class PermutedBiasAttention(nn.Module):
    """A fused q/k/v projection without bias, laid out per head, and separate ``q_bias`` /
    ``v_bias`` vectors read as ``bias.view(1, 1, H, -1).permute(0, 2, 1, 3)`` (a per-head
    bias broadcast over positions) and added to the heads' q and v (DeBERTa); no MLP, so
    a cut to half the MACs must remove heads."""

    def __init__(self, d: int = 32, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.in_proj = nn.Linear(d, 3 * heads * head_dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(heads * head_dim))
        self.v_bias = nn.Parameter(torch.randn(heads * head_dim))
        self.o = nn.Linear(heads * head_dim, d)
        self.head = nn.Linear(d, 5)

    def per_head(self, bias: torch.Tensor) -> torch.Tensor:
        return bias[None, None].view(1, 1, self.heads, -1).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.in_proj(x).view(b, t, self.heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.chunk(3, -1)
        q, v = q + self.per_head(self.q_bias), v + self.per_head(self.v_bias)
        a = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_permuted_bias_vectors_are_sliced_with_their_heads():
    torch.manual_seed(2)
    model = PermutedBiasAttention().eval()
    gm, small, caught = l1_cut_and_shrink(model, (torch.randn(2, 6, 32),), DYNAMIC)
    assert not any("varies along a channel dim" in w for w in caught)
    rows = small.in_proj.weight.shape[0]
    assert rows < 96 and rows % 24 == 0  # whole heads cut, q, k and v together
    assert small.q_bias.shape == small.v_bias.shape == (rows // 3,)
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 32))
