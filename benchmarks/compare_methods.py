"""Per-method runners for benchmarks/compare.py: every method trained by the same Trainer.

Each runner takes a fresh model factory, the data splits, a target sparsity,
a seed and the epoch budget ``(train, finetune)`` and returns the transformed
model after training (masks frozen at exactly the target) plus epochs used.
Training phases: ``train`` epochs at lr 0.05 (methods learn or schedule their
masks here), then ``finetune`` epochs at lr 0.01 with the mask fixed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

import sparsify_fx as sf
from sparsify_fx.baselines import GMPCallback, L0Callback, STECallback, run_imp
from sparsify_fx.data import Splits
from sparsify_fx.training.trainer import Trainer

LR, FT_LR, MASK_LR, L0_MASK_LR = 0.05, 0.01, 0.01, 0.05


@dataclass
class Budget:
    """Epochs per run: ``train`` (masks learned or scheduled), ``finetune`` (mask fixed)."""

    train: int
    finetune: int
    batch: int = 128

    @property
    def total(self) -> int:
        return self.train + self.finetune


@dataclass
class Trained:
    model: nn.Module
    epochs: int
    extra: dict[str, Any] = field(default_factory=dict)


def _fit(model: nn.Module, data: Splits, b: Budget, epochs: int, lr: float, seed: int,
         **kw: Any) -> Any:
    if epochs <= 0:
        return None
    return Trainer(model, data.train, epochs=epochs, batch_size=b.batch, lr=lr, seed=seed,
                   progress=False, **kw).fit()


def _finetune(gm: nn.Module, data: Splits, b: Budget, seed: int) -> None:
    _fit(gm, data, b, b.finetune, FT_LR, seed + 7919)


def dense(make: Callable[[], nn.Module], data: Splits, b: Budget, seed: int) -> tuple[Trained, nn.Module]:
    """Dense run; also returns the model after the ``train`` phase (for one-shot magnitude)."""
    torch.manual_seed(seed)
    model = make()
    _fit(model, data, b, b.train, LR, seed)
    after_train = copy.deepcopy(model)
    _fit(model, data, b, b.finetune, FT_LR, seed + 7919)
    return Trained(model, b.total), after_train


def cs(make: Callable[[], nn.Module], data: Splits, t: float, seed: int, b: Budget,
       **cs_options: Any) -> Trained:
    """CS with the lambda controller and exact final cut; beta annealed per step
    (``per_step=True``: short runs get a smooth schedule instead of a few jumps)."""
    torch.manual_seed(seed)
    gm = sf.transform(make(), method="cs", target_sparsity=t)
    run = _fit(gm, data, b, b.train, LR, seed, mask_lr=MASK_LR,
               **{"per_step": True, **cs_options})
    per_layer = sf.sparsity(gm, per_layer=True)
    _finetune(gm, data, b, seed)
    return Trained(gm, b.total, {"changed_bits": run.cut.changed_bits, "layer_sparsity": per_layer})


def gmp(make: Callable[[], nn.Module], data: Splits, t: float | dict[str, float], seed: int,
        b: Budget) -> Trained:
    torch.manual_seed(seed)
    gm = sf.transform(make(), method="gmp", target_sparsity=t)
    _fit(gm, data, b, b.train, LR, seed, callbacks=[GMPCallback(gm)])
    _finetune(gm, data, b, seed)
    return Trained(gm, b.total)


def l0(make: Callable[[], nn.Module], data: Splits, t: float, seed: int, b: Budget) -> Trained:
    torch.manual_seed(seed)
    gm = sf.transform(make(), method="l0", target_sparsity=t)
    cb = L0Callback(gm)
    run = _fit(gm, data, b, b.train, LR, seed, mask_lr=L0_MASK_LR, callbacks=[cb])
    _finetune(gm, data, b, seed)
    return Trained(gm, b.total, {"changed_bits": run.cut.changed_bits, "final_lambda": cb.lmbda})


def ste(make: Callable[[], nn.Module], data: Splits, t: float, seed: int, b: Budget) -> Trained:
    torch.manual_seed(seed)
    gm = sf.transform(make(), method="ste", target_sparsity=t)
    _fit(gm, data, b, b.train, LR, seed, mask_lr=MASK_LR, callbacks=[STECallback(gm)])
    _finetune(gm, data, b, seed)
    return Trained(gm, b.total)


def random(make: Callable[[], nn.Module], data: Splits, t: float, seed: int, b: Budget) -> Trained:
    torch.manual_seed(seed)
    gm = sf.transform(make(), method="random", target_sparsity=t, seed=seed)
    _fit(gm, data, b, b.train, LR, seed)
    _finetune(gm, data, b, seed)
    return Trained(gm, b.total)


def magnitude(after_train: nn.Module, data: Splits, t: float, seed: int, b: Budget) -> Trained:
    """One-shot global magnitude pruning of the dense model after its ``train`` phase."""
    gm = sf.transform(after_train, method="magnitude", target_sparsity=t)
    _finetune(gm, data, b, seed)
    return Trained(gm, b.total)


def imp(make: Callable[[], nn.Module], data: Splits, targets: list[float], seed: int, b: Budget,
        rewind_iteration: int, on_level: Callable[[dict[str, Any], nn.Module], None]) -> None:
    """One IMP trajectory through ``targets``; ``on_level(row, model)`` after every level."""
    torch.manual_seed(seed)
    gm = sf.transform(make(), method="imp", rewind_iteration=rewind_iteration)
    phases = [dict(epochs=b.train, batch_size=b.batch, lr=LR, seed=seed, progress=False)]
    if b.finetune:
        phases.append(dict(epochs=b.finetune, batch_size=b.batch, lr=FT_LR, seed=seed + 7919,
                           progress=False))
    run_imp(gm, data.train, targets=targets, phases=phases,
            on_level=lambda row: on_level(row, gm))
