"""A latency cost model of a torch.export capture of a decoder, fitted from onnxruntime timings.

``capture_latency(gm, DecodeStep(past_length=128))`` (or ``ForwardPass(sequence_length=
128)``) returns a :class:`~sparsify_fx.budgets.cost_model.ChannelCost` in milliseconds
for a channel capture (``transform(..., granularity="channel", capture="export")``) of a
Hugging Face causal LM, so ``apply_budget(gm, target_latency=0.5, cost=cost)`` runs the
fx path's exact cut and its measured correction
(:func:`~sparsify_fx.latency.verify.verified_cut`) unchanged.

**The model.** Every layer of the capture's MACs bookkeeping
(:func:`~sparsify_fx.budgets.cost_model.channel_macs`: the Linear calls and the
attention core, as shrink leaves them) belongs to the *structure* its prunable slots
gate: ``"heads"`` (a slot of ``head_dim`` channels: a query head, or a KV group with its
query heads) or ``"units"`` (one channel: an MLP unit); a layer with no prunable slot
(embeddings, ``lm_head``) belongs to none. The latency is

    ms(keep) = remainder + sum over structures s of  a_s x M_s(keep) / M_s(dense)

with ``M_s`` the structure's MACs as shrink leaves them (so a structure's cost spreads
over its layers and slots by their MACs). ``a_s`` and ``remainder`` are fitted from
onnxruntime timings of the workload: the dense decoder and one uniformly shrunk copy
per structure (that structure's groups keep the top quarter of their slots, the others
all), each exported with ``export_decoder`` and timed in its own process in
alternating rounds (:class:`~sparsify_fx.latency.decoder_timing.DecoderTimer`):
``a_s = (1 - f_s) / (1 - M_s(probe) / M_s(dense)) x dense ms`` where ``f_s`` is the
probe's measured fraction; ``remainder`` is the rest of the dense latency (the
embedding, ``lm_head``, norms, the session's overhead). A fit that measurement noise
makes degenerate is clamped (every ``a_s`` > 0, ``remainder`` >= 0).

**The check.** ``cost.measure(gm)``: ``sparsify_fx.shrink`` of the capture (the smaller
source class), exported and timed against the dense file as above: the measured
fraction :func:`~sparsify_fx.budgets.exact_cut.apply_budget` corrects with.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from sparsify_fx.budgets.cost_model import (ChannelCost, CostLayer, MacsCost, channel_macs,
                                            slot_widths)
from sparsify_fx.errors import ConfigError
from sparsify_fx.latency.decoder_timing import (DecoderTimer, Workload, check_workload,
                                                workload_dict)
from sparsify_fx.mask_index import main_graph, unwrap

#: the fraction of its slots each probe keeps in the structure it shrinks: a quarter, so
#: the probe's speed-up stands well above the timing noise (+-10 % on a loaded 2-core VM:
#: half-width probes fitted remainders from 5 % to 50 % of the same model) and lies near
#: the widths a latency target of about half cuts to
PROBE_KEEP = 0.25
#: smallest share of the dense latency a fitted structure keeps (noise must not zero it)
MIN_SHARE = 0.02


def _capture_source(model: nn.Module) -> nn.Module:
    """The dense source module of a channel capture of a causal LM, or ConfigError."""
    from sparsify_fx.export.decoder_module import check_causal_lm
    exported = unwrap(model)
    gm = main_graph(model)
    if gm is None or gm is exported:
        raise ConfigError("capture_latency times torch.export captures of causal LMs "
                          "(transform(..., capture='export')); for a torch.fx module graph "
                          "use sparsify_fx.budgets.cost_model.channel_latency")
    source = exported.__dict__.get("source_module")
    if source is None:
        raise ConfigError("this capture does not keep its source module; re-run "
                          "sparsify_fx.transform(model, granularity='channel', "
                          "capture='export')")
    check_causal_lm(source)
    return source


def slot_structures(model: nn.Module) -> list[str]:
    """``"heads"`` or ``"units"`` for every slot (``group_masks`` order): a slot gating
    several channels of a producer is a head / KV group, one channel an MLP unit."""
    return ["heads" if int(w) > 1 else "units" for w in slot_widths(model).tolist()]


def layer_structure(layer: CostLayer, n_slots: int, structures: list[str]) -> str | None:
    """The structure a layer's prunable slots belong to (its output side first); None when
    it has none (it never shrinks)."""
    for side in (layer.out_slot, layer.in_slot):
        gated = side[side < n_slots]
        if gated.numel():
            return structures[int(gated[0])]
    return None


def _group_structure(model: nn.Module, structures: list[str]) -> dict[str, str]:
    from sparsify_fx.passes.channels.couple import group_masks
    out, start = {}, 0
    for key, mask in group_masks(model).items():
        out[key] = structures[start]
        start += math.prod(mask.score_shape)
    return out


def _probe(model: nn.Module, structure: str, kinds: Mapping[str, str]
           ) -> tuple[nn.Module, Tensor]:
    """(the source class with ``structure``'s groups at their top :data:`PROBE_KEEP` slots
    by mask ranking, every other group whole: a uniformly shrunk copy; its kept slots)."""
    import sparsify_fx as sf
    from sparsify_fx.mask import Mask
    from sparsify_fx.passes.channels.couple import group_masks, select_channels
    probe = copy.deepcopy(model)
    select_channels(probe, {k: PROBE_KEEP if s == structure else 1.0 for k, s in kinds.items()})
    for m in probe.modules():
        if isinstance(m, Mask) and hasattr(m, "at_target"):  # a probe, not a budget
            m.at_target.fill_(True)
    keep = torch.cat([m.hard_mask().reshape(-1).cpu().bool()
                      for m in group_masks(probe).values()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sf.shrink(probe).eval(), keep


def fit_shares(measured: Mapping[str, float], kept: Mapping[str, float]
               ) -> tuple[dict[str, float], float]:
    """(share of the dense latency per structure, remainder share) from each structure's
    probe: ``measured[s]`` its latency fraction, ``kept[s]`` the fraction of the
    structure's MACs it kept. Clamped: shares >= :data:`MIN_SHARE`, remainder >= 0."""
    shares = {s: max(MIN_SHARE, (1.0 - measured[s]) / max(1e-9, 1.0 - kept[s]))
              for s in measured}
    total = sum(shares.values())
    if total > 1.0:  # noise: the structures cannot cost more than the whole model
        shares = {s: v / total for s, v in shares.items()}
        total = 1.0
    return shares, 1.0 - total


def capture_latency(model: nn.Module, workload: Workload, *, threads: int = 2,
                    rounds: int = 5, runs: int = 2, round_to: int = 8,
                    verify: bool = True) -> ChannelCost:
    """The onnxruntime latency (ms) of ``workload`` (:class:`DecodeStep` or
    :class:`ForwardPass`) on a channel capture of a causal LM, as a function of its kept
    heads / KV groups / MLP units (module docstring). Exports ``1 + structures`` decoder
    files and times them (``rounds`` rounds, each file ``runs`` generations, ``threads``
    onnxruntime threads, each file in its own process). ``round_to``: channels a cut
    keeps in whole blocks of (a head counts as one block). ``verify``: the cost can
    measure a cut (``cost.measure``), so a final ``apply_budget`` against it is checked
    and corrected in onnxruntime. Only reads ``model``."""
    from sparsify_fx.budgets.exact_cut import weight_costs
    from sparsify_fx.config import config_of
    check_workload(workload)
    source = _capture_source(model)
    if int(round_to) < 1:
        raise ConfigError(f"round_to must be a positive channel count, got {round_to!r}")
    inputs = getattr(config_of(unwrap(model)), "example_inputs", None)
    if inputs is None:
        raise ConfigError("capture_latency needs the capture's example inputs: pass "
                          "example_inputs= to sparsify_fx.transform")
    start = time.perf_counter()
    macs = channel_macs(model, weight_costs(model, inputs))
    structures = slot_structures(model)
    layer_of = [layer_structure(lay, macs.n_slots, structures) for lay in macs.layers]
    present = sorted({s for s in layer_of if s is not None})
    if not present:
        raise ConfigError(f"{type(source).__name__}: the channel analysis found no head or "
                          "MLP unit to prune; nothing to budget")
    ones = torch.ones(macs.n_slots, dtype=torch.bool)

    def structure_macs(keep: Tensor) -> dict[str, float]:
        per = macs.layer_costs(keep)  # by weight name; a name may repeat (summed there)
        out = dict.fromkeys(present, 0.0)
        seen: set[str] = set()
        for lay, s in zip(macs.layers, layer_of):
            if s is not None and lay.weight not in seen:
                out[s] += per[lay.weight]
                seen.add(lay.weight)
        return out

    dense_macs = structure_macs(ones)
    kinds = _group_structure(model, structures)
    timer = DecoderTimer(source, workload, threads=threads, rounds=rounds, runs=runs)
    probes, kept = [], {}
    for s in present:
        small, probe_keep = _probe(model, s, kinds)
        kept[s] = structure_macs(probe_keep)[s] / dense_macs[s]
        probes.append(timer.export(small, f"probe-{s}"))
        del small
    measured = dict(zip(present, timer.fractions(probes)))
    for path in probes:
        path.unlink(missing_ok=True)
    shares, rest = fit_shares(measured, kept)
    dense_ms = statistics.median(timer.dense_ms)
    layers = []
    for lay, s in zip(macs.layers, layer_of):
        unit = 0.0
        if s is not None:
            unit = lay.cost.unit * shares[s] * dense_ms / dense_macs[s]  # type: ignore[union-attr]
        layers.append(CostLayer(lay.weight, lay.groups, lay.out_slot, lay.in_slot,
                                MacsCost(unit)))
    meta: dict[str, Any] = {
        "workload": workload_dict(workload), "dense_ms": dense_ms, "threads": threads,
        "rounds": rounds, "probe_measured": measured, "probe_macs_kept": kept,
        "shares": shares, "remainder_share": rest, "fit_s": time.perf_counter() - start}
    measure = None
    if verify:
        def measure(cut_model: nn.Module) -> float:
            import sparsify_fx as sf
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small = sf.shrink(cut_model).eval()
            fraction = timer.measure(small)
            meta.setdefault("measured", []).append(fraction)
            return fraction
    else:
        timer.close()  # nothing left to time
    return ChannelCost(layers, macs.group_masks, macs.n_slots, remainder=rest * dense_ms,
                       unit="ms", meta=meta, round_to=int(round_to), measure=measure)


__all__ = ["capture_latency", "fit_shares", "slot_structures", "layer_structure",
           "PROBE_KEEP"]
