"""``method="l0"``: L0 regularisation with hard-concrete gates (Louizos et al., 2018).

Gate per weight (``granularity="element"``) or per output channel
(``"channel"``), parameter ``log_alpha``. Training samples
``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / T)``,
``z = clamp(s * (zeta - gamma) + gamma, 0, 1)`` with ``gamma = -0.1``,
``zeta = 1.1``, ``T = 2/3``. The expected L0 norm is
``sum sigmoid(log_alpha - T * log(-gamma / zeta))``. Test time uses the
deterministic gate ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``;
the hard mask is ``gate > 0``.

One noise draw per parameter update: the uniform noise is kept until
``log_alpha`` changes (its in-place version counter moves at every optimizer
step), so a gate that several tensors share (``granularity="channel"``: a
conv's weight, bias and BatchNorm follow one group gate) gets the same sample
on all of them within a step.

:class:`L0Session` (run by the Trainer) adds ``lambda * E[L0] / N`` (N masked
weights) to the loss. With a target, ``log(lambda)`` follows the shared
:class:`~sparsify_fx.training.density_controller.DensityController` (integral only) on the
gap between the hard density (MACs-weighted for ``target_macs``) and a cubic
setpoint, and ``finalize()`` multiplies each kept weight by its deterministic
gate, then cuts the masks to exactly the target by ``log_alpha``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsify_fx.budgets.cut_result import CutResult
from sparsify_fx.budgets.exact_cut import apply_budget, macs_fraction, weight_costs
from sparsify_fx.config import config_of
from sparsify_fx.training.density_controller import DensityController, cubic_setpoint
from sparsify_fx.errors import ConfigError
from sparsify_fx.mask import Mask
from sparsify_fx.mask_index import MaskEntry, masks
from sparsify_fx.methods import MethodSession, MethodSpec, register_method
from sparsify_fx.baselines._common import config_target, density_of

GAMMA, ZETA, TEMPERATURE = -0.1, 1.1, 2.0 / 3.0


class L0Mask(Mask):
    """Hard-concrete gate mask; ``log_alpha`` (``score_shape``) is learned."""

    method = "l0"

    def __init__(self, weight_shape: Sequence[int], granularity: str = "element",
                 weight_name: str = "", droprate_init: float = 0.3,
                 temperature: float = TEMPERATURE, init_noise: float = 0.01) -> None:
        super().__init__(weight_shape, granularity, weight_name)
        if not 0.0 < droprate_init < 1.0:
            raise ConfigError(f"droprate_init must be in (0, 1), got {droprate_init}")
        mean = math.log(1.0 - droprate_init) - math.log(droprate_init)
        self.temperature = float(temperature)
        self.log_alpha = nn.Parameter(mean + init_noise * torch.randn(self.score_shape))
        self._noise: Tensor | None = None
        self._noise_version = -1

    def resample(self) -> None:
        """Forget the current noise draw; the next ``sample_gate`` draws a new one."""
        self._noise = None

    def _logistic_noise(self) -> Tensor:
        version = self.log_alpha._version
        if self._noise is None or version != self._noise_version \
                or self._noise.shape != self.log_alpha.shape:
            u = torch.rand_like(self.log_alpha.detach()).clamp(1e-6, 1.0 - 1e-6)
            self._noise, self._noise_version = torch.log(u) - torch.log1p(-u), version
        return self._noise

    def sample_gate(self) -> Tensor:
        """A stochastic hard-concrete sample ``z`` in [0, 1] (differentiable in ``log_alpha``).

        The same noise is reused until ``log_alpha`` is updated or :meth:`resample` is called.
        """
        s = torch.sigmoid((self._logistic_noise() + self.log_alpha) / self.temperature)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def test_gate(self) -> Tensor:
        """Deterministic gate ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``."""
        return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def prob_nonzero(self) -> Tensor:
        """``P(z != 0) = sigmoid(log_alpha - T log(-gamma / zeta))`` per gate."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-GAMMA / ZETA))

    def soft_mask(self) -> Tensor:
        return self.sample_gate() if self.training else self.test_gate()

    def learned_keep(self) -> Tensor:
        return self.test_gate().detach() > 0

    def ranking_scores(self) -> Tensor:
        return self.log_alpha.detach()

    def learned_factor(self) -> Tensor:
        """Trained, unfrozen: the deterministic test gate (float, in [0, 1])."""
        return self.test_gate().detach()


def _gate_units(model: nn.Module) -> list[tuple[L0Mask, Tensor | int]]:
    """Every L0 gate of ``model`` with the number of masked weights each score gates.

    Element/independent masks: ``weights_per_score`` (an int). Coupled channel
    groups (``granularity="channel"``): a float tensor ``(K,)``, the weights each
    group slot gates summed over its (non-auxiliary) follower masks. Read-only.
    """
    out: list[tuple[L0Mask, Tensor | int]] = []
    units: dict[int, Tensor] = {}
    groups: dict[int, L0Mask] = {}
    for e in masks(model):
        m = e.mask
        if isinstance(m, L0Mask):
            out.append((m, m.weights_per_score))
            continue
        if m.auxiliary or not hasattr(m, "sources"):
            continue
        for src, sel, slot in m.source_slots():
            if isinstance(src, L0Mask):
                groups[id(src)] = src
                acc = units.setdefault(id(src), torch.zeros(math.prod(src.score_shape),
                                                            device=src.log_alpha.device))
                acc.index_add_(0, slot, torch.full((int(sel.sum()),), float(m.weights_per_score),
                                                   device=acc.device))
    out += [(g, units[k].reshape(g.score_shape)) for k, g in groups.items()]
    return out


def _gated_by_l0(mask: Mask) -> bool:
    return isinstance(mask, L0Mask) or any(isinstance(s, L0Mask)
                                           for s in getattr(mask, "sources", ()))


class L0Session(MethodSession):
    """L0's lifecycle: expected-L0 penalty, lambda controller and exact final cut.

    Works on element gates and on coupled channel groups (each group slot's
    probability counts once per weight it gates). Marks the gates trained at the
    first penalty; mutates weights and masks in ``finalize``.
    """

    method = "l0"

    def __init__(self, model: nn.Module, lmbda: float = 0.1, controller_gain: float = 0.05,
                 target_ramp: float = 0.5, lmbda_bounds: tuple[float, float] = (1e-6, 1e3)) -> None:
        super().__init__(model)
        cfg = config_of(self.model)
        self.gates = _gate_units(self.model)
        if not self.gates:
            raise ConfigError("L0Session needs a model from transform(..., method='l0')")
        self.budget, self.target = config_target(cfg)
        if isinstance(self.target, Mapping):
            raise ConfigError("method 'l0' takes a global target_sparsity (a fraction), "
                              "not a per-layer dict")
        self.costs = None
        if self.budget == "macs":
            if cfg.example_inputs is None:
                raise ConfigError("method 'l0' with target_macs needs example_inputs= in "
                                  "transform to count MACs per weight")
            self.costs = weight_costs(self.model, cfg.example_inputs)
        self.entries: list[MaskEntry] = [e for e in masks(self.model) if not e.mask.auxiliary]
        self.total = sum(e.mask.numel() for e in self.entries)
        self.controller = DensityController(lmbda, gain=controller_gain, kp=0.0,
                                            bounds=lmbda_bounds, clip_gap=False)
        self.ramp = target_ramp
        self.step, self.total_steps = 0, 1

    def setup(self, trainer: Any) -> None:
        self.total_steps = trainer.epochs * trainer.steps_per_epoch

    @property
    def lmbda(self) -> float:
        return self.controller.lmbda[0]

    @property
    def log_lmbda(self) -> float:
        return float(self.controller.log[0])

    def log_values(self) -> dict[str, float | list[float]]:
        return {"lmbda": self.lmbda}

    def expected_l0(self) -> Tensor:
        """Expected number of non-zero weights (each gate counts the weights it covers)."""
        return sum((g.prob_nonzero() * units).sum() for g, units in self.gates)

    def density(self) -> float:
        """Fraction of masked weights (of MACs, for ``target_macs``) the current hard gates
        keep (``test gate > 0``)."""
        if self.costs is not None:
            return macs_fraction(self.model, self.costs)
        return sum(e.mask.kept_weights() for e in self.entries) / self.total

    def penalty(self) -> Tensor:
        self.mark_trained()
        if self.target is not None:
            self._update()
        return self.lmbda * self.expected_l0() / self.total

    @torch.no_grad()
    def _update(self) -> None:
        final = density_of(self.target, self.budget)
        setpoint = cubic_setpoint(final, self.step / self.total_steps, self.ramp)
        self.controller.update(0, self.density(), setpoint)

    def after_step(self, epoch: int, step: int) -> None:
        self.step += 1

    @torch.no_grad()
    def fold_gates(self) -> None:
        """Multiply every open deterministic gate into the weights it gates (biases and
        BatchNorm followers included); closed gates leave their weights as they are."""
        for e in masks(self.model):
            if _gated_by_l0(e.mask):
                gate = e.mask.fold_factor()
                e.weight.mul_(torch.where(gate > 0, gate, torch.ones_like(gate)).to(e.weight.dtype))

    @torch.no_grad()
    def finalize(self) -> CutResult | None:
        """Fold the deterministic gates into the weights, then freeze the masks:
        exactly at the target by ``log_alpha`` (or at ``gate > 0`` without one)."""
        self.fold_gates()
        if self.target is None:
            for g, _ in self.gates:
                g.freeze(g.hard_mask())
            return None
        if self.budget == "macs":
            return apply_budget(self.model, target_macs=float(self.target), costs=self.costs)
        return apply_budget(self.model, float(self.target))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, **self.controller.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.controller.load_state_dict(state)


#: the name earlier releases used (a Trainer callback); the session is the same object
L0Callback = L0Session

register_method(MethodSpec(
    "l0", L0Mask, {"droprate_init": 0.3, "temperature": TEMPERATURE, "init_noise": 0.01},
    session=L0Session,
    doc="L0 regularisation with hard-concrete gates (the Trainer runs L0Session).",
))
