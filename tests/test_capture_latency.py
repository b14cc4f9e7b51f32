"""``target_latency`` on torch.export captures of decoders (issue 33).

A latency cost of the capture (``capture_latency``: per-structure costs of heads / KV
groups and MLP units fitted from uniformly shrunk copies timed as ONNX decoders in
onnxruntime, each file in its own process) drives the fx path's exact cut and its
measured correction (``apply_budget`` -> ``verified_cut``). Fast tests check the
refusals, the fit and that a cut runs and records what it measured (1-layer toy:
each decoder export takes ~8 s, so the fast cut makes one measured round); the slow
test asserts the measured decode latency of a mid-size Llama (hidden 512, 8 layers,
8 heads / 4 KV heads, MLP 1536) lands within 0.45-0.55 of dense for 0.5, measured
again afterwards, independently of the cut, with files in their own processes.
"""
from __future__ import annotations

import statistics
import warnings

import pytest
import torch

import sparsify_fx as sf
from sparsify_fx.errors import ConfigError
from sparsify_fx.latency import verify
from sparsify_fx.latency.capture_latency import (capture_latency, fit_shares, layer_structure,
                                                 slot_structures)
from sparsify_fx.latency.decoder_timing import DecodeStep, DecoderTimer, ForwardPass
from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks

transformers = pytest.importorskip("transformers")


def _llama(hidden: int, layers: int, heads: int, kv: int, mlp: int, vocab: int,
           seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
        use_cache=False)).eval()


def _capture(model: torch.nn.Module, vocab: int) -> torch.nn.Module:
    x = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sf.transform(model, method="magnitude", granularity="channel",
                            capture="export", example_inputs=(x,)).eval()


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return _capture(_llama(128, 1, 4, 2, 512, 64), 64)


def test_workloads_and_refusals(tiny: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match="past_length"):
        DecodeStep(past_length=0)
    with pytest.raises(ConfigError, match="sequence_length"):
        ForwardPass(sequence_length=-1)
    with pytest.raises(ConfigError, match="DecodeStep"):
        capture_latency(tiny, 128)  # type: ignore[arg-type]
    # target_latency without a stated workload is refused with the fix
    from sparsify_fx.budgets.cost_model import channel_latency
    with pytest.raises(ConfigError, match="stated workload"):
        channel_latency(tiny, (torch.zeros(1, 16, dtype=torch.long),))
    with pytest.raises(ConfigError, match="stated workload"):
        sf.apply_budget(tiny, target_latency=0.5)
    # an fx module graph is not a capture
    fx_gm = sf.transform(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                             torch.nn.Linear(8, 2)),
                         method="magnitude", granularity="channel",
                         example_inputs=torch.randn(2, 4))
    with pytest.raises(ConfigError, match="channel_latency"):
        capture_latency(fx_gm, DecodeStep())


def test_structures_of_a_llama_capture(tiny: torch.nn.Module) -> None:
    """Heads (a KV group with its query heads: head_dim channels a slot) and MLP units."""
    structures = slot_structures(tiny)
    sizes = [m.score_shape[0] for m in group_masks(tiny).values()]
    assert sorted(sizes) == [2, 512]
    assert structures.count("heads") == 2 and structures.count("units") == 512
    from sparsify_fx.budgets.exact_cut import weight_costs
    macs = sf.channel_macs(tiny, weight_costs(tiny, (torch.zeros(1, 16, dtype=torch.long),)))
    by_name = {lay.weight: layer_structure(lay, macs.n_slots, structures) for lay in macs.layers}
    assert by_name["model.layers.0.self_attn.q_proj.weight"] == "heads"
    assert by_name["model.layers.0.self_attn.o_proj.weight"] == "heads"
    assert by_name["model.layers.0.mlp.down_proj.weight"] == "units"
    assert by_name["lm_head.weight"] is None


def test_fit_shares() -> None:
    shares, rest = fit_shares({"heads": 0.9, "units": 0.7}, {"heads": 0.5, "units": 0.5})
    assert shares == pytest.approx({"heads": 0.2, "units": 0.6})
    assert rest == pytest.approx(0.2)
    # noise: a probe measured slower than dense keeps a small positive share
    shares, rest = fit_shares({"heads": 1.03, "units": 0.2}, {"heads": 0.5, "units": 0.5})
    assert shares["heads"] > 0 and rest >= 0
    assert sum(shares.values()) + rest == pytest.approx(1.0)


def _size_fractions(self: DecoderTimer, paths: list) -> list[float]:
    """A deterministic stand-in for timing: each exported file's bytes over the dense
    file's (the files are the real exports; only the clock is replaced)."""
    dense = self.dense_path.stat().st_size
    self.dense_ms.append(10.0)
    return [p.stat().st_size / dense for p in paths]


def test_target_latency_on_a_capture_cuts_measures_and_records(
        tiny: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cut runs against the fitted cost, is measured once (one round) and recorded;
    the shrunk model is smaller. The probes and the cut are exported as decoder files,
    but their 'latency' is their size over the dense file's, so the fit and the assertions
    do not depend on this machine's load (the slow test below times onnxruntime)."""
    monkeypatch.setattr(verify, "MAX_ROUNDS", 1)
    monkeypatch.setattr(DecoderTimer, "fractions", _size_fractions)
    cost = capture_latency(tiny, ForwardPass(sequence_length=64), rounds=1, runs=3)
    meta = cost.meta
    assert cost.unit == "ms" and meta["workload"] == {"kind": "forward", "sequence_length": 64,
                                                      "batch": 1}
    assert set(meta["probe_measured"]) == {"heads", "units"}
    assert all(0 < v < 1 for v in meta["probe_measured"].values())  # each probe is smaller
    assert meta["probe_macs_kept"]["units"] == pytest.approx(0.25)
    assert cost.dense == pytest.approx(meta["dense_ms"]) and meta["dense_ms"] == 10.0
    shares, rest = fit_shares(meta["probe_measured"], meta["probe_macs_kept"])
    assert meta["shares"] == pytest.approx(shares) and meta["remainder_share"] == pytest.approx(rest)
    # a target inside the cuttable share the fit found
    target = 1.0 - 0.25 * (1.0 - meta["remainder_share"])
    result = sf.apply_budget(tiny, target_latency=target, cost=cost,
                             scores=channel_l1_scores(tiny, per_weight=True))
    assert len(result.latency) == 1 and meta["verified"] == [result.latency[0].to_dict()]
    check = result.latency[0]
    assert check.aimed == pytest.approx(target) and 0 < check.measured < 1
    assert meta["measured"] == [check.measured]
    assert check.estimated <= target + 1e-9
    assert cost.hard_fraction() == pytest.approx(check.estimated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = sf.shrink(tiny)
    dense_params = sum(p.numel() for p in tiny.__dict__["source_module"].parameters())
    assert sum(p.numel() for p in small.parameters()) < dense_params


@pytest.mark.slow
def test_half_decode_latency_of_a_mid_size_llama(tmp_path) -> None:
    """target_latency=0.5 of the decode step at past length 128 on a captured Llama
    (hidden 512, 8 layers, 8 heads / 4 KV heads, MLP 1536): the measured decode latency
    lands within 0.45-0.55 of dense, in the cut's own rounds and measured again here
    (each file in its own process, 5 alternating rounds); the pruned decoder generates
    as PyTorch does (export_decoder verifies)."""
    from sparsify_fx.latency.decode_speed import compare_decode_speed
    torch.set_num_threads(2)
    model = _llama(512, 8, 8, 4, 1536, 2048)
    gm = _capture(model, 2048)
    workload = DecodeStep(past_length=128, steps=32)
    cost = capture_latency(gm, workload)
    result = sf.apply_budget(gm, target_latency=0.5, cost=cost,
                             scores=channel_l1_scores(gm, per_weight=True))
    best = verify.closest(result.latency, 0.5)
    print("rounds", [c.to_dict() for c in result.latency], "fit", cost.meta["shares"])
    assert 0.45 <= best.measured <= 0.55
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = sf.shrink(gm).eval()
    dense = sf.export_decoder(model, tmp_path / "dense.onnx", verify=False)
    pruned = sf.export_decoder(small, tmp_path / "pruned.onnx")  # greedy tokens verified
    assert pruned.checks and all(c.tokens_equal for c in pruned.checks)
    speed = compare_decode_speed({"dense": dense.path, "pruned": pruned.path}, rounds=5,
                                 threads=2, runs=3, **workload.speed_options())
    fraction = statistics.median(workload.seconds(p) / workload.seconds(d) for p, d in
                                 zip(speed.rounds["pruned"], speed.rounds["dense"]))
    print("measured again", fraction)
    assert 0.45 <= fraction <= 0.55
