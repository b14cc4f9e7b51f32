"""The pruning-method protocol: one registry, one lifecycle every method follows.

A method is registered once, with :func:`register_method` and a :class:`MethodSpec`:

* ``mask_class`` + ``options``: the mask factory ``transform`` uses;
* ``granularities`` and ``budgets`` (``"sparsity"``, ``"macs"``): what it can
  honour; ``transform`` refuses anything else by name (:meth:`MethodSpec.check_budgets`);
* ``after_transform(model, config)``: runs at the end of ``transform`` (one-shot
  methods cut their masks there);
* ``session``: its training lifecycle, a :class:`MethodSession` subclass that
  :class:`sparsify_fx.Trainer` (or the user's own loop) drives; None when the
  masks need nothing while training (they are fine-tuned as they are).

The lifecycle is shaped like ``torch.ao.pruning.BaseSparsifier``: a session is
created for a transformed model, ``setup(trainer)`` learns the run length, then
per optimizer step ``penalty()`` (added to the loss) and ``after_step``, per
epoch ``after_epoch``, and ``finalize()`` makes the exact cut; ``state_dict`` /
``load_state_dict`` checkpoint it. CS (:class:`sparsify_fx.CSScheduler`) is one
session among the others.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from torch import Tensor, nn

from sparsify_fx.errors import ConfigError
from sparsify_fx.mask import FixedMask, Mask
from sparsify_fx.mask_index import masks, unwrap

if TYPE_CHECKING:
    from sparsify_fx.budgets.cut_result import CutResult

#: every budget a method may declare (target_<name> in transform)
BUDGETS = ("sparsity", "macs", "latency")


class MethodSession:
    """One method's training lifecycle on one transformed model (mutates its masks).

    Subclasses override what they need; every hook has a do-nothing default.
    ``auto_finalize``: whether the session may make its exact cut by itself
    when its schedule completes (the Trainer turns it off for ticket-search rounds).
    """

    method: str = ""
    auto_finalize: bool = True

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap(model)

    @classmethod
    def for_trainer(cls, model: nn.Module, trainer: Any,
                    **options: Any) -> "MethodSession | None":
        """The session a Trainer runs for ``model``; None when there is nothing to do while
        training: every mask already holds its final exact cut (``at_target``), so the
        run fine-tunes the fixed masks (the Trainer calls :meth:`setup`)."""
        entries = [e for e in masks(model) if not e.mask.auxiliary]
        if entries and all(bool(e.mask.at_target) for e in entries):
            return None
        return cls(model, **options)

    def setup(self, trainer: Any) -> None:
        """Learn the run length (``trainer.epochs``, ``trainer.steps_per_epoch``)."""

    def penalty(self) -> Tensor | None:
        """Term added to the task loss at every optimizer step (None: none)."""
        return None

    def after_step(self, epoch: int, step: int) -> None:
        """After every optimizer step."""

    def after_epoch(self, epoch: int) -> None:
        """After every epoch."""

    def finalize(self) -> "CutResult | None":
        """Make the masks final (exactly at the target when there is one)."""
        return None

    def log_values(self) -> dict[str, float | list[float]]:
        """Numbers for progress bars and epoch logs (e.g. ``beta``, ``lmbda``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def require_config(self) -> Any:
        """The model's :class:`~sparsify_fx.config.SparsifyConfig`; ConfigError unless the
        model was transformed with this session's method."""
        from sparsify_fx.config import config_of
        cfg = config_of(self.model)
        if cfg is None or cfg.method != self.method:
            raise ConfigError(f"{type(self).__name__} needs a model from transform(..., "
                              f"method={self.method!r})")
        return cfg

    def mark_trained(self) -> None:
        """Mark every learned mask of the model as trained (see :mod:`sparsify_fx.mask`)."""
        for e in masks(self.model):
            for m in (e.mask, *getattr(e.mask, "sources", ())):
                m.mark_trained()


@dataclass(frozen=True)
class MethodSpec:
    """Everything ``transform`` and ``Trainer`` need to know about one method."""

    name: str
    mask_class: type[Mask]
    options: dict[str, Any] = field(default_factory=dict)
    granularities: tuple[str, ...] = ("element", "channel", "n:m")
    budgets: tuple[str, ...] = ("sparsity", "macs")
    after_transform: Callable[[nn.Module, Any], None] | None = None
    session: type[MethodSession] | None = None
    doc: str = ""

    def build(self, weight_shape: tuple[int, ...], granularity: str, weight_name: str,
              options: dict[str, Any]) -> Mask:
        return self.mask_class(weight_shape, granularity, weight_name, **options)

    def check_budgets(self, *, target_sparsity: Any, target_macs: Any, granularity: str,
                      per_layer: bool, target_latency: Any = None) -> None:
        """Refuse (ConfigError) a budget this method cannot honour."""
        asked = [b for b, v in (("sparsity", target_sparsity), ("macs", target_macs),
                                ("latency", target_latency)) if v is not None]
        for budget in asked:
            if budget not in self.budgets:
                others = [m for m in available_methods() if budget in get_method(m).budgets]
                raise ConfigError(
                    f"method {self.name!r} cannot honour target_{budget} (it supports "
                    f"{', '.join('target_' + b for b in self.budgets)}); use one of its "
                    f"budgets, or a method that takes target_{budget}: {', '.join(others)}")
        if (target_macs is not None or target_latency is not None) and per_layer:
            raise ConfigError("target_macs / target_latency are global budgets (a fraction of "
                              "the whole model's); drop per_layer=True or use target_sparsity "
                              "per layer")
        if target_latency is not None and granularity != "channel":
            raise ConfigError("target_latency needs granularity='channel': only removed channels "
                              "make the model faster (zeros in a dense weight do not)")


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register (or replace) a method under ``spec.name``."""
    unknown = set(spec.budgets) - set(BUDGETS)
    if unknown:
        raise ConfigError(f"method {spec.name!r} declares unknown budget(s) {sorted(unknown)}; "
                          f"budgets are {', '.join(BUDGETS)}")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    if name not in _METHODS:
        raise ConfigError(
            f"unknown method {name!r}; choose one of {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def split_options(spec: MethodSpec, options: dict[str, Any]) -> dict[str, Any]:
    """Method options with defaults filled in; unknown keys raise ConfigError."""
    unknown = set(options) - set(spec.options)
    if unknown:
        known = ", ".join(sorted(spec.options)) or "none"
        raise ConfigError(
            f"method {spec.name!r} does not take option(s) {', '.join(sorted(unknown))}; "
            f"its options are: {known}"
        )
    return {**spec.options, **options}


def method_of(model: nn.Module) -> MethodSpec | None:
    """The registered method a transformed model was built with (from its config, or
    from its masks for a model without one); None for a model with no masks."""
    from sparsify_fx.config import config_of
    model = unwrap(model)
    cfg = config_of(model)
    if cfg is not None:
        return get_method(cfg.method)
    _load_builtin_methods()
    for e in masks(model):
        for m in (e.mask, *getattr(e.mask, "sources", ())):
            if m.method in _METHODS:
                return _METHODS[m.method]
    return None


register_method(MethodSpec(
    "fixed", FixedMask, {},
    doc="A binary mask set by the user (all ones at transform time).",
))

#: modules that register the built-in methods (CS and the baselines), imported on first use
_BUILTIN_MODULES: tuple[str, ...] = (
    "sparsify_fx.training.cs_scheduler",
    "sparsify_fx.baselines.magnitude", "sparsify_fx.baselines.gmp", "sparsify_fx.baselines.imp",
    "sparsify_fx.baselines.l0", "sparsify_fx.baselines.ste", "sparsify_fx.baselines.random_mask",
)
_loaded = False


def _load_builtin_methods() -> None:
    """Import the modules that register the built-in methods (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


__all__ = ["MethodSession", "MethodSpec", "register_method", "get_method", "available_methods",
           "split_options", "method_of", "BUDGETS"]
