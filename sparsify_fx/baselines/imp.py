"""``method="imp"``: iterative magnitude pruning with rewinding (Frankle et al.).

Level 0 trains the dense network and records the weights after
``rewind_iteration`` optimizer steps. Each later level prunes ``rate`` (20 %)
of the weights still kept, by ``|w|`` (globally by default), rewinds the
remaining weights (and buffers) to the recorded ones and trains again.
``targets`` replaces the geometric levels by an explicit increasing list of
sparsities (each level cuts exactly to the next one); the last level is
always cut exactly to the run's target. With ``target_macs`` the levels are
fractions of pruned MACs (``1 - target_macs`` last), one global ``|w|`` ranking.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from sparsify_fx.budgets.exact_cut import weight_costs
from sparsify_fx.config import config_of
from sparsify_fx.errors import ConfigError
from sparsify_fx.mask_index import masks, sparsity, unwrap
from sparsify_fx.methods import MethodSpec, register_method
from sparsify_fx.baselines._common import OptionMask, config_target, cut, magnitudes


class IMPMask(OptionMask):
    method = "imp"


def imp_schedule(target: float, rate: float = 0.2) -> list[float]:
    """Sparsity after each pruning level: ``1 - (1 - rate) ** k``, last one exactly ``target``."""
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"IMP prune rate must be in (0, 1), got {rate}")
    if not 0.0 < target < 1.0:
        raise ConfigError(f"IMP target must be in (0, 1), got {target}")
    levels = max(1, math.ceil(math.log(1.0 - target) / math.log(1.0 - rate) - 1e-9))
    return [1.0 - (1.0 - rate) ** k for k in range(1, levels)] + [float(target)]


def prune_remaining(model: nn.Module, fraction: float, scope: str = "global") -> float:
    """Prune ``fraction`` of the currently kept weights by ``|w|``; returns the new sparsity.

    Mutates the masks; already pruned weights stay pruned.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction}")
    new = 1.0 - (1.0 - float(sparsity(model))) * (1.0 - fraction)
    cut(model, new, magnitudes(model, only_kept=True), scope)
    return float(sparsity(model))


def _state_to_rewind(model: nn.Module) -> dict[str, Tensor]:
    mask_ids = {id(t) for e in masks(model) for t in [*e.mask.parameters(), *e.mask.buffers()]}
    state = {n: p for n, p in model.named_parameters() if id(p) not in mask_ids}
    state.update({n: b for n, b in model.named_buffers() if id(b) not in mask_ids})
    return state


class _Rewinder:
    """Trainer callback that snapshots weights and buffers after ``iteration`` steps."""

    def __init__(self, model: nn.Module, iteration: int) -> None:
        self.state = _state_to_rewind(model)
        self.iteration = iteration
        self.steps = 0
        self.saved: dict[str, Tensor] = {}
        if iteration == 0:
            self.snapshot()

    def snapshot(self) -> None:
        self.saved = {n: t.detach().clone() for n, t in self.state.items()}

    def after_step(self, epoch: int, step: int) -> None:
        self.steps += 1
        if self.steps == self.iteration:
            self.snapshot()

    @torch.no_grad()
    def rewind(self) -> None:
        if not self.saved:
            raise ConfigError(f"IMP rewind_iteration={self.iteration} is past the end of level "
                              f"0 ({self.steps} steps); use a smaller rewind_iteration")
        for n, t in self.state.items():
            t.copy_(self.saved[n])


def run_imp(model: nn.Module, train_set: Dataset, *, targets: Sequence[float] | None = None,
            on_level: Callable[[dict[str, Any]], None] | None = None,
            phases: Sequence[dict[str, Any]] | None = None,
            **trainer_options: Any) -> list[dict[str, Any]]:
    """Run IMP on a ``method="imp"`` model in place; one row per level (0 = dense).

    Each row: ``level``, ``sparsity`` (counted from the masks), ``epochs``
    (cumulative over all levels) and the level's ``RunResult``. ``on_level(row)``
    runs after every level with the model trained at that level (evaluate it
    there). ``trainer_options`` go to every level's :class:`sparsify_fx.Trainer`;
    ``phases`` (a list of such option dicts, e.g. a main phase then a low-lr
    phase) replaces them with several Trainers run one after another per level.
    """
    from sparsify_fx.training.trainer import Trainer
    model = unwrap(model)
    cfg = config_of(model)
    if cfg is None or cfg.method != "imp":
        raise ConfigError("run_imp needs a model from transform(..., method='imp')")
    opts = cfg.options
    budget, target = config_target(cfg)
    costs = None
    if budget == "macs":
        if cfg.example_inputs is None:
            raise ConfigError("method 'imp' with target_macs needs example_inputs= in transform")
        costs = weight_costs(model, cfg.example_inputs)
        target = 1.0 - float(target)  # levels are fractions of pruned MACs
    if targets is None:
        if target is None or not isinstance(target, (int, float)):
            raise ConfigError("method 'imp' needs a global target_sparsity or target_macs "
                              "(or pass targets=)")
        targets = imp_schedule(float(target), float(opts["rate"]))
    if list(targets) != sorted(targets) or not all(0.0 < t < 1.0 for t in targets):
        raise ConfigError(f"IMP targets must increase within (0, 1), got {list(targets)}")
    rewinder = _Rewinder(model, int(opts["rewind_iteration"]))
    rows: list[dict[str, Any]] = []
    epochs = 0
    for level, level_target in enumerate([0.0, *targets]):
        if level > 0:
            final = level == len(targets)
            if budget == "macs":
                cut(model, 1.0 - level_target, magnitudes(model, only_kept=True),
                    budget="macs", costs=costs, final=final)
            else:
                cut(model, level_target, magnitudes(model, only_kept=True), opts["scope"],
                    final=final)
            rewinder.rewind()
        runs = []
        for i, options in enumerate(phases or [trainer_options]):
            callbacks = [rewinder] if level == 0 and i == 0 else []
            runs.append(Trainer(model, train_set, callbacks=callbacks, **options).fit())
            epochs += runs[-1].epochs_trained
        row = {"level": level, "sparsity": float(sparsity(model)), "epochs": epochs, "runs": runs}
        rows.append(row)
        if on_level is not None:
            on_level(row)
    return rows


register_method(MethodSpec(
    "imp", IMPMask, {"scope": "global", "rate": 0.2, "rewind_iteration": 0},
    doc="Iterative magnitude pruning with rewinding (train with run_imp).",
))
