"""Penalty-strength control toward a target density, shared by the CS and L0 methods.

A learned-mask method adds ``lambda * penalty`` to the loss; to land on a target
it steers ``log(lambda)`` from the gap between the measured hard density and a
setpoint that ramps from 1 to the target (Zhu & Gupta's cubic shape).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from sparsify_fx.errors import ConfigError


def cubic_setpoint(final_density: float, progress: float, ramp: float) -> float:
    """Density to track at ``progress`` (fraction of the run): cubic from 1 down to
    ``final_density``, reached after ``ramp`` of the run."""
    left = max(0.0, 1.0 - progress / ramp)
    return final_density + (1.0 - final_density) * left ** 3


class DensityController:
    """PI control of ``log(lambda_g)`` for ``n_groups`` independent groups.

    ``gap = (density - setpoint) / max(setpoint, 1e-3)`` (clipped to [-1, 1] when
    ``clip_gap``); the integral ``I += gain * gap`` and the lambda in use,
    ``exp(I + kp * gap)``, are both clipped to ``bounds``. ``kp=0`` is pure
    integral control. Holds float64 state; mutates only itself.
    """

    def __init__(self, lmbda: float, *, gain: float, kp: float = 0.0,
                 bounds: tuple[float, float] = (1e-12, 1.0), clip_gap: bool = True,
                 n_groups: int = 1) -> None:
        lo, hi = bounds
        if not (lmbda > 0.0 and 0.0 < lo <= hi):
            raise ConfigError(f"lambda must be > 0 and its bounds 0 < low <= high, got "
                              f"lmbda={lmbda}, bounds={bounds}; lambda is steered in log space")
        self.gain, self.kp, self.clip_gap = float(gain), float(kp), bool(clip_gap)
        self.bounds = (float(lo), float(hi))
        #: the integral term (log lambda) and the log lambda in use (integral + kp * gap)
        self.log_i = torch.full((n_groups,), math.log(lmbda), dtype=torch.float64)
        self.log = self.log_i.clone()

    @property
    def lmbda(self) -> list[float]:
        return self.log.exp().tolist()

    def update(self, group: int, density: float, setpoint: float) -> None:
        """One control step for ``group`` from the measured ``density``."""
        lo, hi = (math.log(b) for b in self.bounds)
        gap = (density - setpoint) / max(setpoint, 1e-3)
        if self.clip_gap:
            gap = min(max(gap, -1.0), 1.0)
        integral = min(max(float(self.log_i[group]) + self.gain * gap, lo), hi)
        self.log_i[group] = integral
        self.log[group] = min(max(integral + self.kp * gap, lo), hi)

    def state_dict(self) -> dict[str, Any]:
        return {"log_lmbda": self.log.clone(), "log_lmbda_i": self.log_i.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.log = state["log_lmbda"].clone().to(torch.float64)
        self.log_i = state.get("log_lmbda_i", state["log_lmbda"]).clone().to(torch.float64)
