"""Latency of attention heads (issue 15 on vit): nn.MultiheadAttention gives Linear ops for
its projections and one "attention" op (q k^T, softmax, attn v) timed per kept head."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import sparsify_fx as sf
from sparsify_fx.budgets.cost_model import channel_latency, slot_widths
from sparsify_fx.latency.table import OpSignature, _op_model, ort_session, ort_timer
from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
from tests.test_heads import small_swin, small_vit

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
HEADS, E, TOKENS = 4, 64, 17  # 4x4 patches + the class token


def fake_timer(sig: OpSignature, kept_out: int, kept_in: int) -> float:
    """ms = MACs x 1e-6; the attention core: 2 x heads x tokens x keys x head_dim."""
    if sig.kind == "attention":
        d = sig.out_ch // sig.groups
        return 1e-6 * sig.batch * 2 * (kept_out // d) * sig.spatial[0] * sig.spatial[1] * d
    if sig.kind == "linear":
        return 1e-6 * sig.batch * sig.spatial[0] * kept_out * kept_in
    return 1e-6 * sig.batch * kept_out * kept_in * math.prod(sig.kernel) * 16  # 4x4 outputs


@pytest.fixture
def vit() -> torch.nn.Module:
    model = small_vit()  # 2 layers, 4 heads, hidden 64, MLP 128, 32x32 images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sf.transform(model, method="fixed", granularity="channel")


def test_attention_ops_in_the_table(vit, tmp_path) -> None:
    lat = channel_latency(vit, X, cache_dir=tmp_path, timer=fake_timer,
                          model_timer=lambda ms, x: [4.0, 3.0], progress=False, verify=False)
    by_name = {lay.weight: lay for lay in lat.layers}
    site = "encoder.layers.encoder_layer_0.self_attention"
    qkv = by_name[f"{site}.in_proj_weight"].cost.signature
    assert (qkv.kind, qkv.in_ch, qkv.out_ch, qkv.spatial) == ("linear", E, 3 * E, (TOKENS,))
    out = by_name[f"{site}.out_proj.weight"].cost.signature
    assert (out.kind, out.in_ch, out.out_ch) == ("linear", E, E)
    core = by_name[f"{site}:attention_scores"].cost.signature
    assert (core.kind, core.groups, core.spatial) == ("attention", HEADS, (TOKENS, TOKENS))
    # drop one head of layer 0: its core costs 3/4, its qkv rows 3/4, out_proj's inputs 3/4
    keep = torch.ones(lat.n_slots, dtype=torch.bool)
    widths = slot_widths(vit)
    head_slots = [i for i, w in enumerate(widths.tolist()) if w == E // HEADS]
    assert len(head_slots) == 2 * HEADS  # two layers' heads, one slot each
    full = lat.layer_costs(keep)
    keep[head_slots[0]] = False
    part = lat.layer_costs(keep)
    for name in (f"{site}:attention_scores", f"{site}.in_proj_weight", f"{site}.out_proj.weight"):
        assert part[name] == pytest.approx(full[name] * 3 / 4, rel=1e-9), name
    assert part[f"{site}:attention_values"] == full[f"{site}:attention_values"] == 0.0
    assert full[f"{site}:attention_scores"] == pytest.approx(
        fake_timer(core, E, E) * lat.scale, rel=1e-9)


def test_round_to_counts_channels_so_heads_stay_whole(vit, tmp_path) -> None:
    sf.apply_budget(vit, target_sparsity=0.5, scores=channel_l1_scores(vit), round_to=8)
    widths = slot_widths(vit)
    start = 0
    for m in group_masks(vit).values():
        n = math.prod(m.score_shape)
        kept = int(m.hard_mask().sum())
        if int(widths[start]) == E // HEADS:  # a head group: any whole number of heads
            assert 1 <= kept <= HEADS
        else:  # an MLP / channel group: whole blocks of 8 channels
            assert kept == n or kept % 8 == 0, (kept, n)
        start += n


def test_attention_op_model_runs_in_onnxruntime() -> None:
    sig = OpSignature("attention", 1, E, E, HEADS, (TOKENS, TOKENS))
    model, x = _op_model(sig, 2 * E // HEADS, 2 * E // HEADS)  # two heads kept
    assert x.shape == (1, 2, TOKENS, E // HEADS)
    (y,) = ort_session(model.SerializeToString(), 1).run(None, {"x": x})
    s = x @ np.swapaxes(x, -1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(y, (p / p.sum(-1, keepdims=True)) @ x, rtol=1e-4, atol=1e-4)
    assert ort_timer(1)(sig, E, E) >= 0.0


def test_windowed_attention_is_refused(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sf.transform(small_swin().eval(), method="fixed", granularity="channel")
    with pytest.raises(sf.SparsifyError, match="MultiheadAttention"):
        channel_latency(gm, torch.randn(1, 3, 36, 36), cache_dir=tmp_path, timer=fake_timer,
                        model_timer=lambda ms, x: [4.0, 3.0], progress=False, verify=False)
