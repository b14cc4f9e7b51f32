"""``transform`` (like quantize_fx.prepare_fx): trace a model and put a mask on every selected weight.

The input model is never mutated: transform works on a deep copy.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

from torch import nn

from sparsify_fx.passes.masks.find_weights import WeightSite, find_weight_sites, select_sites
from sparsify_fx.passes.channels.couple import CoupleChannels
from sparsify_fx.passes.masks.insert_masks import InsertMaskNodes
from sparsify_fx.passes.masks.parametrize_weights import ParametrizeWeights
from sparsify_fx.passes.pass_base import SparsifyPass, run_passes
from sparsify_fx.passes.stored_analysis import CountWeightMacs

from sparsify_fx.capture.capture_model import PartialTraceWarning, capture_model, check_capture_options
from sparsify_fx.capture.channel_capture import CaptureSwitch, CaptureSwitchWarning
from sparsify_fx.capture.inputs import ModelInputs, as_model_inputs
from sparsify_fx.config import SparsifyConfig, attach_config, config_of
from sparsify_fx.errors import ConfigError, InputError, SelectionError
from sparsify_fx.input_checks import check_finite_weights, resolve_layer_targets
from sparsify_fx.granularity import GRANULARITIES, parse_granularity, pattern_target
from sparsify_fx.mask import Mask
from sparsify_fx.methods import get_method, split_options


def _check_fraction(name: str, value: Any) -> None:
    if value is None:
        return
    values = value.values() if isinstance(value, dict) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {v!r}")


def _stored_inputs(inputs: ModelInputs, captured: nn.Module) -> tuple[Any, ...] | ModelInputs:
    """The example inputs as the captured model takes them positionally (what every
    reader of ``SparsifyConfig.example_inputs`` expects), else as given."""
    try:
        return inputs.positional(captured)
    except InputError:  # keyword-only inputs: kept as keywords
        return inputs


def transform(model: nn.Module, *, method: str = "cs", granularity: str = "element",
              include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
              keep_first: bool = False, keep_last: bool = False,
              leaf_modules: Sequence[type[nn.Module] | str] = (),
              concrete_args: dict[str, Any] | None = None,
              target_sparsity: float | dict[str, float] | None = None,
              target_macs: float | None = None, per_layer: bool = False,
              target_latency: float | None = None,
              example_inputs: Any = None, capture: str = "auto", dynamic_shapes: Any = None,
              **method_options: Any) -> nn.Module:
    """Trace ``model`` and insert a mask after every selected Conv/Linear weight.

    Returns a ``torch.fx.GraphModule`` (or, when only parts of the model trace,
    a copy of the model whose traceable submodules are GraphModules; a
    :class:`PartialTraceWarning` names the rest). ``model`` is not mutated.

    ``include``/``exclude``: globs over weight names or module paths.
    ``keep_first``/``keep_last``: leave the first/last prunable weight dense.
    ``target_sparsity`` (fraction of masked weights, or ``{name: fraction}``)
    and ``target_macs`` (fraction of dense MACs) are budgets the training and
    one-shot methods meet exactly; each method declares the budgets it honours
    (:attr:`MethodSpec.budgets`) and any other is refused here with ConfigError.
    ``example_inputs`` (a tensor, a tuple of them, or a dict of keyword tensors such as
    ``dict(tokenizer(texts, return_tensors="pt"))``): sample inputs; MACs budgets
    count per-weight costs on them (a traced GraphModule is counted once here, its
    per-node MACs kept in ``node.meta``; InputError if the model fails on them, or for
    a key ``forward`` does not take). Keyword inputs: the returned model takes the same
    keywords (see docs/capture.md, "Keyword inputs"); ``sparsify_config.example_inputs``
    keeps them in the returned model's positional form (:meth:`ModelInputs.positional`).
    Remaining keyword options go to the method (e.g. ``s_init``, ``rescale`` for ``"cs"``).

    ``capture``: ``"auto"`` (symbolic_trace; if it fails and ``example_inputs``
    are given, torch.export; else the partial trace), ``"fx"`` (symbolic_trace,
    whole or partial) or ``"export"`` (torch.export only; returns an
    :class:`~sparsify_fx.capture.exported_module.ExportedModule` that switches graphs
    with ``.train()``/``.eval()``). ``dynamic_shapes``: as for
    ``torch.export.export`` (for keyword inputs a dict keyed by keyword, e.g.
    ``{"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, ...}``); default: dim 0 of every
    input is dynamic. A
    :class:`~sparsify_fx.capture.export_modes.SpecializationWarning` names
    what export specialised. With ``granularity="channel"`` and ``example_inputs``,
    ``"auto"`` also tries torch.export when the torch.fx channel analysis keeps channels
    whole at ops it does not understand, and keeps the capture that keeps fewer MACs whole
    (:class:`CaptureSwitchWarning`; sparsify_fx/capture/channel_capture.py). See docs/capture.md.
    """
    call = dict(locals())  # the arguments as given: the capture switch repeats the call
    if not isinstance(model, nn.Module):
        raise InputError(
            f"transform expects a torch.nn.Module, got {type(model).__name__}; wrap plain "
            "functions in an nn.Module whose forward calls them"
        )
    spec = get_method(method)
    gran = parse_granularity(granularity)
    if gran.kind not in spec.granularities:
        allowed = ", ".join(g for g in GRANULARITIES if g in spec.granularities)
        raise ConfigError(
            f"granularity {granularity!r} is not supported by method {method!r}; use {allowed}"
        )
    target_sparsity = pattern_target(gran, target_sparsity, target_macs)
    options = split_options(spec, method_options)
    _check_fraction("target_sparsity", target_sparsity)
    for name, value in (("target_macs", target_macs), ("target_latency", target_latency)):
        if value is not None and not (isinstance(value, (int, float))
                                      and 0.0 < float(value) <= 1.0):
            raise ConfigError(f"{name} must be a fraction in (0, 1], got {value!r}")
    given = [n for n, v in (("target_sparsity", target_sparsity), ("target_macs", target_macs),
                            ("target_latency", target_latency)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give either {' or '.join(given)}, not both: one budget per model")
    inputs = as_model_inputs(example_inputs)
    if inputs is not None:
        inputs.check_against(model)
    check_capture_options(capture, inputs, dynamic_shapes)
    spec.check_budgets(target_sparsity=target_sparsity, target_macs=target_macs,
                       target_latency=target_latency, granularity=granularity,
                       per_layer=per_layer)

    original = model  # read-only: owner types are looked up here
    working = copy.deepcopy(model)
    captured = capture_model(working, capture=capture, example_inputs=inputs,
                             dynamic_shapes=dynamic_shapes, leaf_modules=leaf_modules,
                             concrete_args=concrete_args)
    if captured.path == "export":  # shrink rebuilds the source class from it (tensors shared)
        captured.model.__dict__["source_module"] = working
    root = captured.root
    sites = find_weight_sites(root, original, captured.graphs)
    chosen = select_sites(sites, include, exclude, keep_first, keep_last)
    if not chosen:
        raise SelectionError(
            f"no weight left to prune: found {len(sites)} prunable weight(s) "
            f"({', '.join(s.name for s in sites[:5])}{', ...' if len(sites) > 5 else ''}), "
            f"but include={include!r}, exclude={exclude!r}, keep_first={keep_first}, "
            f"keep_last={keep_last} removed them all. Loosen the globs."
        )
    check_finite_weights({s.name: getattr(s.host, s.attr) for s in chosen})
    target_sparsity = resolve_layer_targets(target_sparsity, [s.name for s in chosen])

    def make_mask(site: WeightSite) -> Mask:
        mask = spec.build(site.shape, granularity, site.name, options)
        mask.kind = site.kind
        return mask

    # the passes, in order (each: pass(module) -> PassResult; sparsify_fx/passes/pass_base.py)
    pipeline: list[SparsifyPass] = [InsertMaskNodes(chosen, make_mask),
                                    ParametrizeWeights(chosen, make_mask)]
    if granularity == "channel":  # coupled channels share one score vector (issue 7)
        pipeline.append(CoupleChannels(
            lambda k, name: spec.build((k,), granularity, name, options)))
    switch = CaptureSwitch(capture, captured.path, granularity, inputs, target_latency)
    with switch.holding():  # its warnings wait until the capture is chosen
        run_passes(root, pipeline)
    captured.finish()

    untraced = [str(f) for f in captured.failures]
    root = captured.model
    stored = None if inputs is None else _stored_inputs(inputs, root)
    config = SparsifyConfig(method, granularity, options, target_sparsity, target_macs,
                            per_layer, untraced, stored, target_latency)
    attach_config(root, config)
    root.train(model.training)
    if isinstance(stored, tuple):  # MACs counted once, stored on the nodes: weight_costs reads them
        CountWeightMacs(stored)(root)
    exported = switch.choose(root, transform, call, _macs_floor)
    if exported is not None:  # torch.export keeps fewer channels whole: its result instead
        return exported
    if spec.after_transform is not None:
        spec.after_transform(root, config)
    return root


def _macs_floor(model: nn.Module) -> float:
    """The MACs a cut of a coupled channel capture cannot go below (the capture switch)."""
    from sparsify_fx.budgets.channel_cut import macs_floor
    from sparsify_fx.budgets.exact_cut import weight_costs
    from sparsify_fx.mask_index import unwrap
    return macs_floor(model, weight_costs(model, config_of(unwrap(model)).example_inputs))


__all__ = ["transform", "SparsifyConfig", "PartialTraceWarning", "CaptureSwitchWarning",
           "config_of"]
