"""Registry of pruning methods: how each builds its mask modules.

A method is a name, a mask factory ``(site, granularity, **options) -> Mask``,
its option defaults, and an optional ``after_transform(model, config)`` hook
(one-shot methods compute their masks there). Baseline modules register
themselves with :func:`register_method`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .errors import ConfigError
from .mask import CSMask, FixedMask, Mask


@dataclass(frozen=True)
class MethodSpec:
    name: str
    mask_class: type[Mask]
    options: dict[str, Any] = field(default_factory=dict)
    granularities: tuple[str, ...] = ("element", "channel")
    after_transform: Callable[[nn.Module, Any], None] | None = None
    doc: str = ""

    def build(self, weight_shape: tuple[int, ...], granularity: str, weight_name: str,
              options: dict[str, Any]) -> Mask:
        return self.mask_class(weight_shape, granularity, weight_name, **options)


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
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


register_method(MethodSpec(
    "cs", CSMask, {"s_init": 0.0, "rescale": True},
    doc="Continuous Sparsification: scale * sigmoid(beta * s), hard mask s > 0.",
))
register_method(MethodSpec(
    "fixed", FixedMask, {},
    doc="A binary mask set by the user (all ones at transform time).",
))

_BUILTIN_MODULES: tuple[str, ...] = (
    "sparsify_fx.baselines.magnitude", "sparsify_fx.baselines.gmp", "sparsify_fx.baselines.imp",
    "sparsify_fx.baselines.l0", "sparsify_fx.baselines.ste", "sparsify_fx.baselines.random_mask",
)
_loaded = False


def _load_builtin_methods() -> None:
    """Import baseline modules that register themselves (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
