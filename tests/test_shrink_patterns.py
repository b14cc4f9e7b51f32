"""Hand-written modules, one per shrink pattern the family sweep found (issue 34).

Each: transform with ``capture="export"`` and ``granularity="channel"``, an L1 cut at
``target_macs=0.5``, ``shrink`` into the source class, outputs equal to the hard-masked
capture at another batch (after checking the output follows the input).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

import sparsify_fx as sf
from sparsify_fx.budgets.exact_cut import apply_budget
from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
from sparsify_fx.passes.shrink.hf_config import config_cannot_hold
from tests.helpers import (assert_reload_parity, assert_shrunk_parity, gqa_attention,
                           l1_cut_and_shrink)


def _cut_and_shrink(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    gm, small, _ = l1_cut_and_shrink(model, (x,))
    return gm, small


class EmbedDimAttention(nn.Module):
    """BART-style attention: its output reshaped with ``self.embed_dim`` (an attribute no
    known width name holds), not ``-1``."""

    def __init__(self, d: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = d, num_heads, d // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, -1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(b, s, self.embed_dim))


class EmbedDimBlock(nn.Module):
    """A block whose own ``embed_dim`` is the residual width (must stay as it is)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed_dim = d
        self.self_attn = EmbedDimAttention(d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.norm(x))
        return self.head(h.reshape(-1, self.embed_dim)).reshape(*x.shape[:2], 5)


def test_an_attention_width_attribute_of_no_known_name_follows_the_kept_heads() -> None:
    torch.manual_seed(0)
    model = EmbedDimBlock().eval()
    gm, small = _cut_and_shrink(model, torch.randn(2, 6, 32))
    assert len(group_masks(gm)) == 1
    kept = small.self_attn.q_proj.out_features
    assert kept < 32 and kept % 8 == 0  # whole heads
    assert small.self_attn.embed_dim == kept == small.self_attn.num_heads * 8
    assert small.embed_dim == 32  # the residual width stays
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 32))


class HiddenOutConfig(PreTrainedConfig):
    """Widths of :class:`HiddenOutLM` (fields as Hugging Face names them)."""

    model_type = "sparsify_hidden_out_test"

    def __init__(self, vocab_size: int = 40, hidden_size: int = 32, num_attention_heads: int = 4,
                 num_key_value_heads: int = 2, head_dim: int = 8, intermediate_size: int = 48,
                 half_mlp: bool = False, pooler_hidden_size: int = 0, **kwargs) -> None:
        self.vocab_size, self.hidden_size, self.head_dim = vocab_size, hidden_size, head_dim
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.intermediate_size, self.half_mlp = intermediate_size, half_mlp
        self.pooler_hidden_size = pooler_hidden_size
        super().__init__(**kwargs)


class HiddenOutAttention(nn.Module):
    """GQA attention whose output projection is built ``hidden x hidden`` whatever the heads."""

    def __init__(self, config: HiddenOutConfig) -> None:
        super().__init__()
        d, self.head_dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, config.num_attention_heads * self.head_dim)
        self.k_proj, self.v_proj = (nn.Linear(d, config.num_key_value_heads * self.head_dim)
                                    for _ in range(2))
        self.o_proj = nn.Linear(d, d)  # in_features: hidden, not heads x head_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return gqa_attention(self, h)


class HiddenOutMLP(nn.Module):
    """``intermediate_size`` units, or half as many (``half_mlp``: the field is a multiple
    of the width)."""

    def __init__(self, config: HiddenOutConfig) -> None:
        super().__init__()
        units = config.intermediate_size // (2 if config.half_mlp else 1)
        self.up = nn.Linear(config.hidden_size, units)
        self.down = nn.Linear(units, config.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(h)))


class HiddenOutPooler(nn.Module):
    """A dense built ``p x p`` from one field (so ``p`` cannot hold its output width alone)."""

    def __init__(self, config: HiddenOutConfig) -> None:
        super().__init__()
        p = config.pooler_hidden_size
        self.dense, self.proj = nn.Linear(p, p), nn.Linear(p, config.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.dense(h)))


class HiddenOutLM(PreTrainedModel):
    """:class:`HiddenOutAttention` (its config cannot describe fewer heads) and an MLP of
    ``intermediate_size`` units (which it can)."""

    config_class = HiddenOutConfig

    def __init__(self, config: HiddenOutConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn, self.mlp = HiddenOutAttention(config), HiddenOutMLP(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.pooler = HiddenOutPooler(config) if config.pooler_hidden_size else None
        self.post_init()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = h + self.attn(h)
        h = h + self.mlp(h)
        if self.pooler is None:
            return self.lm_head(h)
        return self.lm_head(h) + self.pooler(h)


@pytest.mark.parametrize("variant", ["plain", "half_mlp", "pooler"])
def test_heads_an_output_projection_built_hidden_wide_cannot_follow_stay_whole(
        tmp_path, variant: str) -> None:
    """``config_cannot_hold`` names the attention (its config builds ``o_proj`` at
    ``hidden x hidden`` for any head count) and not the MLP (also when the MLP has
    ``intermediate_size // 2`` units); a pooler built ``p x p`` from one field is named
    too; with those kept whole, a uniform cut shrinks the MLP and the saved folder
    reloads equal."""
    torch.manual_seed(0)
    config = HiddenOutConfig(half_mlp=variant == "half_mlp",
                             pooler_hidden_size=32 if variant == "pooler" else 0)
    model = HiddenOutLM(config).eval()
    x = (torch.randint(0, 40, (2, 6)),)
    options = dict(granularity="channel", target_macs=0.85, example_inputs=x, capture="export")
    named = config_cannot_hold(sf.transform(model, **options))
    assert {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"} <= set(named)
    assert not any(n.startswith("mlp.") for n in named)
    assert ("pooler.dense.weight" in named) == (variant == "pooler")
    gm = sf.transform(model, exclude=named, **options).eval()
    apply_budget(gm, target_macs=0.85, scores=channel_l1_scores(gm), uniform=True)
    small = sf.shrink(gm).eval()
    assert small.config.intermediate_size < 48 and small.attn.q_proj.out_features == 32
    small.save_pretrained(tmp_path)
    loaded = HiddenOutLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, 40, (2, 6)),))


class LowRankGate(nn.Module):
    """A low-rank gate ``sigmoid(b(a(x))) * v(x)``; its ``num_heads`` (a count no group
    here is a multiple of) is no width of the groups the cut shrinks."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 3
        self.a, self.b = nn.Linear(16, 8), nn.Linear(8, 32)
        self.v, self.o = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(torch.sigmoid(self.b(self.a(x))) * self.v(x))


def test_a_head_count_no_kept_width_scales_to_stays_and_the_check_decides() -> None:
    torch.manual_seed(0)
    model = LowRankGate().eval()
    gm, small = _cut_and_shrink(model, torch.randn(2, 6, 16))
    assert small.a.out_features < 8 or small.v.out_features < 32
    assert small.num_heads == 3  # 3 x kept / total is no whole number: left as it is
    assert_shrunk_parity(gm, small, lambda: torch.randn(2, 6, 16))
