"""``method="gmp"``: gradual magnitude pruning (Zhu & Gupta, 2017) during training.

Sparsity follows ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3``
for ``t0 <= t <= t0 + n * dt`` (``s_i`` before, ``s_f`` after); every ``dt``
optimizer steps the masks are cut to ``s_t`` by ``|w|`` among the weights still
kept (pruned weights never come back). Thresholds are per layer
(``scope="layer"``, shares from ``distribution``) or global.

Use: ``gm = transform(model, method="gmp", target_sparsity=0.9)`` then
``Trainer(gm, data, epochs=E, callbacks=[GMPCallback(gm)]).fit()``; ``begin``
and ``end`` (fractions of the run's steps) place ``t0`` and ``t0 + n * dt``.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..budget import CutResult
from ..errors import ConfigError
from ..mask_index import unwrap
from ..methods import MethodSpec, register_method
from ..config import config_of
from ._common import OptionMask, cut, magnitudes, require_target
from .erk import layer_sparsities


class GMPMask(OptionMask):
    method = "gmp"


def gmp_sparsity(t: int, final: float, initial: float = 0.0, t0: int = 0, n: int = 1,
                 dt: int = 1) -> float:
    """Zhu & Gupta's cubic schedule at step ``t`` (clamped outside ``[t0, t0 + n*dt]``)."""
    if n < 1 or dt < 1:
        raise ConfigError(f"GMP needs n >= 1 and dt >= 1, got n={n}, dt={dt}")
    frac = min(max((t - t0) / (n * dt), 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


class GMPCallback:
    """Trainer callback that prunes a ``method="gmp"`` model on the cubic schedule.

    Reads ``target_sparsity`` and options (``scope``, ``distribution``,
    ``initial``, ``begin``, ``end``, ``every``) from the transform config.
    Mutates the masks; ``finalize()`` makes the final cut exact.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap(model)
        cfg = config_of(self.model)
        if cfg is None or cfg.method != "gmp":
            raise ConfigError("GMPCallback needs a model from transform(..., method='gmp')")
        require_target("gmp", cfg.target_sparsity)
        opts = cfg.options
        self.scope = "layer" if (cfg.per_layer or isinstance(cfg.target_sparsity, Mapping)) \
            else opts["scope"]
        self.distribution = opts["distribution"]
        self.initial = float(opts["initial"])
        self.begin, self.end, self.every = float(opts["begin"]), float(opts["end"]), opts["every"]
        if not 0.0 <= self.begin < self.end <= 1.0:
            raise ConfigError(f"GMP needs 0 <= begin < end <= 1, got {self.begin}, {self.end}")
        self.target = cfg.target_sparsity
        self.final: float | dict[str, float] = (
            self.target if self.scope == "global"
            else layer_sparsities(self.model, self.target, self.distribution))
        self.step = 0
        self.t0, self.dt, self.n = 0, 1, 1
        self.prunes = 0

    def setup(self, trainer: Any) -> None:
        total = trainer.epochs * trainer.steps_per_epoch
        self.dt = int(self.every) if self.every else max(1, trainer.steps_per_epoch // 4)
        self.t0 = int(round(self.begin * total))
        self.n = max(1, (int(round(self.end * total)) - self.t0) // self.dt)

    def sparsity_at(self, t: int) -> float | dict[str, float]:
        if isinstance(self.final, Mapping):
            return {k: gmp_sparsity(t, v, min(self.initial, v), self.t0, self.n, self.dt)
                    for k, v in self.final.items()}
        return gmp_sparsity(t, float(self.final), self.initial, self.t0, self.n, self.dt)

    def after_step(self, epoch: int, step: int) -> None:
        self.step += 1
        t = self.step
        if t < self.t0 or t > self.t0 + self.n * self.dt or (t - self.t0) % self.dt:
            return
        cut(self.model, self.sparsity_at(t), magnitudes(self.model, only_kept=True), self.scope)
        self.prunes += 1

    def finalize(self) -> CutResult:
        return cut(self.model, self.final, magnitudes(self.model, only_kept=True), self.scope)


def _after_transform(model: nn.Module, config: Any) -> None:
    if config.target_macs is not None:
        raise ConfigError("method 'gmp' takes target_sparsity, not target_macs")


register_method(MethodSpec(
    "gmp", GMPMask, {"scope": "layer", "distribution": "uniform", "initial": 0.0,
                     "begin": 0.0, "end": 0.75, "every": 0},
    after_transform=_after_transform,
    doc="Gradual magnitude pruning, cubic schedule (train with GMPCallback).",
))
