"""A uniform cut gives one width per config field (issue 34: Gemma4, HrmText, MiniMax,
Jamba): layers of different kinds that one Hugging Face config field sizes keep the same
count, a field that also sizes channels kept whole keeps its groups whole, and the
shrunk model's ``save_pretrained`` folder reloads with equal outputs.

The hand-written model has the pattern exactly: two kinds of attention layer sharing
``num_attention_heads`` / ``num_key_value_heads`` at different head widths (``head_dim``,
``wide_head_dim``), and two kinds of MLP (gated, plain) sharing ``intermediate_size``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

import sparsify_fx as sf
from sparsify_fx.budgets.channel_cut import uniform_plan
from sparsify_fx.budgets.cost_model import channel_macs
from sparsify_fx.budgets.exact_cut import apply_budget, weight_costs
from sparsify_fx.errors import BudgetError
from sparsify_fx.passes.channels.couple import group_masks
from tests.helpers import assert_reload_parity, gqa_attention

VOCAB = 40


class TwoKindConfig(PreTrainedConfig):
    """Widths of :class:`TwoKindLM`; ``layer_types``: ``"local"`` (attention at
    ``head_dim``, gated MLP), ``"global"`` (attention at ``wide_head_dim``, plain MLP),
    ``"mixing"`` (like local, its MLP mixing units with a running sum: kept whole)."""

    model_type = "sparsify_two_kind_test"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 32,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, head_dim: int = 8,
                 wide_head_dim: int = 16, intermediate_size: int = 48,
                 layer_types: list[str] | None = None, **kwargs) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.head_dim, self.wide_head_dim = head_dim, wide_head_dim
        self.intermediate_size = intermediate_size
        self.layer_types = list(layer_types or ["local", "global"])
        super().__init__(**kwargs)


class Attention(nn.Module):
    def __init__(self, config: TwoKindConfig, head_dim: int) -> None:
        super().__init__()
        d, self.head_dim = config.hidden_size, head_dim
        self.q_proj = nn.Linear(d, config.num_attention_heads * head_dim)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * head_dim)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * head_dim)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return gqa_attention(self, h)


class GatedMLP(nn.Module):
    def __init__(self, config: TwoKindConfig) -> None:
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, i), nn.Linear(d, i), nn.Linear(i, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class PlainMLP(nn.Module):
    def __init__(self, config: TwoKindConfig, mixing: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.mixing = mixing

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.fc1(h)
        if self.mixing:  # every unit reads the units before it: none can be removed
            u = torch.cumsum(u, -1) / u.shape[-1]
        return self.fc2(torch.nn.functional.gelu(u))


class Layer(nn.Module):
    def __init__(self, config: TwoKindConfig, kind: str) -> None:
        super().__init__()
        wide = kind == "global"
        self.self_attn = Attention(config, config.wide_head_dim if wide else config.head_dim)
        self.mlp = PlainMLP(config, mixing=kind == "mixing") if kind != "local" else GatedMLP(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(h)
        return h + self.mlp(h)


class TwoKindLM(PreTrainedModel):
    config_class = TwoKindConfig

    def __init__(self, config: TwoKindConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, kind) for kind in config.layer_types)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def _uniform_cut(layer_types: list[str], target: float, tmp_path) -> tuple:  # noqa: ANN001
    """Transform, random-score uniform cut at ``target`` MACs, shrink, save, reload."""
    torch.manual_seed(0)
    model = TwoKindLM(TwoKindConfig(layer_types=layer_types)).eval()
    x = (torch.randint(0, VOCAB, (2, 7)),)
    gm = sf.transform(model, granularity="channel", target_macs=target, example_inputs=x,
                      capture="export").eval()
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
    apply_budget(gm, target_macs=target, scores=scores, uniform=True)
    kept = {k: int(m.hard_mask().sum()) for k, m in group_masks(gm).items()}
    fraction = channel_macs(gm, weight_costs(gm, x)).hard_fraction()
    small = sf.shrink(gm).eval()
    sf.safe_save(small, tmp_path)
    loaded = TwoKindLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert_reload_parity(gm, small, loaded, x, (torch.randint(0, VOCAB, (2, 7)),))
    return gm, small, kept, fraction


def _by_owner(gm, kept: dict[str, int]) -> dict[str, int]:  # noqa: ANN001
    """Kept slots per group, keyed by the module of its first producer weight."""
    from sparsify_fx.mask_index import main_graph
    from sparsify_fx.passes.stored_analysis import channel_graph_of
    cg = channel_graph_of(main_graph(gm))
    return {cg.producers[g.producers[0]].weight.rpartition(".")[0].rpartition(".")[0]:
            kept[f"channel_group_{g.index}"] for g in cg.groups}


def test_layer_kinds_sharing_a_width_field_keep_one_width_and_the_save_reloads(tmp_path) -> None:
    """Attention at two head widths and gated / plain MLPs: different structures, one
    field each; the uniform cut meets the MACs target, gives every attention the same
    KV-group count and every MLP the same units, and the config describes the result."""
    gm, small, kept, fraction = _uniform_cut(["local", "global"], 0.5, tmp_path)
    plan = uniform_plan(gm)
    assert len(plan.classes) == 2 and not plan.whole  # two structures each, merged by field
    assert any("intermediate_size" in f for f in plan.fields.values())
    owners = _by_owner(gm, kept)
    attention = [n for k, n in owners.items() if k.endswith("self_attn")]
    mlp = [n for k, n in owners.items() if k.endswith("mlp")]
    assert len(attention) == 2 and len(set(attention)) == 1 and attention[0] < 2
    assert len(mlp) == 2 and len(set(mlp)) == 1 and mlp[0] < 48
    assert fraction <= 0.5 + 1e-9
    assert small.config.intermediate_size == mlp[0]
    assert small.config.num_key_value_heads == attention[0]
    assert small.config.num_attention_heads == 2 * attention[0]


def test_a_field_that_also_sizes_whole_channels_keeps_its_groups_whole(tmp_path) -> None:
    """A third kind whose MLP units are mixed (a running sum: kept whole) shares
    ``intermediate_size``: every MLP stays whole, the attention is cut, the cut still
    meets its MACs target and the saved folder reloads."""
    gm, small, kept, fraction = _uniform_cut(["local", "mixing"], 0.85, tmp_path)
    plan = uniform_plan(gm)
    assert any("layers.1.mlp.fc1.weight" in w for ws in plan.whole.values() for w in ws)
    owners = _by_owner(gm, kept)
    assert owners["layers.0.mlp"] == 48  # held whole by intermediate_size
    assert {n for k, n in owners.items() if k.endswith("self_attn")} == {1}
    assert fraction <= 0.85 + 1e-9
    assert small.config.intermediate_size == 48 and small.config.num_key_value_heads == 1


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(h)))


class Looped(nn.Module):
    """Block ``a`` run twice (a recurrent stack), block ``b`` once: one structure."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Block(), Block()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.a(h)))


def test_a_block_run_in_a_loop_has_the_structure_of_one_run_once() -> None:
    """Without a config: a weight called twice counts once in a group's structure, so a
    looped block and a plain one keep one width."""
    torch.manual_seed(0)
    x = (torch.randn(2, 16),)
    gm = sf.transform(Looped().eval(), granularity="channel", target_macs=0.5, example_inputs=x,
                      capture="export").eval()
    assert len(uniform_plan(gm).classes) == 1
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
    apply_budget(gm, target_macs=0.5, scores=scores, uniform=True)
    kept = {int(m.hard_mask().sum()) for m in group_masks(gm).values()}
    assert len(group_masks(gm)) == 2 and len(kept) == 1 and kept.pop() < 32


def test_experts_cut_below_their_alignment_keep_one_aligned_step_or_refuse() -> None:
    """A uniform cut that leaves experts fewer units than the grouped-matmul alignment (4
    fp32 units, what shrink pads to) keeps one whole step, so the config's width is the
    shrunk one; the shrunk model's MACs are the ones counted, within the target; a target
    one step per class cannot meet is a named BudgetError."""
    from tests.test_moe_patterns import SharedExpertMoE, _transform
    x = torch.randn(2, 8, 16)
    for target in (0.4, 0.3):
        torch.manual_seed(0)
        model = SharedExpertMoE(1).eval()
        gm, _ = _transform(model, x)
        g = torch.Generator().manual_seed(1)
        scores = {k: torch.rand(m.score_shape, generator=g) for k, m in group_masks(gm).items()}
        if target == 0.3:
            with pytest.raises(BudgetError, match="one step"):
                apply_budget(gm, target_macs=target, scores=scores, uniform=True)
            continue
        apply_budget(gm, target_macs=target, scores=scores, uniform=True)
        assert [int(m.hard_mask().sum()) for m in group_masks(gm).values()] == [4, 4]
        fraction = channel_macs(gm, weight_costs(gm, (x,))).hard_fraction()
        small = sf.shrink(gm.eval()).eval()
        assert small.down_proj.shape[2] == 4 and small.shared_up.weight.shape == (4, 16)
        dense, shrunk = sf.report(model, (x,)).total_macs, sf.report(small, (x,)).total_macs
        assert shrunk / dense == pytest.approx(fraction, rel=1e-9) and fraction <= target
