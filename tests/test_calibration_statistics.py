"""One calibration pass for several cuts: ``collect_statistics`` + ``calibrate(statistics=)``.

A tiny random Llama (parametrized weights: ``capture="fx"`` traces it only in parts) is cut
by Wanda and SparseGPT at 50 % and 2:4 from one pass; each cut must equal the same
method's own ``calibrate(batches)`` with ``sequential=False`` (masks and weights).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsify_fx
from sparsify_fx.baselines.calibration import collect_statistics
from sparsify_fx.errors import ConfigError

transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, tie_word_embeddings=True)).eval()


def _transform(model: nn.Module, method: str, gran: str, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsify_fx.transform(model, method=method, granularity=gran, capture="fx",
                                     target_sparsity=0.5 if gran == "element" else None,
                                     **options)


def _batches() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 96, (4, 16), generator=g),) for _ in range(3)]


def test_one_pass_cuts_like_calibrate():
    model = _llama()
    x = _batches()[0][0]
    first = _transform(model, "sparsegpt", "2:4", sequential=False)
    stats = collect_statistics(first, _batches())
    assert sparsify_fx.sparsity(first) == 0.0  # collecting cuts nothing
    assert stats.tokens["model.layers.0.self_attn.q_proj.weight"] == 3 * 4 * 16
    for method in ("wanda", "sparsegpt"):
        for gran in ("element", "2:4"):
            mine = _transform(model, method, gran, sequential=False)
            ref = _transform(model, method, gran, sequential=False)
            res = sparsify_fx.calibrate(mine, statistics=stats)
            sparsify_fx.calibrate(ref, _batches())
            assert res.sparsity == pytest.approx(0.5, abs=1e-3)
            a, b = sparsify_fx.masks(mine), sparsify_fx.masks(ref)
            assert [e.name for e in a] == [e.name for e in b]
            for ea, eb in zip(a, b):
                assert torch.equal(ea.mask.hard_mask(), eb.mask.hard_mask()), (method, ea.name)
                assert torch.allclose(ea.weight, eb.weight, atol=1e-6)
            with torch.no_grad():
                out = mine(x).logits
                assert not torch.allclose(out, model(x).logits, atol=1e-3)  # the cut acts
                assert torch.allclose(out, ref(x).logits, atol=1e-5)


def test_statistics_need_non_sequential_cut():
    model = _llama()
    stats = collect_statistics(_transform(model, "wanda", "2:4", sequential=False),
                               _batches()[:1], statistic="norms")
    with pytest.raises(ConfigError, match="sequential=False"):
        sparsify_fx.calibrate(_transform(model, "wanda", "2:4"), statistics=stats)
    with pytest.raises(ConfigError, match="cannot give 'hessian'"):
        sparsify_fx.calibrate(_transform(model, "sparsegpt", "2:4", sequential=False),
                              statistics=stats)
