"""Configs that hold the shrunk widths (issue 34, fifth session: Moshi, FalconMamba,
GPTNeoXJapanese, Mpt).

* An attention block holding its own non-persistent buffer (a rotary ``inv_freq`` per
  layer, as Moshi's): the shrunk model keeps the buffer out of its state dict, as the
  class builds it, so the head-count fields describe the block and the save reloads.
* A field that is a ratio (the module builds ``hidden_size x mlp_multiple`` units):
  the uniform cut keeps widths in the steps the field can write, the config search
  writes it, and the save reloads.
* A non-persistent buffer a width sizes but no op reads (FalconMamba's weightless norms)
  stays at its old width in the shrunk model; the reload check of searched fields takes
  it as the class builds it, as ``from_pretrained`` does.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

import sparsify_fx as sf
from sparsify_fx.errors import BudgetError, ShrinkError
from sparsify_fx.budgets.exact_cut import apply_budget
from sparsify_fx.passes.channels.couple import group_masks
from tests.helpers import assert_reload_parity
from tests.test_config_search import MixConfig, MixLM, PerHeadMixer

VOCAB = 40


def _uniform_cut_shrink(model: nn.Module, target: float, seed: int = 1) -> tuple:
    """Transform (torch.export capture), random-score uniform cut at ``target`` MACs,
    shrink: ``(capture, shrunk model, example inputs)``."""
    x = (torch.randint(0, VOCAB, (2, 7)),)
    gm = sf.transform(model, granularity="channel", target_macs=target, example_inputs=x,
                      capture="export").eval()
    g = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
    apply_budget(gm, target_macs=target, scores=scores, uniform=True)
    return gm, sf.shrink(gm).eval(), x


def _randomise(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # HF's 0.02 init leaves the blocks' share below any tolerance
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


class RotaryConfig(PreTrainedConfig):
    model_type = "sparsify_rotary_buffer_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 32, num_attention_heads: int = 4,
                 num_key_value_heads: int = 2, head_dim: int = 8, **kwargs) -> None:
        self.vocab_size, self.hidden_size, self.head_dim = vocab_size, hidden_size, head_dim
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        super().__init__(**kwargs)


class RotaryAttention(nn.Module):
    """GQA with rotary positions from a per-layer non-persistent ``inv_freq``."""

    def __init__(self, config: RotaryConfig) -> None:
        super().__init__()
        d, self.head_dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, d, bias=False)
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> torch.Tensor:
        return 1.0 / 100 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, _ = h.shape
        angle = torch.arange(s, dtype=h.dtype)[:, None] * self.inv_freq  # (s, head_dim / 2)
        cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
        q, k, v = (p(h).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = (t * cos + torch.cat([-t[..., self.head_dim // 2:], t[..., :self.head_dim // 2]],
                                    -1) * sin for t in (q, k))
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, -1) @ v
        return self.o_proj(a.transpose(1, 2).reshape(b, s, -1))


class RotaryLM(PreTrainedModel):
    config_class = RotaryConfig

    def __init__(self, config: RotaryConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RotaryAttention(config) for _ in range(2))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryAttention):  # a buffer no checkpoint holds, as HF's rotary
            with torch.no_grad():
                module.inv_freq.copy_(module.frequencies())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.lm_head(h)


def test_a_non_persistent_buffer_of_an_attention_block_stays_out_of_the_save(tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomise(RotaryLM(RotaryConfig()))
    gm, small, x = _uniform_cut_shrink(model, 0.6)
    kv = small.config.num_key_value_heads
    assert 0 < kv < 2 and small.config.num_attention_heads == 2 * kv  # heads were cut
    assert small.layers[0].q_proj.weight.shape == (2 * kv * 8, 32)
    assert not any("inv_freq" in k for k in small.state_dict())  # as the class builds it
    sf.safe_save(small, tmp_path)
    loaded = RotaryLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.config.num_key_value_heads == kv and loaded.config.head_dim == 8
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))


class MultipleConfig(PreTrainedConfig):
    """The MLP width is no field: the module builds ``int(hidden_size x mlp_multiple)``
    units (GPT-NeoX-Japanese's ``intermediate_multiple_size``)."""

    model_type = "sparsify_multiple_field_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 16, mlp_multiple: int = 4,
                 **kwargs) -> None:
        self.vocab_size, self.hidden_size, self.mlp_multiple = vocab_size, hidden_size, mlp_multiple
        super().__init__(**kwargs)


class UnitMLP(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(hidden, width), nn.Linear(width, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(h)))


class MultipleLM(PreTrainedModel):
    config_class = MultipleConfig

    def __init__(self, config: MultipleConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.mlps = nn.ModuleList(UnitMLP(config.hidden_size, self.mlp_width(config))
                                  for _ in range(2))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    @staticmethod
    def mlp_width(config: PreTrainedConfig) -> int:
        return int(config.hidden_size * config.mlp_multiple)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for mlp in self.mlps:
            h = h + mlp(h)
        return self.lm_head(h)


def test_a_uniform_cut_keeps_widths_in_steps_a_ratio_field_can_write(tmp_path) -> None:
    """``mlp_multiple = 4`` sizes 64 units: only multiples of 16 can be written, so the
    uniform cut keeps one (of 64), the config search writes ``mlp_multiple`` and the saved
    folder reloads with equal outputs; the exact cut keeps any count and its save is
    refused before writing."""
    torch.manual_seed(0)
    model = _randomise(MultipleLM(MultipleConfig()))
    gm, small, x = _uniform_cut_shrink(model, 0.6)
    kept = {int(m.hard_mask().sum()) for m in group_masks(gm).values()}
    assert len(kept) == 1 and next(iter(kept)) in (16, 32, 48)
    width = next(iter(kept))
    assert small.mlps[0].up.weight.shape == (width, 16)
    assert small.config.mlp_multiple == width // 16
    sf.safe_save(small, tmp_path / "uniform")
    loaded = MultipleLM.from_pretrained(tmp_path / "uniform", local_files_only=True).eval()
    assert loaded.mlps[1].down.weight.shape == (16, width)
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))

    exact = sf.transform(model, granularity="channel", target_macs=0.6, example_inputs=x,
                         capture="export").eval()
    g = torch.Generator().manual_seed(1)
    apply_budget(exact, target_macs=0.6,
                 scores={k: torch.rand(m.score_shape, generator=g)
                         for k, m in group_masks(exact).items()})
    assert any(int(m.hard_mask().sum()) % 16 for m in group_masks(exact).values())
    with pytest.raises(ShrinkError, match="mlps.0.up.weight"):
        sf.shrink(exact).save_pretrained(tmp_path / "exact")
    assert not (tmp_path / "exact").exists()


class BufferedMixer(PerHeadMixer):
    """A per-head mixer holding a non-persistent buffer its width sizes and nothing
    reads (FalconMamba's weightless norms): the shrink leaves it at its old width."""

    def __init__(self, config: MixConfig) -> None:
        super().__init__(config)
        self.register_buffer("unused", torch.ones(self.n_mix * self.dim), persistent=False)


class BufferedLM(MixLM):
    def __init__(self, config: MixConfig) -> None:
        super().__init__(config)
        self.mixers = nn.ModuleList(BufferedMixer(config) for _ in range(2))
        self.post_init()


def test_a_stale_unread_buffer_does_not_refuse_the_searched_fields(tmp_path) -> None:
    """The reload check of the searched fields takes a non-persistent buffer the shrink
    left at its old width as the class builds it (no checkpoint holds it)."""
    torch.manual_seed(0)
    model = _randomise(BufferedLM(MixConfig()))
    gm, small, x = _uniform_cut_shrink(model, 0.6)
    heads = small.config.mix_heads
    assert 0 < heads < 4 and small.mixers[0].in_proj.weight.shape == (3 * heads * 8, 32)
    assert small.mixers[0].unused.shape == (32,)  # not sliced: no op reads it
    sf.safe_save(small, tmp_path)
    loaded = BufferedLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.config.mix_heads == heads and loaded.mixers[1].unused.shape == (heads * 8,)
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))


def test_a_target_below_one_step_of_a_ratio_field_names_the_field() -> None:
    torch.manual_seed(0)
    model = _randomise(MultipleLM(MultipleConfig()))
    gm = sf.transform(model, granularity="channel", target_macs=0.2,
                      example_inputs=(torch.randint(0, VOCAB, (2, 7)),), capture="export").eval()
    with pytest.raises(BudgetError, match="mlp_multiple: a whole value of the field"):
        apply_budget(gm, target_macs=0.2, uniform=True)  # one step (16 units) is 0.35


class InnerConfig(PreTrainedConfig):
    """``n_inner`` unset means ``4 x hidden_size`` (no ``n_embd``: CLVP's decoder)."""

    model_type = "sparsify_unset_inner_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 16, n_inner: int | None = None,
                 **kwargs) -> None:
        self.vocab_size, self.hidden_size, self.n_inner = vocab_size, hidden_size, n_inner
        super().__init__(**kwargs)


class InnerLM(MultipleLM):
    config_class = InnerConfig

    @staticmethod
    def mlp_width(config: PreTrainedConfig) -> int:
        return config.n_inner if config.n_inner is not None else 4 * config.hidden_size


def test_an_unset_inner_width_field_holds_the_mlp_width(tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomise(InnerLM(InnerConfig()))
    gm, small, x = _uniform_cut_shrink(model, 0.6)
    width = small.mlps[0].up.weight.shape[0]
    assert 0 < width < 64 and small.config.n_inner == width
    sf.safe_save(small, tmp_path)
    loaded = InnerLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.config.n_inner == width and loaded.mlps[1].down.weight.shape == (16, width)
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))


class RoundUpConfig(PreTrainedConfig):
    """The MLP width is ``round_up(hidden_size x ffn_factor, ffn_multiple)`` (a float ratio
    and an integer round-up multiple, xLSTM's ``ffn_proj_factor``): 16 x 2.667 -> 48."""

    model_type = "sparsify_round_up_ratio_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 16, ffn_factor: float = 2.667,
                 ffn_multiple: int = 16, **kwargs) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.ffn_factor, self.ffn_multiple = ffn_factor, ffn_multiple
        super().__init__(**kwargs)


class RoundUpLM(MultipleLM):
    config_class = RoundUpConfig

    @staticmethod
    def mlp_width(config: PreTrainedConfig) -> int:
        m = config.ffn_multiple
        return int((config.hidden_size * config.ffn_factor + m - 1) // m * m)


def test_a_float_ratio_rounded_up_to_a_multiple_holds_the_uniform_width(tmp_path) -> None:
    """The float ratio is scaled by the kept fraction exactly; the round-up multiple, which
    alone reshapes nothing, is set so the ratio rounds up to the kept width; the saved
    folder reloads with equal outputs."""
    torch.manual_seed(0)
    model = _randomise(RoundUpLM(RoundUpConfig()))
    assert model.mlps[0].up.weight.shape == (48, 16)
    gm, small, x = _uniform_cut_shrink(model, 0.6)
    width = small.mlps[0].up.weight.shape[0]
    assert 0 < width < 48 and small.mlps[1].down.weight.shape == (16, width)
    assert isinstance(small.config.ffn_factor, float) and small.config.ffn_factor < 2.667
    assert RoundUpLM.mlp_width(small.config) == width
    sf.safe_save(small, tmp_path)
    loaded = RoundUpLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.mlps[1].up.weight.shape == (width, 16)
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))
