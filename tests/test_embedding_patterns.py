"""Embedding tables whose columns are cut (issue 34, fifth session).

An embedding table read by no other op, whose columns reach a linear's input columns
(RoCBert: word, shape and pronunciation embeddings concatenated, then projected to the
hidden size), is a producer of its columns: the projection's input columns are gated
with their scores, shrink slices both. A norm over all embedding units in between
(ALBERT / ConvBert factorised embeddings) or a table tied to the LM head keeps them
whole. Each: capture, L1 cut at 0.5 of the MACs, shrink into the source class, outputs
equal to the hard-masked capture at another batch and length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from sparsify_fx.mask_index import main_graph
from sparsify_fx.passes.channels.couple import channel_l1_scores
from sparsify_fx.passes.stored_analysis import channel_graph_of
from tests.helpers import assert_shrunk_parity, l1_cut_and_shrink

DYNAMIC = ({0: Dim.AUTO, 1: Dim.AUTO},)


class EmbeddingModel(nn.Module):
    """Word and shape embeddings -> (``how``) -> projection to the hidden size -> LayerNorm
    -> an MLP block -> LM head. ``how``: ``"cat"`` concatenates the two tables' columns;
    ``"norm"`` adds them and normalises over all embedding units first (factorised
    embeddings); ``"tied"`` also ties the word table to the LM head (hidden = word width)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        word = 32 if how == "tied" else 16
        self.word, self.shape = nn.Embedding(50, word), nn.Embedding(20, 24 if how != "norm" else 16)
        self.emb_norm = nn.LayerNorm(16)
        width = 16 if how == "norm" else word + 24
        self.proj = nn.Linear(width, 32)
        self.norm = nn.LayerNorm(32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 50, bias=False)
        if how == "tied":
            self.head.weight = self.word.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w, s = self.word(ids), self.shape(ids % 20)
        e = self.emb_norm(w + s) if self.how == "norm" else torch.cat([w, s], -1)
        h = self.norm(self.proj(e))
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)


def _run(how: str):
    torch.manual_seed(0)
    model = EmbeddingModel(how).eval()
    gm, small, caught = l1_cut_and_shrink(model, (torch.randint(0, 50, (2, 7)),), DYNAMIC)
    assert_shrunk_parity(gm, small, lambda: torch.randint(0, 50, (3, 5)))
    return gm, small, caught


def test_concatenated_embedding_columns_are_cut_with_the_projections_input_columns() -> None:
    gm, small, caught = _run("cat")
    assert not [c for c in caught if "Coupling" in c]
    cg = channel_graph_of(main_graph(gm))
    tables = {cg.producers[p].weight for g in cg.groups for p in g.producers}
    assert {"word.weight", "shape.weight"} <= tables
    # both tables lost columns, and the projection lost exactly those input columns
    word, shape = small.word.weight.shape[1], small.shape.weight.shape[1]
    assert word < 16 and shape < 24
    assert small.proj.weight.shape == (32, word + shape)
    assert small.word.weight.shape[0] == 50 and small.shape.weight.shape[0] == 20
    # the L1 ranking of a table's columns reads the input columns they gate (not all 0)
    scores = channel_l1_scores(gm)
    table_groups = [k for k, v in scores.items() if v.numel() in (16, 24)]
    assert table_groups and all(float(scores[k].min()) > 0 for k in table_groups)


def test_a_norm_over_all_embedding_units_keeps_the_table_whole() -> None:
    _, small, _ = _run("norm")
    assert small.word.weight.shape == (50, 16) and small.shape.weight.shape == (20, 16)
    assert small.proj.weight.shape == (32, 16)
    assert small.up.weight.shape[0] < 64  # the MLP is still cut


def test_a_table_tied_to_the_lm_head_keeps_its_columns_while_the_other_is_cut() -> None:
    _, small, _ = _run("tied")
    assert small.word.weight.shape == (50, 32) and small.head.weight.shape == (50, 32)
    assert small.shape.weight.shape[1] < 24
    assert small.proj.weight.shape == (32, 32 + small.shape.weight.shape[1])


class RotaryTableAttention(nn.Module):
    """Two attention layers whose rotary sin / cos come from an embedding table of
    positions (RoFormer's sinusoidal table): the table's columns meet every head's
    dims, so they are no unit of their own; the heads are still cut per layer."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.positions = nn.Embedding(16, self.head_dim)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(2))
        self.o = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        sin, cos = self.positions(torch.arange(s))[None, None].chunk(2, -1)
        sin, cos = torch.cat([sin, sin], -1), torch.cat([cos, cos], -1)
        for qkv, o in zip(self.qkv, self.o):
            q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2)
                       for t in qkv(x).chunk(3, -1))
            q, k = (t * cos + torch.cat([-t[..., self.head_dim // 2:],
                                         t[..., :self.head_dim // 2]], -1) * sin for t in (q, k))
            a = F.scaled_dot_product_attention(q, k, v)
            x = x + o(a.transpose(1, 2).reshape(b, s, -1))
        return self.head(x)


def test_a_table_read_as_rotary_factors_stays_untracked_and_heads_are_cut() -> None:
    torch.manual_seed(0)
    model = RotaryTableAttention().eval()
    make = lambda: torch.randn(2, 7, 32)  # noqa: E731
    gm, small, _ = l1_cut_and_shrink(model, (make(),))
    assert_shrunk_parity(gm, small, make)
    cg = channel_graph_of(main_graph(gm))
    assert "positions.weight" not in {p.weight for p in cg.producers.values()}
    assert len(cg.groups) == 2  # one per attention layer: heads not merged across layers
    assert small.positions.weight.shape == (16, 8)
    assert all(qkv.weight.shape[0] < 96 for qkv in small.qkv)


def test_excluding_the_projection_keeps_the_tables_whole() -> None:
    import warnings

    import sparsify_fx as sf
    from sparsify_fx.budgets.exact_cut import apply_budget
    torch.manual_seed(0)
    model = EmbeddingModel("cat").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(model, granularity="channel", target_macs=0.5, capture="export",
                          example_inputs=(torch.randint(0, 50, (2, 7)),), dynamic_shapes=DYNAMIC,
                          exclude=["proj"])
    apply_budget(gm, target_macs=0.9, scores=channel_l1_scores(gm))
    small = sf.shrink(gm.eval()).eval()
    assert_shrunk_parity(gm, small, lambda: torch.randint(0, 50, (3, 5)))
    assert small.word.weight.shape == (50, 16) and small.shape.weight.shape == (20, 24)
    assert small.proj.weight.shape == (32, 40)
