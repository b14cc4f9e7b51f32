"""Built-in trainer for CS (and any mask method): one run, or ticket search with rewinding.

Mutates the model it is given (that is what training is). Checkpoints are
written atomically after every epoch when ``checkpoint_path`` is set, and a
run resumes bit-identically from one on CPU (data order is seeded per epoch).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sparsify_fx.budgets.cut_result import CutResult
from sparsify_fx.training.checkpoint import atomic_save as _atomic_save
from sparsify_fx.training.checkpoint import load_checkpoint
from sparsify_fx.training.cs_scheduler import param_groups
from sparsify_fx.errors import TrainingError
from sparsify_fx.mask_index import hard_masks, masks, sparsity, unwrap
from sparsify_fx.methods import MethodSession, method_of

EvalHook = Callable[[int, dict[str, float]], None]

#: seconds between progress-bar postfix refreshes (loss, accuracy, beta, lambda, sparsity)
POSTFIX_INTERVAL_S = 0.5


class Callback:
    """Hooks a method adds to :class:`Trainer` (baselines: GMP, L0, ...); all optional.

    ``setup(trainer)`` once when the trainer is built; ``penalty()`` returns a
    scalar Tensor added to every step's loss; ``after_step(epoch, step)`` after
    each optimizer step; ``after_epoch(epoch)`` after each epoch;
    ``finalize()`` at the end of ``fit(finalize=True)`` and may return a
    :class:`CutResult` (the exact cut), which becomes ``RunResult.cut`` when the
    CS scheduler made none. Subclassing is optional: any object with some of
    these methods works.
    """

    def setup(self, trainer: "Trainer") -> None:
        return None

    def penalty(self) -> Tensor | None:
        return None

    def after_step(self, epoch: int, step: int) -> None:
        return None

    def after_epoch(self, epoch: int) -> None:
        return None

    def finalize(self) -> CutResult | None:
        return None


def _hook(cb: Any, name: str) -> Callable[..., Any] | None:
    return getattr(cb, name, None)


@dataclass
class EpochLog:
    epoch: int
    loss: float
    train_acc: float
    val_acc: float | None
    beta: float
    lmbda: float | list[float]
    sparsity: float


@dataclass
class RunResult:
    """History of one run and the exact cut applied at its end (if any)."""

    history: list[EpochLog] = field(default_factory=list)
    cut: CutResult | None = None
    epochs_trained: int = 0


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
             hard: bool = True) -> float:
    """Top-1 accuracy in percent, with binary masks by default; restores train mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad(), hard_masks(model, hard):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


class Trainer:
    """SGD/Adam training of a transformed model, driving its method's lifecycle.

    The model's method (from ``transform``) supplies a
    :class:`~sparsify_fx.methods.MethodSession` (CS: :class:`CSScheduler`; GMP,
    L0, STE: their sessions), built with ``**method_options``, or pass one as
    ``method=`` (a session of the model's method given in ``callbacks`` is used
    as the method too). ``callbacks`` add other hooks (see :class:`Callback`).

    ``dataset`` is a map-style Dataset of (input, label); batches are drawn in
    an order seeded by ``seed`` and the epoch, so runs are reproducible.
    ``lr`` applies to weights, ``mask_lr`` (default ``lr``) to mask scores.
    Weights use ``optimizer`` (SGD with momentum by default); mask scores use
    ``mask_optimizer`` (Adam by default: it moves scores at a rate set by
    ``mask_lr`` whatever the gradient scale, so short runs still drive
    ``|s|`` well past ``1 / beta_final``; pass ``None`` for the weights' one).
    ``collate_fn`` (default: stacking) makes training batches, e.g. padding
    token sequences per batch.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, val_loader: Iterable | None = None,
                 *, epochs: int = 10, batch_size: int = 64, lr: float = 0.1,
                 mask_lr: float | None = None, momentum: float = 0.9,
                 weight_decay: float = 1e-4, optimizer: str = "sgd",
                 mask_optimizer: str | None = "adam",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 seed: int = 0, device: str | torch.device = "cpu",
                 checkpoint_path: str | None = None, eval_hook: EvalHook | None = None,
                 progress: bool = True, callbacks: Iterable[Any] = (),
                 method: MethodSession | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 **method_options: Any) -> None:
        self.model = model
        self.train_set = train_set
        self.val_loader = val_loader
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr, self.mask_lr, self.momentum = lr, mask_lr, momentum
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.mask_optimizer_name = mask_optimizer or optimizer
        self.loss_fn = loss_fn
        self.seed = seed
        self.device = device
        self.checkpoint_path = checkpoint_path
        self.eval_hook = eval_hook
        self.progress = progress
        self.collate_fn = collate_fn
        self.method_options = method_options
        self.steps_per_epoch = math.ceil(len(train_set) / batch_size)  # type: ignore[arg-type]
        self.optimizer = self._make_optimizer()
        self.callbacks = list(callbacks)
        self.method = method if method is not None else self._method_session()
        if self.method is not None:
            self.callbacks = [cb for cb in self.callbacks if cb is not self.method]
            self.method.setup(self)
        for cb in self.callbacks:
            if (setup := _hook(cb, "setup")) is not None:
                setup(self)

    def _method_session(self) -> MethodSession | None:
        """The session of the model's method: one passed in ``callbacks``, else a new one."""
        spec = method_of(self.model)
        if spec is None or spec.session is None:
            if self.method_options:
                raise TrainingError(
                    f"options {sorted(self.method_options)} go to the pruning method, but "
                    f"{'this model has no masks' if spec is None else f'method {spec.name!r}'}"
                    " takes none while training; remove them")
            return None
        given = [cb for cb in self.callbacks if isinstance(cb, spec.session)]
        if given:
            return given[0]
        return spec.session.for_trainer(self.model, self, **self.method_options)

    @property
    def scheduler(self) -> MethodSession | None:
        """The method session (kept under its old name: the CS scheduler for CS models)."""
        return self.method

    def _make_optimizer(self) -> list[torch.optim.Optimizer]:
        """One optimizer per group kind: weights, then mask scores (weight decay 0)."""
        groups = param_groups(self.model, mask_lr=self.mask_lr, lr=self.lr,
                              weight_decay=self.weight_decay)
        names = (self.optimizer_name, self.mask_optimizer_name)
        if not any(group["params"] for group in groups):
            raise TrainingError("nothing to train: every weight has requires_grad=False and the "
                                "masks learn nothing; unfreeze some weights (requires_grad_()) or "
                                "use a learned-mask method such as method='cs'")
        return [self._build(name, group) for name, group in zip(names, groups) if group["params"]]

    def _build(self, name: str, group: dict[str, Any]) -> torch.optim.Optimizer:
        if name == "adam":
            return torch.optim.Adam([group])
        if name == "sgd":
            return torch.optim.SGD([{**group, "momentum": self.momentum}])
        raise TrainingError(f"unknown optimizer {name!r}; use 'sgd' or 'adam'")

    def _loader(self, epoch: int) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1_000 * self._round)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g,
                          collate_fn=self.collate_fn)

    _round = 0

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "round": self._round, "model": self.model.state_dict(),
                "optimizer": [o.state_dict() for o in self.optimizer],
                "scheduler": self.method.state_dict() if self.method else None,
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore model, optimizer, method state and RNG; returns the next epoch to run.

        TrainingError (model untouched) when the checkpoint belongs to another model."""
        model = unwrap(self.model)
        mine, theirs = model.state_dict(), state["model"]
        wrong = sorted(set(mine) ^ set(theirs)) or [
            k for k in mine if tuple(mine[k].shape) != tuple(theirs[k].shape)
            and not k.endswith(".keep")]
        if wrong:
            raise TrainingError(f"the checkpoint was written for another model (e.g. {wrong[0]} "
                                "differs); resume with the model and transform options that "
                                "wrote it, or start without resume_from")
        model.load_state_dict(theirs)
        for opt, opt_state in zip(self.optimizer, state["optimizer"]):
            opt.load_state_dict(opt_state)
        if self.method and state["scheduler"] is not None:
            self.method.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self._round = int(state["round"])
        return int(state["epoch"]) + 1

    # -- one run ------------------------------------------------------------------------
    def fit(self, resume_from: str | None = None, finalize: bool = True,
            on_step: Callable[[int, int], None] | None = None) -> RunResult:
        """Train ``epochs`` epochs; cut masks to the exact target at the end.

        ``on_step(epoch, step)`` is called after every optimizer step (rewind
        points use it). Raises :class:`TrainingError` on a non-finite loss,
        leaving the last checkpoint as it was.
        """
        start = 0
        if self.method is not None:  # ticket-search rounds must not cut when they end
            self.method.auto_finalize = finalize
        if resume_from is not None:
            start = self.load_state_dict(load_checkpoint(resume_from))
        result = RunResult()
        model = self.model.to(self.device)
        for epoch in range(start, self.epochs):
            model.train()
            loss_sum = correct = seen = 0.0
            shown = -math.inf
            bar = tqdm(self._loader(epoch), desc=f"epoch {epoch + 1}/{self.epochs}",
                       disable=not self.progress, leave=False)
            for step, (x, y) in enumerate(bar):
                x, y = x.to(self.device), y.to(self.device)
                for opt in self.optimizer:
                    opt.zero_grad(set_to_none=True)
                out = model(x)
                loss = self.loss_fn(out, y)
                if self.method is not None and (p := self.method.penalty()) is not None:
                    loss = loss + p
                for cb in self.callbacks:
                    if (pen := _hook(cb, "penalty")) is not None and (p := pen()) is not None:
                        loss = loss + p
                if not torch.isfinite(loss):
                    state = ", ".join(f"{k} {v:.4g}" for k, v in self._log_values().items()
                                      if isinstance(v, float))
                    raise TrainingError(
                        f"non-finite loss ({float(loss.detach())}) at epoch {epoch}, step {step}"
                        f"{', ' + state if state else ''}; the last checkpoint "
                        f"({self.checkpoint_path or 'none written'}) is intact. Lower the "
                        "learning rate or beta_final, or check the inputs for NaN/inf."
                    )
                loss.backward()
                for opt in self.optimizer:
                    opt.step()
                if self.method is not None:
                    self.method.after_step(epoch, step)
                if on_step is not None:
                    on_step(epoch, step)
                for cb in self.callbacks:
                    if (after := _hook(cb, "after_step")) is not None:
                        after(epoch, step)
                loss_sum += float(loss.detach()) * len(y)
                correct += float((out.argmax(1) == y).sum())
                seen += len(y)
                # counting hard sparsity reads every mask: refresh the bar now and then
                # (and on the last step), not on every step
                if self.progress and (time.monotonic() - shown >= POSTFIX_INTERVAL_S
                                      or step == self.steps_per_epoch - 1):
                    bar.set_postfix(self._postfix(loss_sum / seen, 100 * correct / seen))
                    shown = time.monotonic()
            if self.method is not None:
                self.method.after_epoch(epoch)
            for cb in self.callbacks:
                if (after_epoch := _hook(cb, "after_epoch")) is not None:
                    after_epoch(epoch)
            log = self._epoch_log(epoch, loss_sum / seen, 100 * correct / seen)
            result.history.append(log)
            result.epochs_trained += 1
            if self.eval_hook is not None:
                self.eval_hook(epoch, log.__dict__)
            if self.checkpoint_path:
                _atomic_save(self.state_dict(epoch), self.checkpoint_path)
        if finalize and self.method is not None:
            result.cut = self.method.finalize()
        if finalize:
            for cb in self.callbacks:
                if (fin := _hook(cb, "finalize")) is not None and (cut := fin()) is not None:
                    result.cut = result.cut or cut
        return result

    def _postfix(self, loss: float, acc: float) -> dict[str, str]:
        post = {"loss": f"{loss:.3f}", "acc": f"{acc:.1f}"}
        if self.method is not None:
            for key, v in self._log_values().items():
                post[key] = f"{v if isinstance(v, float) else max(v):.3g}"
            post["sparsity"] = f"{sparsity(self.model):.3f}"
        return post

    def _log_values(self) -> dict[str, float | list[float]]:
        return self.method.log_values() if self.method is not None else {}

    def _epoch_log(self, epoch: int, loss: float, acc: float) -> EpochLog:
        val = evaluate(self.model, self.val_loader, self.device) if self.val_loader else None
        values = self._log_values()
        return EpochLog(epoch, loss, acc, val, float(values.get("beta", 1.0)),  # type: ignore[arg-type]
                        values.get("lmbda", 0.0),
                        float(sparsity(self.model)) if masks(self.model) else 0.0)

    # -- ticket search ---------------------------------------------------------------------
    def search_ticket(self, rounds: int = 3, rewind_iteration: int = 0,
                      reference_clamp: bool = False, retrain_epochs: int | None = None,
                      test_loader: Iterable | None = None) -> list[dict[str, Any]]:
        """Ticket search: ``rounds`` CS rounds, then retrain (rewound weights, fixed mask).

        After each round ``s <- min(beta_final * s, s_init)`` (or the reference's
        ``min(s, s_init)`` with ``reference_clamp``), beta <- 1, weights rewound
        to their values after ``rewind_iteration`` optimizer steps of round 0.
        Returns one row per round plus the ticket: sparsity, accuracy, epochs.
        """
        if self.method is None or not hasattr(self.method, "next_round"):
            raise TrainingError("search_ticket needs a method with rounds (transform(..., "
                                "method='cs') whose masks are not cut yet)")
        weight_ids = {id(p) for o in self.optimizer for g in o.param_groups
                      if g.get("name") == "weights" for p in g["params"]}
        rewind: dict[str, Tensor] = {}
        named = dict(unwrap(self.model).named_parameters())

        def snapshot() -> None:
            for n, p in named.items():
                if id(p) in weight_ids:
                    rewind[n] = p.detach().clone()

        if rewind_iteration == 0:
            snapshot()
        counter = {"steps": 0}

        def on_step(_e: int, _s: int) -> None:
            counter["steps"] += 1
            if counter["steps"] == rewind_iteration:
                snapshot()

        rows: list[dict[str, Any]] = []
        total_epochs = 0
        for r in range(rounds):
            self._round = r
            run = self.fit(finalize=False, on_step=on_step if r == 0 else None)
            total_epochs += run.epochs_trained
            acc = evaluate(self.model, test_loader or self.val_loader or [], self.device) \
                if (test_loader or self.val_loader) else None
            rows.append({"stage": f"round {r + 1}", "sparsity": float(sparsity(self.model)),
                         "accuracy": acc, "epochs": total_epochs})
            if r < rounds - 1:
                self.method.next_round(reference_clamp)
                self._restore(named, rewind)
                self.optimizer = self._make_optimizer()
        cut = self.method.finalize()
        if cut is None:
            for e in masks(self.model):
                e.mask.freeze(e.mask.hard_mask())
        self._restore(named, rewind)
        self.optimizer = self._make_optimizer()
        saved_epochs = self.epochs
        self.epochs = retrain_epochs or self.epochs
        self._round = rounds
        run = self.fit(finalize=False)
        self.epochs = saved_epochs
        total_epochs += run.epochs_trained
        acc = evaluate(self.model, test_loader or self.val_loader or [], self.device) \
            if (test_loader or self.val_loader) else None
        rows.append({"stage": "ticket (retrained)", "sparsity": float(sparsity(self.model)),
                     "accuracy": acc, "epochs": total_epochs,
                     "changed_bits": cut.changed_bits if cut else 0})
        return rows

    @staticmethod
    def _restore(named: dict[str, nn.Parameter], values: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, v in values.items():
                named[n].copy_(v)

