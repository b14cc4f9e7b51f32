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


# -- a Hugging Face model holding the pattern: the uniform save reloads -------------------
from transformers import PreTrainedConfig, PreTrainedModel  # noqa: E402

import sparsify_fx as sf  # noqa: E402
from tests.helpers import assert_reload_parity  # noqa: E402
from tests.test_ratio_fields import _randomise, _uniform_cut_shrink  # noqa: E402

VOCAB = 40


class BucketConfig(PreTrainedConfig):
    model_type = "sparsify_bucket_bias_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 32, num_attention_heads: int = 4,
                 head_dim: int = 8, intermediate_size: int = 48, num_buckets: int = 8,
                 num_hidden_layers: int = 2, **kwargs) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_attention_heads, self.head_dim = num_attention_heads, head_dim
        self.intermediate_size, self.num_buckets = intermediate_size, num_buckets
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class BucketAttention(nn.Module):
    def __init__(self, config: BucketConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        width = self.num_heads * self.head_dim
        self.q, self.k, self.v = (nn.Linear(config.hidden_size, width) for _ in range(3))
        self.o = nn.Linear(width, config.hidden_size)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = (p(h).view(b, t, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + bias, -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, -1))


class BucketLayer(nn.Module):
    def __init__(self, config: BucketConfig) -> None:
        super().__init__()
        self.attn = BucketAttention(config)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.intermediate_size), nn.ReLU(),
                                 nn.Linear(config.intermediate_size, config.hidden_size))

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(h, bias)
        return h + self.mlp(h)


class BucketLM(PreTrainedModel):
    """Token and position embeddings, layers sharing one bucket bias table (built from
    ``num_attention_heads``, outside the layers: CPM-Ant's, T5's), an LM head."""

    config_class = BucketConfig

    def __init__(self, config: BucketConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.bias = nn.Embedding(config.num_buckets, config.num_attention_heads)
        self.layers = nn.ModuleList(BucketLayer(config) for _ in range(config.num_hidden_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t)
        n = self.config.num_buckets
        bias = self.bias((pos[None, :] - pos[:, None]).clamp(-n // 2, n // 2 - 1) + n // 2)
        bias = bias.permute(2, 0, 1).unsqueeze(0)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, bias)
        return self.lm_head(h)


def test_uniform_save_of_heads_tied_by_a_shared_bucket_table_reloads(tmp_path):
    """The shared table ties the heads of both layers into one group whose weights span
    the layer list; the config search still reads each block's own weights (not the MLPs
    of every layer under ``layers``), writes ``num_attention_heads`` and the folder
    reloads with the table's kept columns."""
    torch.manual_seed(0)
    model = _randomise(BucketLM(BucketConfig()))
    gm, small, x = _uniform_cut_shrink(model, 0.5)
    heads = small.layers[0].attn.q.weight.shape[0] // 8
    assert 0 < heads < 4 and small.layers[1].attn.q.weight.shape[0] == heads * 8
    assert small.bias.weight.shape == (8, heads) and small.config.num_attention_heads == heads
    assert not small.sparsify_config_gaps
    sf.safe_save(small, tmp_path)
    loaded = BucketLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))


class PositionTableModel(nn.Module):
    """A projection to the hidden width plus an absolute position table looked up by
    ``arange(t)`` and added along the last dim (MobileBERT's embeddings, no norm after),
    then an MLP: the table's columns are the hidden width, not heads."""

    def __init__(self, d: int = 16, hidden: int = 32, positions: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(d, hidden)
        self.pos = nn.Embedding(positions, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 64), nn.ReLU(), nn.Linear(64, hidden))
        self.head = nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(h + self.mlp(h))


def test_a_position_table_along_the_hidden_width_keeps_it_whole():
    """The hidden width the table is added to stays whole and the table is not sliced,
    as before the bucket rule. In this small model the width would stay whole even
    without the last-dim rule of ``gathered_operand`` (the table makes it non-zero when
    pruned, so the MLP keeps its input whole); MobileBERT, where it did not (its save was
    refused), is that rule's check, in the family sweep."""
    from sparsify_fx.passes.channels.couple import group_masks
    torch.manual_seed(4)
    gm, small, _ = l1_cut_and_shrink(PositionTableModel().eval(), (torch.randn(2, 6, 16),),
                                     DYNAMIC)
    from sparsify_fx.mask_index import main_graph
    from sparsify_fx.passes.stored_analysis import channel_graph_of
    sites = channel_graph_of(main_graph(gm)).norms.values()
    assert not any("pos.weight" in (site.params or ()) for site in sites)  # not sliced
    assert [m.score_shape for m in group_masks(gm).values()] == [(64,)]  # the MLP alone
    assert small.pos.weight.shape == (16, 32) and small.proj.weight.shape == (32, 16)
    assert_shrunk_parity(gm, small, lambda: torch.randn(3, 9, 16))
