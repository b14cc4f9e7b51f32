"""A calibrated cut reloaded into a fresh torch.export capture keeps ``at_target`` (the
eval graph shares the train graph's mask buffers and its keys are not saved; it used to
load the old-checkpoint defaults over them, and the prune job's resume of a SparseGPT run
then refused to fold: "the masks were never cut to it")."""
from __future__ import annotations

import warnings

import pytest
import torch

import sparsify_fx as sf

transformers = pytest.importorskip("transformers")


def test_calibrated_cut_survives_reload() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    kw = dict(method="sparsegpt", granularity="2:4",
              example_inputs=(torch.zeros(2, 16, dtype=torch.long),),
              dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    gm = sf.transform(model, **kw)
    sf.calibrate(gm, [(torch.randint(0, 64, (2, 16)),)])
    again = sf.transform(model, **kw)
    again.load_state_dict(gm.state_dict())
    assert all(bool(e.mask.at_target) for e in sf.masks(again))
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        want, got = gm.eval()(ids).logits, again.eval()(ids).logits
    assert not torch.equal(want, model(ids).logits)  # the cut changed the model
    assert torch.allclose(got, want, atol=1e-6)
    sf.fold(again)  # refused before the fix: "the masks were never cut to it"


def test_old_checkpoint_defaults_still_apply() -> None:
    from sparsify_fx.mask import Mask  # noqa: F401  (the class whose loader is tested)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    gm = sf.transform(net, method="magnitude", target_sparsity=0.5, capture="fx")
    state = {k: v for k, v in gm.state_dict().items()
             if not k.endswith(("at_target", "trained"))}  # written before those buffers
    fresh = sf.transform(net, method="magnitude", target_sparsity=0.5, capture="fx")
    fresh.load_state_dict(state)
    assert all(bool(e.mask.trained) for e in sf.masks(fresh))
