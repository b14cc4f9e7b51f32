"""``plan_hf``: a one-shot L1 preset of the general structured path for Hugging Face models.

The preset is a few calls of the general path (docs/transformers.md):
``transform(model, method="magnitude", granularity="channel", capture="export",
example_inputs=...)`` reads heads, KV groups and MLP units from the ATen graph (no
attribute names), ``channel_l1_scores`` ranks them, and ``apply_budget`` cuts them to
a fraction of the *blocks'* MACs (the attention and MLP layers it can prune;
embeddings, norms and heads that must stay whole are not counted). The plan holds
that hard-masked capture; :func:`~sparsify_fx.hf.shrink.shrink_hf` returns the smaller
source class from it. For CS-learned structure, run the same path with
``method="cs"`` and train (docs/transformers.md, "Structure on any captured model").
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsify_fx.errors import ConfigError

SELECTIONS = ("uniform", "global")
STRUCTURES = ("both", "heads", "units")


@dataclass(frozen=True)
class HFPlan:
    """What :func:`plan_hf` chose, as the hard-masked capture of ``source``.

    ``model``: the torch.export capture with its channel masks frozen (it computes
    what the shrunk model computes). ``dense_macs`` / ``macs``: the blocks' MACs for
    one example batch of ``seq_len`` tokens, before and after. ``kept``: per group
    structure (slot width, slot count) -> (slots kept, slots), summed over layers."""

    model: nn.Module
    source: nn.Module
    seq_len: int
    dense_macs: float
    macs: float
    kept: dict[str, tuple[int, int]]

    @property
    def macs_ratio(self) -> float:
        return self.macs / self.dense_macs

    def summary(self) -> str:
        """``heads kept 4 / 8, units kept 128 / 256, blocks' MACs ratio 0.5000``."""
        parts = [f"{k} kept {a:,} / {b:,}" for k, (a, b) in sorted(self.kept.items())]
        return ", ".join(parts + [f"blocks' MACs ratio {self.macs_ratio:.4f}"])


def default_inputs(model: nn.Module, seq_len: int) -> tuple[torch.Tensor]:
    """One example batch from the model's config: ``input_ids`` ``(1, seq_len)`` (int64)
    for a text model, ``pixel_values`` ``(1, C, S, S)`` for an image model."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "vocab_size", None):
        g = torch.Generator().manual_seed(0)
        return (torch.randint(0, int(cfg.vocab_size), (1, seq_len), generator=g),)
    if getattr(cfg, "image_size", None) and getattr(cfg, "num_channels", None):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        return (torch.randn(1, int(cfg.num_channels), int(size), int(size)),)
    raise ConfigError(f"{type(model).__name__}: cannot build example inputs from its config "
                      "(no vocab_size, no image_size/num_channels); pass example_inputs=")


def _slot_kinds(model: nn.Module) -> dict[str, str]:
    """Group key -> ``"heads"`` when one slot gates several channels of a producer (an
    attention head or KV group: ``head_dim`` rows), else ``"units"`` (an MLP unit)."""
    from sparsify_fx.mask import SharedChannelMask
    from sparsify_fx.mask_index import masks
    from sparsify_fx.passes.channels.couple import group_masks
    ids = {id(m): k for k, m in group_masks(model).items()}
    width = dict.fromkeys(ids.values(), 1)
    for e in masks(model):
        if isinstance(e.mask, SharedChannelMask) and not e.mask.auxiliary:
            for src, _sel, slot in e.mask.source_slots():
                if slot.numel():
                    key = ids[id(src)]
                    width[key] = max(width[key], int(torch.bincount(slot).max()))
    return {k: "heads" if w > 1 else "units" for k, w in width.items()}


def plan_hf(model: nn.Module, *, target_macs: float, seq_len: int = 128,
            selection: str = "uniform", structure: str = "both",
            example_inputs: Any = None) -> HFPlan:
    """Keep the best heads / KV groups and MLP units by mean |w| so that the blocks' MACs
    are <= ``target_macs`` x dense. Read-only on ``model``.

    ``selection="uniform"``: every layer keeps the same number of heads and of units
    (``apply_budget(uniform=True)``), as one Hugging Face config can describe;
    ``"global"``: one ranking across layers. ``structure``: ``"both"``, ``"heads"``
    (units whole) or ``"units"`` (heads whole). ``example_inputs`` (default: from the
    config, see :func:`default_inputs`) set the shapes MACs are counted at. Raises
    :class:`ConfigError` for bad options or a budget the structure cannot reach."""
    import sparsify_fx as sf
    from sparsify_fx.budgets.cost_model import channel_macs
    from sparsify_fx.budgets.exact_cut import apply_budget, weight_costs
    from sparsify_fx.passes.channels.couple import channel_l1_scores, group_masks
    if selection not in SELECTIONS or structure not in STRUCTURES:
        raise ConfigError(f"selection must be one of {SELECTIONS} and structure one of "
                          f"{STRUCTURES}; got {selection!r}, {structure!r}")
    if not (isinstance(target_macs, (int, float)) and 0.0 < target_macs <= 1.0):
        raise ConfigError(f"target_macs must be a fraction in (0, 1], got {target_macs!r}")
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ConfigError(f"seq_len must be a positive int, got {seq_len!r}")
    inputs = default_inputs(model, seq_len) if example_inputs is None else example_inputs
    cfg = getattr(model, "config", None)
    cache = getattr(cfg, "use_cache", None)
    try:  # a decoder's KV cache is not a graph output: capture without (shrink_hf restores it)
        if cache:
            cfg.use_cache = False
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="torch")
            gm = sf.transform(model, method="magnitude", granularity="channel",
                              capture="export", example_inputs=inputs).eval()
    finally:
        if cache:
            cfg.use_cache = cache
    blocks = sf.report(gm, inputs).blocks
    if blocks is None:
        raise ConfigError(f"{type(model).__name__}: the channel analysis found no head or unit "
                          "it can remove (see the ChannelCouplingWarning); nothing to plan")
    dense = channel_macs(gm, weight_costs(gm, inputs)).dense
    whole = (target_macs * blocks["dense_macs"] + dense - blocks["dense_macs"]) / dense
    kinds = _slot_kinds(gm)
    scores = channel_l1_scores(gm, per_weight=True)
    if structure != "both":  # the other kind ranks first: kept whole
        scores = {k: v if kinds[k] == structure else torch.full_like(v, float("inf"))
                  for k, v in scores.items()}
    try:
        apply_budget(gm, target_macs=min(1.0, whole), scores=scores,
                     uniform=selection == "uniform")
    except ConfigError as err:
        raise ConfigError(f"target_macs={target_macs} (of the blocks' MACs) with "
                          f"structure={structure!r}: {err}") from err
    after = sf.report(gm, inputs).blocks
    kept: dict[str, tuple[int, int]] = {}
    for key, mask in group_masks(gm).items():
        a, b = kept.get(kinds[key], (0, 0))
        kept[kinds[key]] = (a + int(mask.hard_mask().sum()), b + mask.hard_mask().numel())
    return HFPlan(gm, model, seq_len, float(blocks["dense_macs"]), float(after["macs"]), kept)


__all__ = ["HFPlan", "plan_hf", "default_inputs"]
