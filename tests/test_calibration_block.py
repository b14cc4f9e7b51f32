"""``sequential="block"``: one calibration pass per repeated block (``layers.i``) instead of
one per group of weights; the cut is still exact and later blocks see earlier ones pruned."""
from __future__ import annotations

import warnings

import pytest
import torch

import sparsify_fx
from sparsify_fx.baselines.calibration import block_of, calibration_steps
from sparsify_fx.baselines.layer_inputs import Group
from sparsify_fx.errors import ConfigError
from sparsify_fx.mask_index import masks

transformers = pytest.importorskip("transformers")


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


def _cut(model: torch.nn.Module, sequential: object, batches: list) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = sparsify_fx.transform(model, method="sparsegpt", granularity="2:4", capture="fx",
                                   sequential=sequential)
    entries = masks(gm)
    calls = [0]
    entries[0].mask.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    result = sparsify_fx.calibrate(gm, batches)
    return gm, result, calls[0]


def test_block_of_names() -> None:
    assert block_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert block_of("encoder.layer.10.attention.self.query.weight") == "encoder.layer.10"
    assert block_of("lm_head.weight") is None


def test_steps_by_mode() -> None:
    groups = [Group([n]) for n in ("a.0.q", "a.0.o", "a.1.q", "head", "tail")]
    assert [len(s) for s in calibration_steps(groups, True)] == [1, 1, 1, 1, 1]
    assert [len(s) for s in calibration_steps(groups, False)] == [5]
    assert [[g.names[0] for g in s] for s in calibration_steps(groups, "block")] == [
        ["a.0.q", "a.0.o"], ["a.1.q"], ["head"], ["tail"]]
    with pytest.raises(ConfigError, match="sequential must be"):
        calibration_steps(groups, "layer")


def test_block_calibration_passes_and_cut() -> None:
    model = _llama()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 64, (2, 16), generator=gen),) for _ in range(3)]
    seq, res_seq, calls_seq = _cut(model, True, batches)
    blk, res_blk, calls_blk = _cut(model, "block", batches)
    flat, _, _ = _cut(model, False, batches)
    # passes: discovery + warm-up (1 + 2 batches) + steps x 3 batches; 9 groups (4 per
    # block + lm_head) vs 3 steps (2 blocks + lm_head)
    assert len(res_seq.groups) == 9 and res_seq.groups[-1] == ["lm_head.weight"]
    assert calls_seq == 3 + 9 * 3
    assert calls_blk == 3 + 3 * 3
    for gm in (seq, blk):
        assert float(sparsify_fx.sparsity(gm)) == pytest.approx(0.5)
        for e in masks(gm):  # exactly 2 of every 4 inputs kept in every row
            keep = e.mask.hard_mask().reshape(e.mask.hard_mask().shape[0], -1, 4)
            assert torch.equal(keep.sum(-1), torch.full(keep.shape[:2], 2))
    w = {n: dict(gm.named_parameters()) for n, gm in (("seq", seq), ("blk", blk),
                                                       ("flat", flat))}
    q0 = [k for k in w["blk"] if "layers.0.self_attn.q_proj" in k][0]
    q1 = q0.replace("layers.0", "layers.1")
    # block 0's first group reads the dense input in every mode; block 1 reads block 0 pruned
    assert torch.equal(w["blk"][q0], w["seq"][q0]) and torch.equal(w["blk"][q0], w["flat"][q0])
    assert not torch.equal(w["blk"][q1], w["flat"][q1])
    ids = batches[0][0]
    assert not torch.equal(blk(ids).logits, model(ids).logits)
