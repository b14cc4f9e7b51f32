"""``sparsify_fx.calibrate(gm, batches)``: the one-shot cut of a calibration-based method.

``gm = transform(model, method="wanda" | "sparsegpt", target_sparsity=0.5)`` (or
``granularity="2:4"``) leaves every mask all-ones; ``calibrate(gm, batches)`` runs the
captured model (eval mode, no grad) on the batches, collects what the method needs from
each masked weight's *input* (:mod:`sparsify_fx.baselines.layer_inputs`) and freezes the
masks to the exact target (``sparsity(gm)`` is then ``round(target * n) / n`` over the
masked weights, or the N:M pattern's ``1 - n/m``); methods that reconstruct (SparseGPT)
also write their updated weights into the model. **Mutates** ``gm``: its masks, and its
weights for SparseGPT; the user's source model is untouched.

Layers are processed in execution order (``sequential=True``, the published methods'
setting): the weights that read one input tensor (q/k/v, gate/up) form a group; each
group's statistic is collected with every earlier group already pruned, so later layers
calibrate on the pruned model's activations. ``sequential="block"``: the groups of one
repeated block (``layers.3``) share a pass (about 4x fewer passes on a Llama). Memory:
one step's statistics (SparseGPT: an ``in x in`` Hessian per group) at a time; each step
runs the batches up to its layers.

Methods plug in with :func:`register_pruner` (see ``wanda.py``, ``sparsegpt.py``).
"""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn

from sparsify_fx.baselines.layer_inputs import (Group, StopForward, check_kinds,
                                                 discover_groups, rows_of, watch_inputs)
from sparsify_fx.capture.inputs import ModelInputs
from sparsify_fx.config import config_of
from sparsify_fx.errors import ConfigError, InputError, SparsifyError
from sparsify_fx.granularity import Granularity, parse_granularity
from sparsify_fx.mask_index import MaskEntry, masks, sparsity, unwrap
from sparsify_fx.methods import available_methods, get_method

Batch = tuple[Tensor, ...] | dict[str, Tensor]


@contextlib.contextmanager
def _inference(root: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the calibration forwards; ``root``'s mode restored."""
    was_training = root.training
    root.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        root.train(was_training)


@dataclass(frozen=True)
class LayerTarget:
    """What one weight is cut to: ``prune`` weights (element granularity) or ``pattern``."""

    prune: int = 0
    pattern: Granularity | None = None


class Pruner(Protocol):
    """A calibration-based method: which statistic of the layer input it needs, and the cut.

    ``statistic``: ``"norms"`` (per input feature, ``sum_t x_tj^2``, shape ``(in,)``) or
    ``"hessian"`` (``sum_t x_t x_t^T``, shape ``(in, in)``), float64, with ``tokens`` rows.
    ``prune(weight, stat, tokens, target, options)`` gets the weight as float64
    ``(out, in)`` (a copy) and returns ``(new weight or None, keep)`` (bool ``(out, in)``).
    """

    statistic: str

    def prune(self, weight: Tensor, stat: Tensor, tokens: int, target: LayerTarget,
              options: Mapping[str, Any]) -> tuple[Tensor | None, Tensor]: ...


_PRUNERS: dict[str, Pruner] = {}


def register_pruner(method: str, pruner: Pruner) -> None:
    """Make ``calibrate`` cut ``method``'s models with ``pruner`` (replaces an earlier one)."""
    if pruner.statistic not in ("norms", "hessian"):
        raise ConfigError(f"pruner statistic must be 'norms' or 'hessian', got "
                          f"{pruner.statistic!r}")
    _PRUNERS[method] = pruner


def calibrated_methods() -> list[str]:
    available_methods()  # imports the built-in methods, which register their pruners
    return sorted(_PRUNERS)


@dataclass
class CalibrationResult:
    """What ``calibrate`` did: sparsity counted from the masks, per layer too, the groups
    in the order processed, the calibration tokens per layer and the wall time."""

    method: str
    sparsity: float
    layers: dict[str, float]
    groups: list[list[str]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def split_counts(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` split over parts of ``sizes`` in proportion (largest remainder, ties to the
    first part); the parts sum to ``total`` exactly and none exceeds its size."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    base = [total * s // whole for s in sizes]
    rest = total - sum(base)
    order = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % whole), i))
    for i in order[:rest]:
        base[i] += 1
    return base


def layer_targets(entries: Sequence[MaskEntry], cfg: Any) -> dict[str, LayerTarget]:
    """Per masked weight, its cut: the N:M pattern, or a count of weights to zero so that
    a global ``target_sparsity`` is met to one weight over all masked weights (each layer
    at that fraction) and a ``{name: fraction}`` target per layer (others stay dense)."""
    gran = parse_granularity(cfg.granularity)
    if gran.is_pattern:
        return {e.name: LayerTarget(pattern=gran) for e in entries}
    target = cfg.target_sparsity
    if target is None:
        raise ConfigError(f"method {cfg.method!r} needs a target: transform(model, "
                          f"method={cfg.method!r}, target_sparsity=0.5) or granularity='2:4'")
    sizes = [e.mask.numel() for e in entries]
    if isinstance(target, Mapping):
        counts = [round(float(target.get(e.name, 0.0)) * n) for e, n in zip(entries, sizes)]
    else:
        counts = split_counts(round(float(target) * sum(sizes)), sizes)
    return {e.name: LayerTarget(prune=c) for e, c in zip(entries, counts)}


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, Tensor):
        return f"{str(batch.dtype).replace('torch.', '')}{list(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(b) for b in batch) + ")"
    return type(batch).__name__


def normalize_batches(model: nn.Module, cfg: Any, batches: Any) -> list[Batch]:
    """The calibration batches as a list of tuples of tensors (or dicts of keyword tensors);
    InputError for an empty or non-iterable ``batches`` or a batch that does not match the
    capture (count, rank and dtype of ``transform``'s example inputs; keyword names)."""
    if isinstance(batches, (Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise InputError(
            f"calibrate expects an iterable of batches (each a tuple of input tensors, or a "
            f"dict of keyword tensors), got {type(batches).__name__}; wrap a single batch "
            "in a list: calibrate(gm, [(input_ids,)])")
    items = list(batches)
    if not items:
        raise InputError("calibrate got an empty iterable of batches: it needs inputs to "
                         "measure the layers on, e.g. 128 training sequences as "
                         "[(ids[i:i + 8],) for i in range(0, 128, 8)]")
    example = cfg.example_inputs  # the captured model's positional form (transform)
    if isinstance(example, ModelInputs):  # kept as keywords: only names are checked
        example = None if example.keywords else example.args
    sig = inspect.signature(model.forward)
    free = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    out: list[Batch] = []
    for i, b in enumerate(items):
        b = (b,) if isinstance(b, Tensor) else b
        if isinstance(b, Mapping):
            bad = [k for k, v in b.items() if not isinstance(v, Tensor)
                   or (not free and k not in sig.parameters)]
            if bad:
                raise InputError(
                    f"calibration batch {i} {_describe(b)}: keyword {bad[0]!r} is not a tensor "
                    f"input of the captured model; it takes {', '.join(sig.parameters)}")
            bound = sig.bind_partial(**b)
            if bound.kwargs:  # keywords a positional call cannot express: pass them as such
                out.append(dict(b))
                continue
            b = bound.args  # the captured graphs take keyword inputs positionally too
        if not isinstance(b, (tuple, list)) or not all(isinstance(t, Tensor) for t in b):
            raise InputError(f"calibration batch {i} is {_describe(b)}; each batch must be a "
                             "tuple of tensors (as transform's example_inputs) or a dict of "
                             "keyword tensors")
        b = tuple(b)
        if example is not None:
            want = _describe(tuple(example))
            if len(b) != len(example) or any(
                    t.dim() != e.dim() or t.dtype != e.dtype for t, e in zip(b, example)):
                raise InputError(
                    f"calibration batch {i} {_describe(b)} does not match the capture: "
                    f"transform was given example_inputs {want} (same count, rank and dtype "
                    "needed; batch and dynamic dims may differ)")
        out.append(b)
    return out


def _run(model: nn.Module, batch: Batch, index: int) -> None:
    try:
        if isinstance(batch, dict):
            model(**batch)
        else:
            model(*batch)
    except (StopForward, SparsifyError):
        raise
    except Exception as err:  # the captured graph refused these inputs
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise InputError(
            f"calibration batch {index} {_describe(batch)} does not run through the captured "
            f"model ({type(err).__name__}: {first}); pass batches shaped like transform's "
            "example_inputs (static dims as captured, e.g. the same sequence length)") from err


class _Stats:
    """Running sums of one group's input statistic (float64)."""

    def __init__(self, group: Group, statistic: str) -> None:
        self.group, self.statistic = group, statistic
        w = group.width
        self.sum = torch.zeros((w, w) if statistic == "hessian" else (w,), dtype=torch.float64)
        self.tokens = 0

    def add(self, name: str, x: Tensor) -> None:
        if name != self.group.names[0]:
            return  # the group's weights read the same tensor: count it once
        if self.statistic == "hessian":  # one batch's product in float32, summed in float64
            rows = rows_of(x, self.group.width, name, torch.float32)
            self.sum.add_((rows.t() @ rows).to(torch.float64))
        else:
            rows = rows_of(x, self.group.width, name)
            self.sum.add_(rows.pow(2).sum(0))
        self.tokens += rows.shape[0]


def _collect(model: nn.Module, entries: Sequence[MaskEntry], groups: Sequence[Group],
             batches: Sequence[Batch], statistic: str) -> list[_Stats]:
    stats = [_Stats(g, statistic) for g in groups]
    by_name = {n: s for s in stats for n in s.group.names}
    watched = [e for e in entries if e.name in by_name]
    needed = sum(s.group.uses for s in stats)
    for i, batch in enumerate(batches):
        seen = [0]

        def on_input(name: str, x: Tensor) -> None:
            stat = by_name.get(name)
            if stat is None:
                return
            stat.add(name, x)
            if name == stat.group.names[0]:
                seen[0] += 1
                if seen[0] >= needed:
                    raise StopForward

        with watch_inputs(watched, on_input):
            try:
                _run(model, batch, i)
            except StopForward:
                pass
    return stats


@dataclass
class LayerStatistics:
    """Every masked weight's input statistic from one pass over calibration batches
    (:func:`collect_statistics`): ``sums[name]`` (float64; the weights of one group share
    one tensor) over ``tokens[name]`` rows. A Hessian also serves ``"norms"`` methods
    (Wanda's ``sum_t x_tj^2`` is its diagonal), so one pass can cut Wanda and SparseGPT
    models at any target."""

    statistic: str
    sums: dict[str, Tensor]
    tokens: dict[str, int]
    groups: list[list[str]]
    seconds: float = 0.0

    def for_pruner(self, name: str, statistic: str) -> tuple[Tensor, int]:
        """``(sum, tokens)`` of weight ``name`` as a pruner reads it."""
        if name not in self.sums:
            raise ConfigError(f"the calibration statistics hold no input of {name}; collect "
                              "them on a model transformed with the same include/exclude")
        stat = self.sums[name]
        if statistic == self.statistic:
            return stat, self.tokens[name]
        if statistic == "norms" and self.statistic == "hessian":
            return torch.diagonal(stat).clone(), self.tokens[name]
        raise ConfigError(f"statistics of kind {self.statistic!r} cannot give {statistic!r}; "
                          "collect_statistics(model, batches, statistic='hessian') serves both")


def collect_statistics(model: nn.Module, batches: Iterable[Any],
                       statistic: str = "hessian") -> LayerStatistics:
    """One pass of ``batches`` through ``model`` (a ``wanda`` / ``sparsegpt`` transform,
    eval mode, no grad, mode restored): every masked weight's input statistic, taken from
    the model as it is (no cut, nothing mutated). Pass the result to
    ``calibrate(other, statistics=...)`` of models transformed from the same source with
    ``sequential=False``, to cut several methods or targets from one pass."""
    if statistic not in ("norms", "hessian"):
        raise ConfigError(f"statistic must be 'norms' or 'hessian', got {statistic!r}")
    root = unwrap(model)
    cfg = config_of(root)
    if cfg is None:
        raise InputError("collect_statistics needs a model returned by sparsify_fx.transform")
    entries = [e for e in masks(root) if not e.mask.auxiliary]
    check_kinds(entries, cfg.method)
    items = normalize_batches(root, cfg, batches)
    start = time.perf_counter()
    with _inference(root):
        groups = discover_groups(entries, lambda: _run(root, items[0], 0))
        stats = _collect(root, entries, groups, items, statistic)
    sums = {n: st.sum for st in stats for n in st.group.names}
    tokens = {n: st.tokens for st in stats for n in st.group.names}
    return LayerStatistics(statistic, sums, tokens, [g.names for g in groups],
                           time.perf_counter() - start)


@torch.no_grad()
def _cut(entry: MaskEntry, stat: Tensor, tokens: int, target: LayerTarget, pruner: Pruner,
         options: Mapping[str, Any]) -> None:
    weight = entry.weight
    matmul = entry.kind == "matmul"
    canon = (weight.t() if matmul else weight).detach().to(torch.float64).contiguous()
    new, keep = pruner.prune(canon, stat, tokens, target, options)
    if new is not None:
        new = torch.where(keep, new, torch.zeros_like(new))
        weight.copy_((new.t() if matmul else new).to(weight.dtype))
    entry.mask.freeze(keep.t() if matmul else keep)
    entry.mask.at_target.fill_(True)


def block_of(name: str) -> str | None:
    """The repeated block a weight name lies in: its path up to the first integer part
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``); None outside any."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def calibration_steps(groups: Sequence[Group], sequential: Any) -> list[list[Group]]:
    """The groups cut together after one collection pass. ``True``: one group per pass
    (each calibrates on every earlier group pruned; a pass re-runs the batches up to that
    group, so a model with ``G`` groups costs about ``G / 2`` full forwards); ``"block"``:
    the consecutive groups of one repeated block (:func:`block_of`) share a pass (they see
    the block's input with every earlier block pruned, as the reference code's per-block
    loop; about ``blocks / 2`` forwards); ``False``: one pass over the unpruned model."""
    if sequential is False:
        return [list(groups)]
    if sequential is True:
        return [[g] for g in groups]
    if sequential != "block":
        raise ConfigError(f"option sequential must be True, False or 'block', got "
                          f"{sequential!r}")
    steps: list[list[Group]] = []
    last: str | None = None
    for g in groups:
        key = block_of(g.names[0])
        if steps and key is not None and key == last:
            steps[-1].append(g)
        else:
            steps.append([g])
        last = key
    return steps


def calibrate(model: nn.Module, batches: Iterable[Any] | None = None, *,
              statistics: LayerStatistics | None = None) -> CalibrationResult:
    """Cut the masks of a ``method="wanda" | "sparsegpt"`` model on calibration ``batches``.

    ``statistics`` (instead of ``batches``): the layer inputs of one earlier
    :func:`collect_statistics` pass; every layer is then cut from them without running the
    model, which needs ``sequential=False`` (ConfigError otherwise).

    ``batches``: an iterable of example-input tuples (or single tensors, or dicts of keyword
    tensors) matching ``transform``'s capture. Mutates ``model`` (masks frozen at the exact
    target, ``at_target`` set; SparseGPT also updates the kept weights); runs it in eval
    mode and restores its mode. Raises ConfigError for a method that needs no calibration
    or a weight it cannot calibrate, InputError for empty or mismatched batches.
    """
    root = unwrap(model)
    cfg = config_of(root)
    if cfg is None:
        raise InputError("calibrate needs a model returned by sparsify_fx.transform(model, "
                         "method='wanda' or 'sparsegpt', ...); this one has no sparsify config")
    get_method(cfg.method)  # registers the built-in methods and their pruners
    pruner = _PRUNERS.get(cfg.method)
    if pruner is None:
        raise ConfigError(
            f"method {cfg.method!r} needs no calibration (its masks are cut at transform or "
            f"while training); calibrate applies to {', '.join(calibrated_methods())}: "
            "transform(model, method='sparsegpt', target_sparsity=0.5, ...) then "
            "calibrate(gm, batches)")
    entries = [e for e in masks(root) if not e.mask.auxiliary]
    check_kinds(entries, cfg.method)
    targets = layer_targets(entries, cfg)
    if statistics is not None:
        return _cut_from(root, cfg.method, entries, targets, pruner, cfg.options, statistics)
    if batches is None:
        raise InputError("calibrate needs batches (or statistics= from collect_statistics)")
    items = normalize_batches(root, cfg, batches)
    start = time.perf_counter()
    with _inference(root):
        groups = discover_groups(entries, lambda: _run(root, items[0], 0))
        for i, batch in enumerate(items[1:], 1):  # every batch runs before any cut
            _run(root, batch, i)
        by_name = {e.name: e for e in entries}
        steps = calibration_steps(groups, cfg.options.get("sequential", True))
        tokens = 0
        for step in steps:
            for stat in _collect(root, entries, step, items, pruner.statistic):
                tokens = max(tokens, stat.tokens)
                for name in stat.group.names:
                    _cut(by_name[name], stat.sum, stat.tokens, targets[name], pruner,
                         cfg.options)
    per_layer = sparsity(root, per_layer=True)
    assert isinstance(per_layer, dict)
    return CalibrationResult(cfg.method, float(sparsity(root)), per_layer,
                             [g.names for g in groups], tokens, time.perf_counter() - start)


def _cut_from(root: nn.Module, method: str, entries: Sequence[MaskEntry],
              targets: Mapping[str, LayerTarget], pruner: Pruner, options: Mapping[str, Any],
              statistics: LayerStatistics) -> CalibrationResult:
    """``calibrate(statistics=...)``: every layer cut from the given statistics."""
    if options.get("sequential", True):
        raise ConfigError(f"calibrate(statistics=...) cuts every layer from one pass over the "
                          f"unpruned model; transform with method={method!r}, "
                          "sequential=False (or pass batches instead)")
    start = time.perf_counter()
    read = {e.name: statistics.for_pruner(e.name, pruner.statistic) for e in entries}
    for e in entries:  # every statistic checked before the first cut
        want = e.mask.weight_shape[0 if e.kind == "matmul" else 1]
        if read[e.name][0].shape[0] != want:
            raise ConfigError(f"the statistics of {e.name} have width "
                              f"{read[e.name][0].shape[0]}, its input has {want} features")
    for e in entries:
        _cut(e, read[e.name][0], read[e.name][1], targets[e.name], pruner, options)
    per_layer = sparsity(root, per_layer=True)
    assert isinstance(per_layer, dict)
    return CalibrationResult(method, float(sparsity(root)), per_layer, statistics.groups,
                             max(statistics.tokens.values(), default=0),
                             time.perf_counter() - start)


__all__ = ["calibrate", "collect_statistics", "LayerStatistics", "CalibrationResult", "LayerTarget", "Pruner", "register_pruner",
           "calibrated_methods", "calibration_steps", "block_of", "split_counts", "layer_targets", "normalize_batches"]
