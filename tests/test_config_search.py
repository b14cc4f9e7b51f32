"""A block whose widths no named config rule describes (issue 34: the gated delta nets
of Qwen3.5 / Qwen3-Next, sized by ``linear_num_key_heads`` and ``linear_key_head_dim``).

The hand-written model has the pattern exactly: a per-head causal linear attention
whose fused projection is laid out per head (each head's q, k and v rows adjacent) and
reshaped with a head count the module holds under a name the shrink does not know
(``n_mix``). Its config fields ``mix_head_dim`` and ``mix_heads`` are listed width
first, and halving either builds the same projection shapes: only a reload that
computes what the shrunk model computes tells them apart. The uniform cut must shrink
the heads, set ``n_mix`` (the shrunk model runs), write ``mix_heads`` (not
``mix_head_dim``) and save a folder that reloads with equal outputs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

import sparsify_fx as sf
from sparsify_fx.errors import ShrinkError
from sparsify_fx.budgets.exact_cut import apply_budget
from sparsify_fx.passes.channels.couple import group_masks
from tests.helpers import assert_reload_parity

VOCAB = 40


class MixConfig(PreTrainedConfig):
    model_type = "sparsify_mix_search_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 32, mix_head_dim: int = 8,
                 mix_heads: int = 4, **kwargs) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.mix_head_dim, self.mix_heads = mix_head_dim, mix_heads
        super().__init__(**kwargs)


class PerHeadMixer(nn.Module):
    """``in_proj`` rows ``[q_h | k_h | v_h]`` per head; ``tril(q k^T) v`` per head."""

    def __init__(self, config: MixConfig) -> None:
        super().__init__()
        self.n_mix, self.dim = config.mix_heads, config.mix_head_dim
        self.in_proj = nn.Linear(config.hidden_size, 3 * self.n_mix * self.dim, bias=False)
        self.out_proj = nn.Linear(self.n_mix * self.dim, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        qkv = self.in_proj(h).view(b, s, self.n_mix, 3 * self.dim).transpose(1, 2)
        q, k, v = qkv.split(self.dim, dim=-1)
        y = torch.tril(q @ k.transpose(-1, -2)) @ v / s
        return self.out_proj(y.transpose(1, 2).reshape(b, s, -1))


class MixLM(PreTrainedModel):
    config_class = MixConfig

    def __init__(self, config: MixConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mixers = nn.ModuleList(PerHeadMixer(config) for _ in range(2))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for mixer in self.mixers:
            h = h + mixer(h)
        return self.lm_head(h)


def test_fields_of_an_unnamed_block_are_found_and_checked_by_a_reload(tmp_path) -> None:
    torch.manual_seed(0)
    model = MixLM(MixConfig()).eval()
    with torch.no_grad():  # HF's 0.02 init leaves the mixers' share below any tolerance
        for p in model.parameters():
            p.normal_(0, 0.5)
    x = (torch.randint(0, VOCAB, (2, 7)),)
    gm = sf.transform(model, granularity="channel", target_macs=0.6, example_inputs=x,
                      capture="export").eval()
    assert sorted(m.score_shape for m in group_masks(gm).values()) == [(4,), (4,)]  # heads
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
    apply_budget(gm, target_macs=0.6, scores=scores, uniform=True)
    kept = {int(m.hard_mask().sum()) for m in group_masks(gm).values()}
    assert len(kept) == 1 and 0 < next(iter(kept)) < 4
    heads = next(iter(kept))
    small = sf.shrink(gm).eval()
    assert all(m.n_mix == heads for m in small.mixers)  # the count attribute follows
    assert small.mixers[0].in_proj.weight.shape == (3 * heads * 8, 32)
    assert small.config.mix_heads == heads and small.config.mix_head_dim == 8
    assert model.config.mix_heads == 4  # the caller's model and config are untouched
    sf.safe_save(small, tmp_path)
    loaded = MixLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.config.mix_heads == heads
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))


def test_heads_their_own_count_field_holds_are_not_named_by_config_cannot_hold() -> None:
    """The mixer's heads are attention (``q @ k^T``) that the head-count fields the
    shrink rewrites cannot describe (the config has no ``num_attention_heads``), but
    ``mix_heads`` sizes them and their readers exactly (a linear attention's
    ``linear_num_heads``): ``config_cannot_hold`` must not name them, or the documented
    fix (``exclude=config_cannot_hold(gm)``) keeps every head whole."""
    from sparsify_fx.passes.shrink.to_source import config_cannot_hold
    torch.manual_seed(0)
    x = (torch.randint(0, VOCAB, (2, 7)),)
    gm = sf.transform(MixLM(MixConfig()).eval(), granularity="channel", target_macs=0.6,
                      example_inputs=x, capture="export").eval()
    assert sorted(m.score_shape for m in group_masks(gm).values()) == [(4,), (4,)]
    assert config_cannot_hold(gm) == []


class RatioConfig(PreTrainedConfig):
    """``intermediate_size`` recomputed from ``expand`` whenever the config is built (as
    Mamba's is): a shrunk width written into it does not survive a save."""

    model_type = "sparsify_ratio_field_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 32, expand: int = 2,
                 **kwargs) -> None:
        kwargs.pop("intermediate_size", None)
        self.vocab_size, self.hidden_size, self.expand = vocab_size, hidden_size, expand
        self.intermediate_size = int(expand * hidden_size)
        super().__init__(**kwargs)


class RatioLM(PreTrainedModel):
    config_class = RatioConfig

    def __init__(self, config: RatioConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.lm_head(h + self.down(torch.relu(self.up(h))))


def _ratio_capture(target: float) -> tuple:
    torch.manual_seed(0)
    model = RatioLM(RatioConfig()).eval()
    x = (torch.randint(0, VOCAB, (2, 7)),)
    gm = sf.transform(model, granularity="channel", target_macs=target, example_inputs=x,
                      capture="export").eval()
    [key] = group_masks(gm)
    return gm, key, {key: torch.arange(64, dtype=torch.float32)}, x


def test_a_width_recomputed_when_the_config_loads_refuses_the_save(tmp_path) -> None:
    gm, key, scores, _ = _ratio_capture(0.7)
    apply_budget(gm, target_macs=0.7, scores=scores)  # the exact cut: any count
    kept = int(group_masks(gm)[key].hard_mask().sum())
    assert 0 < kept < 64 and kept % 32  # no whole multiple of hidden: expand cannot hold it
    small = sf.shrink(gm).eval()
    assert small.up.weight.shape[0] == kept
    with pytest.raises(ShrinkError, match="intermediate_size|up.weight"):
        small.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_uniform_cut_keeps_a_width_the_ratio_field_holds(tmp_path) -> None:
    """``expand`` sizes ``expand x hidden`` units: the uniform cut keeps a multiple of
    ``hidden`` (32 of 64), the config gets ``expand = 1`` (the width recomputed from it
    at init is 32) and the saved folder reloads with equal outputs."""
    gm, key, scores, x = _ratio_capture(0.7)
    apply_budget(gm, target_macs=0.7, scores=scores, uniform=True)
    assert int(group_masks(gm)[key].hard_mask().sum()) == 32
    small = sf.shrink(gm).eval()
    assert small.up.weight.shape == (32, 32)
    assert small.config.expand == 1 and small.config.intermediate_size == 32
    sf.safe_save(small, tmp_path)
    loaded = RatioLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.config.expand == 1 and loaded.up.weight.shape == (32, 32)
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))


class BottleConfig(PreTrainedConfig):
    """A bottleneck sized by ``bottleneck_size`` whose reader's input width is another
    field, ``reader_size`` (MobileBERT's shared query/key bottleneck: ``intra_bottleneck_size``
    out, ``true_hidden_size`` in; a saved config keeps both)."""

    model_type = "sparsify_bottleneck_field_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 32, bottleneck_size: int = 16,
                 reader_size: int = 16, intermediate_size: int = 48, **kwargs) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.bottleneck_size, self.reader_size = bottleneck_size, reader_size
        self.intermediate_size = intermediate_size
        super().__init__(**kwargs)


class BottleBlock(nn.Module):
    def __init__(self, config: BottleConfig) -> None:
        super().__init__()
        self.bneck = nn.Linear(config.hidden_size, config.bottleneck_size)
        self.reader = nn.Linear(config.reader_size, config.hidden_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.reader(torch.relu(self.bneck(h)))
        return h + self.down(torch.relu(self.up(h)))


class BottleLM(PreTrainedModel):
    config_class = BottleConfig

    def __init__(self, config: BottleConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(BottleBlock(config) for _ in range(2))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(h)


def _bottle_cut(model: BottleLM, x: tuple, **options) -> nn.Module:
    gm = sf.transform(model, granularity="channel", target_macs=0.6, example_inputs=x,
                      capture="export", **options).eval()
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
    apply_budget(gm, target_macs=0.6, scores=scores, uniform=True)
    return gm


def test_a_field_whose_readers_do_not_follow_it_holds_no_group(tmp_path) -> None:
    """Halving ``bottleneck_size`` reshapes the bottleneck's producer but not its reader:
    no field holds that group, so ``config_cannot_hold`` names it (and not the MLP that
    ``intermediate_size`` holds); the uniform save is refused, and after excluding what
    it names the uniform cut saves a folder that reloads with equal outputs."""
    from sparsify_fx.passes.shrink.to_source import config_cannot_hold
    torch.manual_seed(0)
    model = BottleLM(BottleConfig()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    x = (torch.randint(0, VOCAB, (2, 7)),)
    gm = _bottle_cut(model, x)
    assert sorted(m.score_shape for m in group_masks(gm).values()) == [(16,)] * 2 + [(48,)] * 2
    with pytest.raises(ShrinkError, match="bneck|reader"):
        sf.shrink(gm).eval().save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    names = config_cannot_hold(gm)
    assert names == [f"blocks.{i}.bneck.weight" for i in range(2)]
    gm = _bottle_cut(model, x, exclude=names)
    assert [m.score_shape for m in group_masks(gm).values()] == [(48,)] * 2
    small = sf.shrink(gm).eval()
    width = small.blocks[0].up.weight.shape[0]
    assert 0 < width < 48 and small.config.intermediate_size == width
    sf.safe_save(small, tmp_path)
    loaded = BottleLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.config.intermediate_size == width and loaded.config.bottleneck_size == 16
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))
