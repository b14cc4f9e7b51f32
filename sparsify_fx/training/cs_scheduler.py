"""Continuous Sparsification in the user's own loop: three added lines.

    opt = torch.optim.SGD(sparsify_fx.param_groups(gm, lr=0.1, weight_decay=1e-4), momentum=0.9)
    cs = sparsify_fx.CSScheduler(gm, epochs=E)
    ...  loss = task_loss + cs.penalty(); loss.backward(); opt.step()
    cs.step()                    # once per epoch (or per batch with per_step=True)

Facts from Savarese et al. (NeurIPS 2020) and the reference code: soft mask
``sigmoid(beta * s)``, beta from 1 to ``beta_final`` (200) geometrically,
``beta_e = beta_final ** (e / (epochs - 1))``, penalty ``lambda * sum(soft
masks)`` with lambda 1e-8 (so small that ``s_init`` effectively sets the
sparsity), hard mask ``s > 0``.

Beyond the reference: with a target (``target_sparsity`` or ``target_macs``,
taken from ``transform`` by default) a PI controller sets ``log(lambda)`` from
the gap between the current hard density (``s > 0``) and a setpoint ramping to
the target, per layer when the target is per layer; ``finalize()`` then cuts the
masks to exactly the target (see :mod:`sparsify_fx.budgets.exact_cut`). The ``step()`` that
completes the scheduled epochs (or steps) makes that cut itself, so the
three-line loop ends exactly at the target; ``finalize()`` after it returns the
same cut. ``CSScheduler`` is CS's :class:`~sparsify_fx.methods.MethodSession`:
the Trainer drives it like any other method.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsify_fx.budgets.cut_result import CutResult
from sparsify_fx.budgets.exact_cut import apply_budget, kept_fraction, weight_costs
from sparsify_fx.budgets.cost_model import ChannelCost, ChannelMacs, budget_cost, channel_macs, is_coupled
from sparsify_fx.config import config_of
from sparsify_fx.training.density_controller import DensityController, cubic_setpoint
from sparsify_fx.errors import ConfigError
from sparsify_fx.granularity import parse_granularity
from sparsify_fx.mask import CSMask
from sparsify_fx.mask_index import MaskEntry, masks, unwrap
from sparsify_fx.methods import MethodSession, MethodSpec, register_method


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learnable mask parameters (scores, log-alphas, ...) of every mask."""
    seen: set[int] = set()
    out = []
    for e in masks(model):
        for p in e.mask.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def param_groups(model: nn.Module, mask_lr: float | None = None,
                 mask_options: Mapping[str, Any] | None = None,
                 **optimizer_options: Any) -> list[dict[str, Any]]:
    """Two parameter groups for any torch optimizer: weights, then mask scores.

    ``optimizer_options`` (lr, weight_decay, ...) apply to the weights; the
    mask group gets the same options except ``weight_decay=0`` (reference
    behaviour), ``lr=mask_lr`` if given, plus ``mask_options``.
    """
    model = unwrap(model)
    mask_ids = {id(p) for p in mask_parameters(model)}
    weights = [p for p in model.parameters() if id(p) not in mask_ids and p.requires_grad]
    mask_params = [p for p in model.parameters() if id(p) in mask_ids]
    weight_group = {"params": weights, "name": "weights", **optimizer_options}
    mask_group = {"params": mask_params, "name": "masks",
                  **{k: v for k, v in optimizer_options.items() if k != "weight_decay"},
                  "weight_decay": 0.0, **(dict(mask_options or {}))}
    if mask_lr is not None:
        mask_group["lr"] = mask_lr
    return [weight_group, mask_group]


class CSScheduler(MethodSession):
    """Beta annealing, L1 penalty, lambda controller and exact final cut for CS masks.

    Shaped like ``torch.optim.lr_scheduler``: call :meth:`step` once per epoch
    (``per_step=False``) or once per optimizer step (``per_step=True``, needs
    ``steps_per_epoch``). Mutates the ``beta`` buffers of the model's CS masks,
    marks them trained at the first :meth:`penalty` or :meth:`step`, and freezes
    them at the exact cut when the schedule completes (``auto_finalize``).
    """

    method = "cs"

    def __init__(self, model: nn.Module, epochs: int, *, beta_final: float = 200.0,
                 lmbda: float = 1e-8, per_step: bool = False, steps_per_epoch: int | None = None,
                 target_sparsity: float | Mapping[str, float] | None = None,
                 target_macs: float | None = None, per_layer: bool | None = None,
                 target_latency: float | None = None, cost: ChannelCost | None = None,
                 example_inputs: Sequence[Tensor] | Tensor | None = None,
                 controller_gain: float = 0.1, controller_kp: float = 4.0,
                 target_ramp: float = 0.5,
                 lmbda_bounds: tuple[float, float] = (1e-12, 1.0)
                 ) -> None:
        super().__init__(model)
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        if beta_final < 1.0:
            raise ConfigError(f"beta_final must be >= 1 (beta starts at 1), got {beta_final}")
        if per_step and not steps_per_epoch:
            raise ConfigError("per_step=True needs steps_per_epoch (len(train_loader))")
        #: every CS score module (coupled channel groups included): beta and round clamps
        self.cs_masks: list[CSMask] = list({id(m): m for m in self.model.modules()
                                            if isinstance(m, CSMask)}.values())
        #: the masked weights (followers of coupled groups included): penalty and density
        self.entries: list[MaskEntry] = [
            e for e in masks(self.model) if not e.mask.auxiliary
            and (isinstance(e.mask, CSMask) or any(isinstance(s, CSMask)
                                                    for s in getattr(e.mask, "sources", [])))]
        if not self.cs_masks or not self.entries:
            raise ConfigError("CSScheduler needs a model transformed with method='cs'")
        #: N:M masks hold their pattern at every step (their groups compete for the n
        #: places): no L1 penalty and no density control, only beta and the final cut
        self.pattern_entries = {e.name for e in self.entries
                                if parse_granularity(e.mask.granularity).is_pattern}
        #: the hard masks when training started (first penalty()/step() of a round)
        self._start_keep: dict[str, Tensor] | None = None
        cfg = config_of(self.model)
        if target_sparsity is None and target_macs is None and cfg is not None:
            target_sparsity, target_macs = cfg.target_sparsity, cfg.target_macs
            per_layer = cfg.per_layer if per_layer is None else per_layer
        self.epochs = int(epochs)
        self.beta_final = float(beta_final)
        self.per_step = bool(per_step)
        self.total_steps = self.epochs * (steps_per_epoch or 1)
        self.target_sparsity = target_sparsity
        self.target_macs = target_macs
        self.per_layer = bool(per_layer) or isinstance(target_sparsity, Mapping)
        self.gain = float(controller_gain)
        self.kp = float(controller_kp)
        if not 0.0 < target_ramp <= 1.0:
            raise ConfigError(f"target_ramp must be in (0, 1], got {target_ramp}")
        self.ramp = float(target_ramp)
        self.bounds = lmbda_bounds
        self.costs: dict[str, float] | None = None
        if target_macs is not None:
            if example_inputs is None and cfg is not None:
                example_inputs = cfg.example_inputs
            if example_inputs is None:
                raise ConfigError("target_macs needs example inputs to count MACs per weight: "
                                  "pass example_inputs= to transform (or to CSScheduler)")
            self.costs = weight_costs(self.model, example_inputs)
        #: coupled channel masks under a MACs budget: count what shrink will leave
        #: (removed input channels included), the same number the final cut uses
        self.channel_macs: ChannelMacs | None = None
        if self.costs is not None and not self.per_layer and is_coupled(self.entries):
            self.channel_macs = channel_macs(self.model, self.costs)
        #: with target_latency (or an explicit cost=): the ChannelCost the controller
        #: and the final cut both read (sparsify_fx.budgets.cost_model)
        self.cost_model: ChannelCost | None = None
        if target_latency is None and not self.has_target and cfg is not None:
            target_latency = cfg.target_latency
        if target_latency is not None or cost is not None:
            self.target_macs, self.cost_model = budget_cost(
                self.model, self.entries, self.target_sparsity, self.target_macs,
                target_latency, cost, example_inputs)
            self.channel_macs = self.cost_model
        self.penalty_weight = self._penalty_weights()
        n_groups = len(self.entries) if self.per_layer else 1
        self.controller = DensityController(lmbda, gain=self.gain, kp=self.kp,
                                            bounds=self.bounds, clip_gap=True,
                                            n_groups=n_groups)
        self.t = 0  # epochs (or steps) completed in this round
        self.round = 0
        #: the exact cut made when the schedule completed (or by finalize)
        self.cut: CutResult | None = None
        self._apply_beta()

    @classmethod
    def for_trainer(cls, model: nn.Module, trainer: Any,
                    **options: Any) -> "CSScheduler | None":
        """A scheduler over the Trainer's run; None when every CS mask is frozen already
        (a cut CS model is fine-tuned as a fixed mask: no penalty, controller or second cut)."""
        if not any(isinstance(m, CSMask) and not m._frozen for m in unwrap(model).modules()):
            return None
        return cls(model, trainer.epochs, steps_per_epoch=trainer.steps_per_epoch, **options)

    def after_step(self, epoch: int, step: int) -> None:
        if self.per_step:
            self.step()

    def after_epoch(self, epoch: int) -> None:
        if not self.per_step:
            self.step()

    def log_values(self) -> dict[str, float | list[float]]:
        return {"beta": self.beta, "lmbda": self.lmbda}

    @property
    def log_lmbda(self) -> Tensor:
        """log(lambda) in use per controller group (float64)."""
        return self.controller.log

    # -- schedule --------------------------------------------------------------
    @property
    def beta(self) -> float:
        span = (self.total_steps if self.per_step else self.epochs) - 1
        if span <= 0:
            return self.beta_final
        return self.beta_final ** (min(self.t, span) / span)

    @property
    def lmbda(self) -> float | list[float]:
        vals = self.controller.lmbda
        return vals[0] if len(vals) == 1 else vals

    def _apply_beta(self) -> None:
        for m in self.cs_masks:
            m.beta.fill_(self.beta)

    def _groups(self) -> Iterator[tuple[int, list[MaskEntry]]]:
        """Controller groups (index, entries), N:M entries left out (their density is fixed)."""
        if self.per_layer:
            yield from ((i, [e]) for i, e in enumerate(self.entries)
                        if e.name not in self.pattern_entries)
        else:
            free = [e for e in self.entries if e.name not in self.pattern_entries]
            if free:
                yield 0, free

    def mark_trained(self) -> None:
        """Mark the masks trained; the first call of a round records the start masks."""
        super().mark_trained()
        if self._start_keep is None:  # (not in state_dict: a resumed run counts from resume)
            self._start_keep = {e.name: e.mask.hard_mask().detach().clone()
                                for e in self.entries}

    def mask_bits_changed(self) -> int:
        """Hard-mask entries (scores) that differ now from where this round's training
        started: what the training itself changed in the masks (0 before training)."""
        if self._start_keep is None:
            return 0
        return sum(int((e.mask.hard_mask() != self._start_keep[e.name]).sum())
                   for e in self.entries)

    # -- penalty -----------------------------------------------------------------
    def _penalty_weights(self) -> dict[str, float]:
        """Per entry: weights each score covers, times its MACs cost relative to the
        mean cost under a MACs budget. Constant for the scheduler's life."""
        mean_cost = sum(self.costs.values()) / len(self.costs) if self.costs else 1.0
        return {e.name: e.mask.weights_per_score
                * (self.costs[e.name] / mean_cost if self.costs else 1.0)
                for e in self.entries}

    def penalty(self) -> Tensor:
        """``sum_g lambda_g * sum(soft masks in g)`` (each score counts the weights it covers).

        With a target, each call first runs one controller update (so the
        controller ticks once per optimizer step in the usual loop).
        """
        self.mark_trained()
        if self.has_target:
            self.update_controller()
        total: Tensor | None = None
        lm = self.log_lmbda.exp()
        for g, group in self._groups():
            s = sum(e.mask.soft_mask().sum() * self.penalty_weight[e.name] for e in group)
            term = s * float(lm[g])
            total = term if total is None else total + term
        if total is None:  # every mask holds an N:M pattern: nothing to penalise
            total = self.cs_masks[0].scores.sum() * 0.0
        return total

    @property
    def has_target(self) -> bool:
        return self.target_sparsity is not None or self.target_macs is not None

    # -- controller --------------------------------------------------------------
    def _final_density(self, group: list[MaskEntry]) -> float | None:
        if self.target_macs is not None:
            return float(self.target_macs)
        if self.target_sparsity is None:
            return None
        if isinstance(self.target_sparsity, Mapping):
            t = self.target_sparsity.get(group[0].name)
            return None if t is None else 1.0 - float(t)
        return 1.0 - float(self.target_sparsity)

    @property
    def progress(self) -> float:
        """Fraction of the round done, from the epoch (or step) counter."""
        return self.t / (self.total_steps if self.per_step else self.epochs)

    def setpoint(self, final_density: float) -> float:
        """Density the controller tracks now: cubic ramp from 1 to the target.

        Reaches the target after ``target_ramp`` of the round (Zhu & Gupta's
        cubic shape); pruned scores rarely recover once beta is large, so
        approaching the target gradually avoids overshooting it.
        """
        return cubic_setpoint(final_density, self.progress, self.ramp)

    def _density(self, group: list[MaskEntry]) -> float:
        if self.channel_macs is not None:
            return self.channel_macs.hard_fraction()
        return kept_fraction(group, self.costs)

    @torch.no_grad()
    def update_controller(self) -> None:
        """PI step on ``log(lambda_g)`` from ``gap = (density_g - setpoint_g) / setpoint_g``.

        ``gap`` is clipped to [-1, 1]; the integral ``I += gain * gap`` and the
        lambda in use is ``exp(I + kp * gap)``, both clipped to ``lmbda_bounds``.
        ``density_g`` is the hard density (``s > 0``) of group g, MAC-weighted
        for a MACs budget. The proportional term brakes as the density nears the
        setpoint: pruned scores barely recover once beta is large, so an
        overshoot would otherwise stay until the final cut.
        """
        for g, group in self._groups():
            final = self._final_density(group)
            if final is None:
                continue
            self.controller.update(g, self._density(group), self.setpoint(final))

    @property
    def schedule_done(self) -> bool:
        """True once the scheduled epochs (or steps) of this round have all run."""
        return self.t >= (self.total_steps if self.per_step else self.epochs)

    def step(self) -> None:
        """End of an epoch (or of a step, with ``per_step``): anneal beta. The step that
        completes the schedule makes the exact cut when there is a target (``auto_finalize``)."""
        self.mark_trained()
        self.t += 1
        self._apply_beta()
        if self.schedule_done and self.auto_finalize and self.has_target and self.cut is None:
            self.finalize()

    # -- rounds and the final cut --------------------------------------------------
    @torch.no_grad()
    def next_round(self, reference_clamp: bool = False) -> None:
        """Start a new ticket-search round: ``s <- min(beta_final * s, s_init)``, beta <- 1.

        ``reference_clamp=True`` reproduces the reference code, which resets beta
        to 1 before clamping and so computes ``min(s, s_init)``.
        """
        factor = 1.0 if reference_clamp else self.beta_final
        for m in self.cs_masks:
            m.scores.copy_(torch.clamp(factor * m.scores, max=m.s_init))
        self.t = 0
        self.round += 1
        self.cut = None
        self._start_keep = None
        self._apply_beta()

    def finalize(self) -> CutResult | None:
        """Cut to the exact target (if any) and freeze the masks; None without a target.

        Idempotent: once this round is cut (by the completing ``step()`` or an
        earlier call), returns that cut without cutting again."""
        if not self.has_target:
            return None
        if self.cut is None or not all(bool(e.mask.at_target) for e in self.entries):
            self.mark_trained()
            self.cut = apply_budget(self.model, self.target_sparsity,
                                    target_macs=self.target_macs, costs=self.cost_model or self.costs,
                                    per_layer=self.per_layer)
        return self.cut

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "round": self.round, **self.controller.state_dict(),
                "epochs": self.epochs, "beta_final": self.beta_final, "per_step": self.per_step,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["epochs"]) != self.epochs or bool(state["per_step"]) != self.per_step:
            raise ConfigError("CSScheduler state was saved with a different epochs/per_step "
                              "setting; resume with the same epochs and per_step")
        self.t = int(state["t"])
        self.round = int(state["round"])
        self.controller.load_state_dict(state)
        self.total_steps = int(state["total_steps"])
        self._apply_beta()


register_method(MethodSpec(
    "cs", CSMask, {"s_init": 0.0, "rescale": True}, session=CSScheduler,
    budgets=("sparsity", "macs", "latency"),
    doc="Continuous Sparsification: scale * sigmoid(beta * s), hard mask s > 0.",
))
