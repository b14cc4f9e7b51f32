"""``report``: per-layer sparsity, parameters and MACs of any model.

Works on a transformed model (masks counted in their hard, binary form), a
folded model, or any plain ``nn.Module``. Definitions (see docs/report.md):

* one row per prunable weight that an op uses (conv, depthwise/grouped conv,
  transposed conv, linear, attention projections);
* ``nonzeros`` are counted from the tensors the model computes with:
  ``weight * mask.fold_factor()`` for masked weights, the weight itself otherwise;
* ``dense_macs``: MACs of the layer as it is shaped (one MAC = one multiply-add,
  FLOPs = 2 x MACs; bias adds are not counted);
* ``macs`` (effective): dense MACs x density (nonzeros / params) of the weight.
  A removed output or input channel zeroes a whole slice of the weight, so for
  channel pruning this is exactly the MACs of the smaller layer;
* ``other``: MACs of ops without a prunable weight (attention matmuls, einsum);
  they are counted dense in both totals.

Nothing is mutated: the model runs once in eval mode under no_grad, with
temporary hooks that are removed; training flags are restored. On a GraphModule
the one MAC counter (:mod:`sparsify_fx.passes.macs.count`) leaves each node's shapes
and MACs in ``node.meta``, as ShapeProp leaves shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sparsify_fx.capture.inputs import ModelInputs, as_model_inputs
from sparsify_fx.errors import InputError
from sparsify_fx.mask import Mask
from sparsify_fx.mask_index import masks, unwrap
from sparsify_fx.passes.macs.count import OtherOp, WeightUse, count_macs

from sparsify_fx.export.report_heads import heads_kept

Shape = tuple[int, ...]


@dataclass
class LayerRow:
    """One prunable weight. ``*_channels_kept``: channels with any nonzero weight."""

    name: str
    kind: str
    weight_shape: Shape
    params: int
    nonzeros: int
    sparsity: float
    dense_macs: int
    macs: float
    output_shape: Shape | None
    out_channels: int
    out_channels_kept: int
    in_channels: int
    in_channels_kept: int
    masked: bool
    calls: int = 1
    latency_ms: float | None = None  # estimated (latency table, kept widths)
    latency_measured_ms: float | None = None  # the op timed alone at its kept widths


@dataclass
class Report:
    """Per-layer rows, other ops and totals; see the module docstring for definitions."""

    rows: list[LayerRow]
    other: list[OtherOp]
    total_params: int
    total_nonzeros: int
    input_shapes: list[Shape]
    model_name: str = ""
    counting: str = "fx"
    notes: list[str] = field(default_factory=list)
    #: with ``report(..., latency=cost)``: estimated / dense / measured model latency (ms)
    latency: dict[str, Any] | None = None
    #: attention heads kept per attention layer: ``{module path: (kept, heads)}``
    heads: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: coupled channel models: MACs as ``shrink`` leaves them, over the layers (and
    #: attention products) whose heads, units or channels can be removed, beside the
    #: whole model's: ``{"layers", "dense_macs", "macs", "fraction", "model_fraction"}``
    blocks: dict[str, Any] | None = None

    # -- totals --------------------------------------------------------------------
    @property
    def other_macs(self) -> int:
        return sum(o.macs for o in self.other)

    @property
    def total_dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.rows) + self.other_macs

    @property
    def total_macs(self) -> float:
        return sum(r.macs for r in self.rows) + self.other_macs

    @property
    def total_dense_flops(self) -> int:
        return 2 * self.total_dense_macs

    @property
    def total_flops(self) -> float:
        return 2 * self.total_macs

    @property
    def macs_ratio(self) -> float:
        """Effective / dense MACs (1.0 for a dense model)."""
        return self.total_macs / self.total_dense_macs if self.total_dense_macs else 1.0

    @property
    def layer_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def layer_nonzeros(self) -> int:
        return sum(r.nonzeros for r in self.rows)

    @property
    def weight_sparsity(self) -> float:
        """Zero fraction over every prunable weight (all rows)."""
        return 1.0 - self.layer_nonzeros / self.layer_params if self.layer_params else 0.0

    @property
    def masked_sparsity(self) -> float | None:
        """Zero fraction over masked weights only (None when the model has no masks)."""
        rows = [r for r in self.rows if r.masked]
        total = sum(r.params for r in rows)
        return 1.0 - sum(r.nonzeros for r in rows) / total if total else None

    @property
    def param_sparsity(self) -> float:
        """Zero fraction over every parameter of the model (biases, norms included)."""
        return 1.0 - self.total_nonzeros / self.total_params if self.total_params else 0.0

    def totals(self) -> dict[str, Any]:
        return {
            "params": self.total_params, "nonzeros": self.total_nonzeros,
            "layer_params": self.layer_params, "layer_nonzeros": self.layer_nonzeros,
            "weight_sparsity": self.weight_sparsity, "masked_sparsity": self.masked_sparsity,
            "param_sparsity": self.param_sparsity, "dense_macs": self.total_dense_macs,
            "macs": self.total_macs, "other_macs": self.other_macs,
            "macs_ratio": self.macs_ratio, "dense_flops": self.total_dense_flops,
            "flops": self.total_flops,
            **({f"latency_{k}": v for k, v in self.latency.items()} if self.latency else {}),
        }

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r} in the report; names: {[r.name for r in self.rows][:5]}...")

    # -- renderings (export/report_render.py) ---------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from sparsify_fx.export.report_render import report_dict
        return report_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        from sparsify_fx.export.report_render import to_json
        return to_json(self, indent)

    def to_markdown(self) -> str:
        from sparsify_fx.export.report_render import to_markdown
        return to_markdown(self)

    def to_csv(self) -> str:
        from sparsify_fx.export.report_render import to_csv
        return to_csv(self)

    def plot(self, path: str, dpi: int = 100) -> str:
        """Write a PNG (sparsity bars + share of parameters per layer); returns ``path``."""
        from sparsify_fx.export.report_plot import plot
        return plot(self, path, dpi)

    def compare(self, after: "Report") -> "Comparison":
        """This report as *before*, ``after`` as after: a side-by-side comparison."""
        return Comparison(self, after)

    def __str__(self) -> str:
        from sparsify_fx.export.report_render import to_table
        return to_table(self)


@dataclass
class Comparison:
    """Two reports side by side, layers matched by name."""

    before: Report
    after: Report

    def to_markdown(self) -> str:
        from sparsify_fx.export.report_render import compare_markdown
        return compare_markdown(self)

    def to_dict(self) -> dict[str, Any]:
        from sparsify_fx.export.report_render import compare_dict
        return compare_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        import json
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        from sparsify_fx.export.report_render import compare_csv
        return compare_csv(self)

    def __str__(self) -> str:
        from sparsify_fx.export.report_render import compare_table
        return compare_table(self)


def _logical_params(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter by the name users know (parametrized ``original`` -> its attribute),
    excluding mask modules' own parameters; shared parameters once."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    skip: set[int] = set()
    strip = getattr(model, "logical_name_prefix", "")  # ExportedModule: "train_graph."
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Mask):
            skip.update(id(p) for p in module.parameters())
    for path, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen or id(param) in skip:
                continue
            seen.add(id(param))
            if isinstance(module, parametrize.ParametrizationList):
                host, sep, attr = path.rpartition(".parametrizations.")
                if not sep:  # parametrized parameter of the root module itself
                    host, attr = "", path.rpartition("parametrizations.")[2]
                name = f"{host}.{attr}" if host else attr
            else:
                name = f"{path}.{pname}" if path else pname
            out[name.removeprefix(strip) if strip else name] = param
    return out


def effective_weights(model: nn.Module) -> tuple[dict[str, Tensor], list[tuple[str, Mask]]]:
    """(name -> tensor the model computes with, [(name, mask)]) using hard masks."""
    params = _logical_params(model)
    by_id = {id(t): n for n, t in params.items()}
    weights: dict[str, Tensor] = {n: t.detach() for n, t in params.items()}
    pairs: list[tuple[str, Mask]] = []
    with torch.no_grad():
        for entry in masks(model):
            raw = entry.weight
            name = by_id.get(id(raw), entry.name)
            weights[name] = raw.detach() * entry.mask.fold_factor().to(raw.device, raw.dtype)
            pairs.append((name, entry.mask))
    return weights, pairs


def channel_counts(w: Tensor, kind: str, groups: int) -> tuple[int, int, int, int]:
    """(out channels, out kept, in channels, in kept): kept = any nonzero weight."""
    nz = (w != 0)
    if w.dim() < 2:
        n = int(w.shape[0]) if w.dim() else 1
        return n, int(nz.sum()), 1, 1
    nz = nz.flatten(2).any(2) if w.dim() > 2 else nz  # (dim0, dim1)
    a, b = nz.shape
    if kind == "conv_transpose":  # (C_in, C_out/groups, k...)
        per_group = nz.reshape(groups, a // groups, b).any(1)
        return groups * b, int(per_group.sum()), a, int(nz.any(1).sum())
    per_group = nz.reshape(groups, a // groups, b).any(1)  # (groups, C_in/groups)
    return a, int(nz.any(1).sum()), groups * b, int(per_group.sum())


def _inputs(example_inputs: Any, model: nn.Module) -> ModelInputs:
    inputs = as_model_inputs(example_inputs)
    if inputs is None:
        raise InputError(
            "report needs example_inputs (a tensor, a tuple of positional inputs or a dict of "
            "keyword tensors); e.g. report(model, torch.randn(1, 3, 224, 224))")
    inputs.check_against(model)
    return inputs


def report(model: nn.Module, example_inputs: Any, *, name: str = "",
           eager: bool = False, latency: Any = None, measure_latency: bool = False) -> Report:
    """Per-layer sparsity/params/MACs of ``model`` run on ``example_inputs``.

    ``model``: transformed (hard masks are used), folded or plain ``nn.Module``;
    not mutated. ``example_inputs``: a tensor, a tuple of positional inputs or a dict of
    keyword tensors (``report(gm, example_inputs=dict(tok))``); MACs scale with its batch
    size. ``eager=True`` skips the FX graph and counts aten ops
    (also the automatic fallback when the model does not trace). ``latency``: the
    :class:`~sparsify_fx.budgets.cost_model.ChannelCost` from ``channel_latency`` on the
    transformed model (the one the cut used): adds each layer's estimated ms under
    its masks' hard decisions; ``measure_latency`` also times each layer alone and the
    whole ``model`` (shrunk first if it still has masks) in onnxruntime.
    """
    model = unwrap(model)
    given = _inputs(example_inputs, model)
    weights, mask_pairs = effective_weights(model)
    count = count_macs(model, given.args, weights, mask_pairs, eager=eager,
                       kwargs=given.kwargs)  # InputError if it fails
    masked = {n for n, _ in mask_pairs}
    rows = [_row(use, weights[use.name], use.name in masked) for use in count.weights.values()]
    notes = []
    if count.method == "eager" and not eager:
        notes.append(f"fx could not trace the model ({count.trace_error}); MACs were counted "
                     "from the aten ops it dispatched")
    with torch.no_grad():
        total_nnz = sum(int(torch.count_nonzero(t)) for t in weights.values())
    out = Report(rows, list(count.other), sum(t.numel() for t in weights.values()), total_nnz,
                 given.shapes(), name or type(model).__name__, count.method, notes)
    out.heads = heads_kept(model, weights)
    out.blocks = structured_blocks(model, given.positional(model))
    if latency is not None:
        _add_latency(out, model, given.positional(model), latency, measure_latency)
    return out


def structured_blocks(model: nn.Module, inputs: tuple) -> dict[str, Any] | None:
    """MACs of the prunable blocks as shrink leaves them (see :attr:`Report.blocks`);
    None for a model without coupled channel groups. Read-only."""
    from sparsify_fx.budgets.cost_model import channel_macs
    from sparsify_fx.budgets.exact_cut import weight_costs
    from sparsify_fx.passes.channels.couple import group_masks
    if not group_masks(model):
        return None
    cost = channel_macs(model, weight_costs(model, inputs))
    keep = cost.hard_keep()
    dense = cost.layer_costs(torch.ones_like(keep))
    kept = cost.layer_costs(keep)
    names = sorted({lay.weight for lay in cost.layers
                    if bool((lay.out_slot < cost.n_slots).any() | (lay.in_slot < cost.n_slots).any())})
    block_dense = sum(dense[n] for n in names)
    block_kept = sum(kept[n] for n in names)
    return {"layers": names, "dense_macs": block_dense, "macs": block_kept,
            "fraction": block_kept / block_dense if block_dense else 1.0,
            "model_fraction": cost.hard_fraction()}


def _add_latency(rep: Report, model: nn.Module, inputs: tuple, cost: Any, measure: bool) -> None:
    """Estimated (and measured) latency per layer and in total, from the cost model."""
    from sparsify_fx.budgets.cost_model import measure_layers
    if getattr(cost, "unit", None) != "ms":
        raise InputError("report(latency=...) takes the cost from sparsify_fx.budgets.cost_model."
                         "channel_latency(model, example_inputs), not a MACs cost")
    keep = cost.hard_keep()
    est = cost.layer_costs(keep)
    measured = measure_layers(cost, keep) if measure else {}
    for r in rep.rows:
        r.latency_ms = est.get(r.name)
        r.latency_measured_ms = measured.get(r.name)
    rep.latency = {"estimated_ms": cost.cost(keep), "dense_estimated_ms": cost.dense,
                   "fraction": cost.cost(keep) / cost.dense, "remainder_ms": cost.remainder}
    if measure:
        from sparsify_fx.latency.probe import measure_model
        from sparsify_fx.passes.shrink.shrink_graph import shrink
        plain = shrink(model) if masks(model) else model
        threads = int(cost.meta.get("env", {}).get("threads", 2))
        rep.latency["measured_ms"] = measure_model(plain, inputs, threads)


def _row(use: WeightUse, w: Tensor, masked: bool) -> LayerRow:
    with torch.no_grad():
        nnz = int(torch.count_nonzero(w))
        out_c, out_k, in_c, in_k = channel_counts(w, use.kind, use.groups)
    n = w.numel()
    return LayerRow(use.name, use.kind, tuple(int(s) for s in w.shape), n, nnz,
                    1.0 - nnz / n if n else 0.0, use.dense_macs, float(use.macs),
                    use.output_shape, out_c, out_k, in_c, in_k, masked, use.calls)


__all__ = ["report", "Report", "LayerRow", "Comparison", "effective_weights", "channel_counts"]
