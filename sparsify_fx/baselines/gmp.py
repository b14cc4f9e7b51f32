"""``method="gmp"``: gradual magnitude pruning (Zhu & Gupta, 2017) during training.

Sparsity follows ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3``
for ``t0 <= t <= t0 + n * dt`` (``s_i`` before, ``s_f`` after); every ``dt``
optimizer steps the masks are cut to ``s_t`` by ``|w|`` among the weights still
kept (pruned weights never come back). Thresholds are per layer
(``scope="layer"``, shares from ``distribution``) or global.

With ``target_macs`` the same cubic schedule runs on the pruned MACs fraction
(``1 - target_macs`` at the end), one global ``|w|`` ranking.

Use: ``gm = transform(model, method="gmp", target_sparsity=0.9)`` then
``Trainer(gm, data, epochs=E).fit()`` (the Trainer runs :class:`GMPSession`);
``begin`` and ``end`` (fractions of the run's steps) place ``t0`` and
``t0 + n * dt``. The cut at the end of the schedule is the exact final one.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from sparsify_fx.budgets.cut_result import CutResult
from sparsify_fx.budgets.exact_cut import weight_costs
from sparsify_fx.errors import ConfigError
from sparsify_fx.methods import MethodSession, MethodSpec, register_method
from sparsify_fx.baselines._common import OptionMask, config_target, cut, density_of, magnitudes, require_target
from sparsify_fx.baselines.erk import layer_sparsities


class GMPMask(OptionMask):
    method = "gmp"


def gmp_sparsity(t: int, final: float, initial: float = 0.0, t0: int = 0, n: int = 1,
                 dt: int = 1) -> float:
    """Zhu & Gupta's cubic schedule at step ``t`` (clamped outside ``[t0, t0 + n*dt]``)."""
    if n < 1 or dt < 1:
        raise ConfigError(f"GMP needs n >= 1 and dt >= 1, got n={n}, dt={dt}")
    frac = min(max((t - t0) / (n * dt), 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


class GMPSession(MethodSession):
    """GMP's lifecycle: prunes a ``method="gmp"`` model on the cubic schedule.

    Reads the target (``target_sparsity`` or ``target_macs``) and options
    (``scope``, ``distribution``, ``initial``, ``begin``, ``end``, ``every``) from
    the transform config. Mutates the masks; the cut at the end of the schedule,
    or ``finalize()``, is the exact final one.
    """

    method = "gmp"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.require_config()
        self.budget, target = config_target(cfg)
        require_target("gmp", target)
        opts = cfg.options
        self.costs = (weight_costs(self.model, cfg.example_inputs)
                      if self.budget == "macs" and cfg.example_inputs is not None else None)
        if self.budget == "macs":  # MACs budgets are global: the schedule runs on 1 - macs
            self.scope = "global"
            target = 1.0 - float(target)
        else:
            self.scope = "layer" if (cfg.per_layer or isinstance(target, Mapping)) \
                else opts["scope"]
        self.distribution = opts["distribution"]
        self.initial = float(opts["initial"])
        self.begin, self.end, self.every = float(opts["begin"]), float(opts["end"]), opts["every"]
        if not 0.0 <= self.begin < self.end <= 1.0:
            raise ConfigError(f"GMP needs 0 <= begin < end <= 1, got {self.begin}, {self.end}")
        self.target = target
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

    def _cut(self, pruned: float | dict[str, float], final: bool) -> CutResult:
        scores = magnitudes(self.model, only_kept=True)
        if self.budget == "macs":
            return cut(self.model, density_of(pruned, "sparsity"), scores, budget="macs",  # type: ignore[arg-type]
                       costs=self.costs, final=final)
        return cut(self.model, pruned, scores, self.scope, final=final)

    def after_step(self, epoch: int, step: int) -> None:
        self.step += 1
        t = self.step
        end = self.t0 + self.n * self.dt
        if t < self.t0 or t > end or (t - self.t0) % self.dt:
            return
        self._cut(self.sparsity_at(t), final=t == end)
        self.prunes += 1

    def finalize(self) -> CutResult:
        return self._cut(self.final, final=True)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "prunes": self.prunes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.prunes = int(state["step"]), int(state["prunes"])


#: the name earlier releases used (a Trainer callback); the session is the same object
GMPCallback = GMPSession

register_method(MethodSpec(
    "gmp", GMPMask, {"scope": "layer", "distribution": "uniform", "initial": 0.0,
                     "begin": 0.0, "end": 0.75, "every": 0},
    session=GMPSession,
    doc="Gradual magnitude pruning, cubic schedule (the Trainer runs GMPSession).",
))
