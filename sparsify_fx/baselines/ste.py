"""``method="ste"``: binary masks learned through a straight-through estimator.

Each mask has real ``scores`` (``score_shape``). Forward uses the binary mask:
the top ``density`` fraction of scores in the layer (``density`` set from
``target_sparsity`` and ``distribution`` at transform time), or ``scores > 0``
without a target. Backward passes ``dL/d(masked weight) * sign(w)`` to the
scores (summed over each channel for channel masks): the sign-based,
"sensitivity-consistent" variant of ``dL/dm = dL/d(w m) * w``. Weights get
``dL/d(w m) * m`` as usual. Scores start at ``|w| / mean|w|`` of the layer
(so the first mask is the magnitude mask) and get no weight decay
(:func:`sparsify_fx.param_groups` already sets 0 for mask parameters).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sparsify_fx.budgets.cut_result import CutResult
from sparsify_fx.budgets.exact_cut import apply_budget
from sparsify_fx.mask import Mask
from sparsify_fx.mask_index import masks, unwrap
from sparsify_fx.methods import MethodSession, MethodSpec, register_method
from sparsify_fx.baselines.erk import layer_sparsities


def top_fraction(scores: Tensor, density: float) -> Tensor:
    """Bool mask of exactly ``round(density * numel)`` largest scores (ties by position)."""
    flat = scores.reshape(-1)
    k = int(round(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    return keep.reshape(scores.shape)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: Tensor, scores: Tensor, keep: Tensor) -> Tensor:
        factor = keep.to(weight.dtype)
        ctx.save_for_backward(weight, factor)
        ctx.score_shape = scores.shape
        return weight * factor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        weight, factor = ctx.saved_tensors
        g_scores = grad * torch.sign(weight)
        if g_scores.shape != ctx.score_shape:
            g_scores = g_scores.reshape(g_scores.shape[0], -1).sum(1).reshape(ctx.score_shape)
        return grad * factor, g_scores, None


class STEMask(Mask):
    """Binary mask with straight-through score gradients ``dL/d(w m) * sign(w)``."""

    method = "ste"

    def __init__(self, weight_shape: Sequence[int], granularity: str = "element",
                 weight_name: str = "", distribution: Any = "erk") -> None:
        super().__init__(weight_shape, granularity, weight_name)
        self.distribution = distribution
        self.scores = nn.Parameter(torch.ones(self.score_shape))
        #: kept fraction for the top-k rule; negative means "no target: keep scores > 0"
        self.register_buffer("density", torch.tensor(-1.0))

    def learned_keep(self) -> Tensor:
        s = self.scores.detach()
        d = float(self.density)
        return top_fraction(s, d) if d >= 0 else s > 0

    def soft_mask(self) -> Tensor:  # the binary mask is all the forward ever uses
        return self.learned_keep().float()

    def ranking_scores(self) -> Tensor:
        return self.scores.detach()

    def forward(self, weight: Tensor) -> Tensor:
        if self._frozen:
            return super().forward(weight)
        return _SignSTE.apply(weight, self.scores, self.learned_keep())


@torch.no_grad()
def init_ste(model: nn.Module, target: Any = None, distribution: Any = "erk") -> None:
    """Set scores to ``|w| / mean|w|`` per layer and each layer's density; mutates masks."""
    model = unwrap(model)
    entries = [e for e in masks(model) if isinstance(e.mask, STEMask)]
    shares = layer_sparsities(model, target, distribution) if target is not None else {}
    for e in entries:
        mag = e.weight.detach().abs().float()
        if e.mask.granularity == "channel":
            mag = mag.reshape(mag.shape[0], -1).mean(1).reshape(e.mask.score_shape)
        e.mask.scores.copy_(mag / mag.mean().clamp_min(1e-12))
        if e.name in shares:
            e.mask.density.fill_(1.0 - shares[e.name])
            e.mask.mark_trained()  # the top-k decision exists from transform on


class STESession(MethodSession):
    """STE's lifecycle: scores learn through the sign estimator (marked trained at the
    first step); at the end, the masks freeze exactly at the layer budget."""

    method = "ste"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.require_config()
        self.target = cfg.target_sparsity
        self.distribution = cfg.options["distribution"]

    def finalize(self) -> CutResult | None:
        """Freeze the masks: exactly at the layer budget with a target, else at ``scores > 0``."""
        if self.target is None:
            for e in masks(self.model):
                e.mask.freeze(e.mask.hard_mask())
            return None
        return apply_budget(self.model, layer_sparsities(self.model, self.target, self.distribution))

    def after_step(self, epoch: int, step: int) -> None:
        self.mark_trained()


#: the name earlier releases used (a Trainer callback); the session is the same object
STECallback = STESession


def _after_transform(model: nn.Module, config: Any) -> None:
    init_ste(model, config.target_sparsity, config.options["distribution"])


register_method(MethodSpec(
    "ste", STEMask, {"distribution": "erk"}, budgets=("sparsity",),
    granularities=("element", "channel"),
    after_transform=_after_transform, session=STESession,
    doc="Binary masks learned with a sign straight-through estimator (top-k per layer; "
        "target_sparsity only: a per-layer top-k cannot meet a MACs budget exactly).",
))
