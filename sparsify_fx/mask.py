"""Mask modules: the objects a mask node calls, ``weight -> weight * mask``.

Contract shared by every method:

* ``Mask.forward(weight)`` takes the full weight tensor (shape ``weight_shape``,
  any float dtype/device) and returns a tensor of the same shape, dtype and device.
* Scores live in ``score_shape``: the weight shape for ``granularity="element"``,
  ``(out_channels, 1, 1, ...)`` for ``granularity="channel"``, so they broadcast.
* ``hard_mask()`` is the binary keep/prune decision (bool, ``score_shape``);
  ``fold_factor()`` is the exact float multiplier fold writes into the weight.
  In hard mode ``forward`` computes ``weight * fold_factor()``, so fold is exact.
* ``keep``/``frozen`` buffers: once a method (or an exact-budget cut) fixes the
  mask, ``frozen`` is set and ``keep`` alone decides. Both are in ``state_dict``;
  ``keep`` stays empty (no memory) until the mask is first frozen.
* **Untrained is identity.** A learned mask is *untrained* until its method's
  training lifecycle first runs on it (``CSScheduler.penalty()``/``step()``, the
  L0 penalty, ...: :meth:`Mask.mark_trained`; the ``trained`` buffer, in
  ``state_dict``). Until then, and unless it is frozen, its hard mask keeps every
  weight and its fold factor is exactly 1 (no rescale), so ``sparsity()`` is 0 and
  ``fold(transform(m))`` equals ``m``. A cut of an untrained mask keeps the kept
  weights as they are (factor 1), since the network never ran with the rescale.
* ``at_target`` buffer: set by the exact budget cut that delivers the target
  asked at ``transform`` (:func:`sparsify_fx.apply_budget` with ``final=True``);
  ``fold``/``shrink``/``export_onnx`` refuse a model with a target whose masks
  are not all at it (:func:`sparsify_fx.config.require_target_applied`).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from sparsify_fx.errors import ConfigError
from sparsify_fx.granularity import parse_granularity

#: fp32 sigmoid(x) is exactly 1.0 above x ~ 16.6; keep initial |beta * s| well below.
SATURATION_LIMIT = 12.0


def score_shape_for(weight_shape: Sequence[int], granularity: str) -> tuple[int, ...]:
    """Shape of one mask's scores for a weight of ``weight_shape``."""
    return parse_granularity(granularity).score_shape(weight_shape)


class _SoftMaskedWeight(torch.autograd.Function):
    """``weight * sigmoid(beta * scores) * scale`` for element masks, with the fewest
    weight-sized temporaries: the sigmoid, the output and the two gradients (autograd's
    chain of the plain expression makes 9). The rest runs in place.

    Equal to autograd's ``weight * (sigmoid(beta * scores) * scale)`` bit for bit when
    ``scale`` is a power of two (the default ``s_init=0`` gives 2), else within one
    rounding of float32. float tensors of one shape; no double backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, scores: Tensor, beta: Tensor, scale: float) -> Tensor:
        sig = torch.mul(beta, scores).sigmoid_()
        ctx.save_for_backward(weight, sig, beta)
        ctx.scale = scale
        out = torch.mul(weight, sig)
        return out.mul_(scale) if scale != 1.0 else out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        weight, sig, beta = ctx.saved_tensors
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.mul(grad, sig)
            if ctx.scale != 1.0:
                grad_w.mul_(ctx.scale)
        if ctx.needs_input_grad[1]:
            grad_s = torch.mul(grad, weight)
            if math.frexp(ctx.scale)[0] == 0.5:  # a power of two scales every rounding exactly:
                torch.ops.aten.sigmoid_backward.grad_input(grad_s, sig, grad_input=grad_s)
                grad_s.mul_(beta * ctx.scale)  # one pass for both factors, same bits
            else:
                grad_s.mul_(ctx.scale)
                torch.ops.aten.sigmoid_backward.grad_input(grad_s, sig, grad_input=grad_s)
                grad_s.mul_(beta)
        return grad_w, grad_s, None, None


class Mask(nn.Module):
    """Base class: a (possibly learned) mask over one weight tensor.

    Subclasses implement ``soft_mask()`` (differentiable, ``score_shape``) and
    ``learned_keep()`` (bool, ``score_shape``), and may override ``scale``.
    """

    method: str = "fixed"
    #: op kind of the masked weight ("conv", "linear", ...), set by transform.
    kind: str = ""
    #: True for masks on biases/BatchNorm that only follow a channel decision;
    #: they are listed by ``masks()`` but not counted in sparsity or budgets.
    auxiliary: bool = False

    def __init__(self, weight_shape: Sequence[int], granularity: str = "element",
                 weight_name: str = "") -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.granularity = granularity
        self.score_shape = score_shape_for(self.weight_shape, granularity)
        self.weight_name = weight_name
        #: True: forward uses the binary mask (evaluation / fold parity); False: soft.
        self.hard = False
        self.register_buffer("keep", torch.ones(0, dtype=torch.bool))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))
        self.register_buffer("at_target", torch.zeros((), dtype=torch.bool))
        self._frozen = False  # python mirror of `frozen`: no device sync per forward
        self._trained = False  # python mirror of `trained`

    # -- what subclasses define -------------------------------------------------
    def _keep_or_ones(self) -> Tensor:
        return self.keep if self.keep.numel() else self._all_kept()

    def soft_mask(self) -> Tensor:
        """Differentiable mask values in ``score_shape`` (float32)."""
        return self._keep_or_ones().float()

    def learned_keep(self) -> Tensor:
        """The method's own binarisation rule (bool, ``score_shape``)."""
        return self._keep_or_ones()

    def ranking_scores(self) -> Tensor:
        """Scores ranked by exact-budget cuts: larger means keep first."""
        return self._keep_or_ones().float()

    @property
    def scale(self) -> float:
        """Constant factor applied to kept weights (1 unless the method rescales)."""
        return 1.0

    def learned_factor(self) -> Tensor:
        """Fold factor of a trained, unfrozen mask: ``learned_keep() * scale`` (float32)."""
        factor = self.learned_keep().float()
        return factor * self.scale if self.scale != 1.0 else factor

    # -- shared behaviour ----------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        """False until the method's training lifecycle first ran on this mask."""
        return self._trained

    def mark_trained(self) -> None:
        """Record that training started (mutates the ``trained`` buffer); idempotent."""
        if not self._trained:
            self.trained.fill_(True)
            self._trained = True
            self._factor_cache = None

    def _all_kept(self) -> Tensor:
        return torch.ones(self.score_shape, dtype=torch.bool, device=self.frozen.device)

    def hard_mask(self) -> Tensor:
        """Binary keep decision, bool, ``score_shape`` (all True while untrained)."""
        if self._frozen:
            return self.keep
        return self.learned_keep() if self._trained else self._all_kept()

    def fold_factor(self) -> Tensor:
        """Exactly what fold multiplies into the weight (float32, ``score_shape``).

        Frozen: ``keep * scale`` (scale only once trained); untrained: exactly 1."""
        if self._frozen:
            factor = self.keep.float()
            return factor * self.scale if self._trained and self.scale != 1.0 else factor
        if not self._trained:
            return self._all_kept().float()
        return self.learned_factor()

    def freeze(self, keep: Tensor) -> None:
        """Fix the mask to ``keep`` (bool, ``score_shape``); mutates this module."""
        self.keep = keep.to(device=self.frozen.device, dtype=torch.bool).reshape(
            self.score_shape).clone()
        self._factor_cache = None  # the old keep's id may be reused by a later tensor
        self.frozen.fill_(True)
        self._frozen = True
        self.at_target.fill_(False)  # a final budget cut sets it again after freezing

    def unfreeze(self) -> None:
        self.frozen.fill_(False)
        self._frozen = False
        self.at_target.fill_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints written before these buffers existed: their masks were trained. Only
        # where this mask's state is there at all: a mask whose keys were left out (the
        # eval graph of an ExportedModule shares the train graph's buffers) must not load
        # defaults over them (a reloaded calibrated cut lost its at_target)
        if prefix + "keep" in state_dict or prefix + "frozen" in state_dict:
            state_dict.setdefault(prefix + "trained", torch.ones((), dtype=torch.bool))
            state_dict.setdefault(prefix + "at_target", torch.zeros((), dtype=torch.bool))
        incoming = state_dict.get(prefix + "keep")
        if incoming is not None and incoming.shape != self.keep.shape:
            self.keep = torch.empty_like(incoming, device=self.frozen.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._factor_cache = None
        self._frozen = bool(self.frozen)
        self._trained = bool(self.trained)

    def _cached_fold_factor(self, dtype: torch.dtype) -> Tensor:
        """``fold_factor()`` in ``dtype``, reused while ``keep`` is unchanged (frozen masks):
        a training step then costs one multiply, like torch.nn.utils.prune's float mask."""
        key = (id(self.keep), self.keep._version, self.keep.device, dtype, self.scale,
               self._trained)
        cached = getattr(self, "_factor_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.fold_factor().to(dtype))
            self._factor_cache = cached
        return cached[1]

    def forward(self, weight: Tensor) -> Tensor:
        if self._frozen:
            return weight * self._cached_fold_factor(weight.dtype)
        factor = self.fold_factor() if self.hard else self.soft_mask()
        return weight * factor.to(weight.dtype)

    # -- counting ------------------------------------------------------------------
    @property
    def weights_per_score(self) -> int:
        return math.prod(self.weight_shape) // math.prod(self.score_shape)

    def numel(self) -> int:
        """Number of weights this mask covers."""
        return math.prod(self.weight_shape)

    def kept_weights(self) -> int:
        """Number of weights the hard mask keeps (counted from the tensor)."""
        return int(self.hard_mask().sum().item()) * self.weights_per_score

    def extra_repr(self) -> str:
        return (f"{self.weight_name!r}, shape={self.weight_shape}, "
                f"granularity={self.granularity!r}, hard={self.hard}")


class FixedMask(Mask):
    """A binary mask set from outside (magnitude, GMP, IMP, random): no learned state."""

    method = "fixed"

    def __init__(self, weight_shape: Sequence[int], granularity: str = "element",
                 weight_name: str = "") -> None:
        super().__init__(weight_shape, granularity, weight_name)
        self.freeze(torch.ones(self.score_shape, dtype=torch.bool))


class CSMask(Mask):
    """Continuous Sparsification mask: ``scale * sigmoid(beta * s)``.

    ``s`` (parameter ``scores``) starts at ``s_init``; ``beta`` is a buffer set
    by :class:`sparsify_fx.CSScheduler`. With ``rescale=True`` (reference
    behaviour, default) ``scale = 1 / sigmoid(s_init)``: training starts with
    mask exactly 1, and the hard mask keeps that factor (``scale * (s > 0)``),
    so fold reproduces the function the network was trained as.

    N:M granularity (``"2:4"``) is learned as a pattern: the soft mask is
    ``scale * sigmoid(beta * (s - t))`` with ``t`` each group's midpoint between its
    ``n``-th and ``(n+1)``-th score (``Granularity.pattern_threshold``), so the ``m``
    scores of a group compete for its ``n`` places while training, and the hard mask
    is always exactly the pattern (the ``n`` highest scores of every group).
    """

    method = "cs"

    def __init__(self, weight_shape: Sequence[int], granularity: str = "element",
                 weight_name: str = "", s_init: float = 0.0, rescale: bool = True,
                 beta: float = 1.0) -> None:
        super().__init__(weight_shape, granularity, weight_name)
        if not math.isfinite(s_init) or abs(s_init * beta) >= SATURATION_LIMIT:
            raise ConfigError(
                f"s_init={s_init} with beta={beta} starts the sigmoid saturated "
                f"(|beta*s_init| must be < {SATURATION_LIMIT}; fp32 sigmoid is exactly 1 "
                "above ~16.6, which zeroes every gradient). Use s_init in [-1, 1]."
            )
        self.s_init = float(s_init)
        self.rescale = bool(rescale)
        self.scores = nn.Parameter(torch.full(self.score_shape, float(s_init)))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self._scale = 1.0 / (1.0 / (1.0 + math.exp(-self.s_init))) if self.rescale else 1.0

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def input_dim(self) -> int:
        """The weight's input dimension, along which N:M groups run (0 for ``x @ W``)."""
        return 0 if self.kind == "matmul" else 1

    def relative_scores(self) -> Tensor:
        """What the sigmoid reads: the scores, minus each group's threshold for N:M."""
        gran = parse_granularity(self.granularity)
        if gran.is_pattern:
            return self.scores - gran.pattern_threshold(self.scores, self.input_dim)
        return self.scores

    def soft_mask(self) -> Tensor:
        return torch.sigmoid(self.beta * self.relative_scores()) * self._scale

    def forward(self, weight: Tensor) -> Tensor:
        if (not self._frozen and not self.hard and weight.shape == self.scores.shape
                and weight.dtype == self.scores.dtype and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return _SoftMaskedWeight.apply(weight, self.relative_scores(), self.beta,
                                           self._scale)
        return super().forward(weight)

    def learned_keep(self) -> Tensor:
        gran = parse_granularity(self.granularity)
        if gran.is_pattern:
            return gran.pattern_keep(self.scores, self.input_dim)
        return self.scores.detach() > 0

    def ranking_scores(self) -> Tensor:
        return self.scores.detach()


class MaskSet(nn.ModuleDict):
    """Parent of every graph-level mask in one GraphModule (``gm.sparsify_masks``).

    Keys are the masked weight's qualified name with dots turned into ``__``, so
    ``state_dict`` keys read ``sparsify_masks.layer1__0__conv1__weight.scores``.
    """

    ATTRIBUTE = "sparsify_masks"

    @staticmethod
    def key_for(weight_name: str) -> str:
        key = "".join(c if c.isalnum() or c == "_" else "_" for c in weight_name.replace(".", "__"))
        return key if not key[:1].isdigit() else f"w_{key}"


class SharedChannelMask(Mask):
    """A channel mask that reads its values from shared per-group score masks.

    ``sources``: the group masks (any Mask with 1-D ``score_shape`` (K_g,), e.g.
    a CSMask built by the method). ``index``: int64, one entry per channel of
    this tensor's ``channel_dim`` (0, or 1 for an ``(in, out)`` weight), pointing into ``cat(source values) + [whole]``; the
    last position means "always kept" (factor exactly 1, soft or hard).
    Used by the channel coupling pass for producer weights and biases and for
    BatchNorm weight/bias (``kind`` "batchnorm"/"bias": ``auxiliary`` True).
    Soft mode uses each source's ``soft_mask()`` (its ``fold_factor()`` once frozen);
    hard mode and ``fold_factor()`` use each source's ``fold_factor()``, so fold
    stays exact. ``freeze`` writes the decision back into the sources.
    """

    method = "shared"

    def __init__(self, weight_shape: Sequence[int], sources: Sequence[Mask], index: torch.Tensor,
                 weight_name: str = "", kind: str = "", auxiliary: bool = False,
                 channel_dim: int = 0) -> None:
        super().__init__(weight_shape, "channel", weight_name)
        if channel_dim:  # a weight stored (in, out) as HF Conv1D keeps it; (E, out, in) experts
            shape = [1] * len(self.weight_shape)
            shape[channel_dim] = self.weight_shape[channel_dim]
            self.score_shape = tuple(shape)
        self.channel_dim = int(channel_dim)
        self.sources = nn.ModuleList(sources)
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() != self.score_shape[self.channel_dim]:
            raise ConfigError(f"{weight_name}: index has {index.numel()} entries for "
                              f"{self.score_shape[self.channel_dim]} channels")
        self.register_buffer("index", index)
        self.kind = kind
        self.auxiliary = bool(auxiliary)

    def _gather(self, values: list[Tensor], whole: Tensor) -> Tensor:
        flat = torch.cat([v.reshape(-1) for v in values] + [whole.reshape(1).to(values[0].dtype)]
                         if values else [whole.reshape(1)])
        return flat[self.index].reshape(self.score_shape)

    def _one(self, dtype: torch.dtype) -> Tensor:
        return torch.ones((), dtype=dtype, device=self.index.device)

    def source_slots(self) -> Iterator[tuple[Mask, Tensor, Tensor]]:
        """Per source: ``(source, sel, slot)``. ``sel`` (bool, one per channel of this
        tensor) marks the channels gated by that source, ``slot`` (int64) their
        positions in the source's flattened scores. Channels kept whole are in no ``sel``."""
        offset = 0
        for src in self.sources:
            n = math.prod(src.score_shape)
            sel = (self.index >= offset) & (self.index < offset + n)
            yield src, sel, self.index[sel] - offset
            offset += n

    @property
    def scale(self) -> float:
        return self.sources[0].scale if len(self.sources) else 1.0

    def soft_mask(self) -> Tensor:
        vals = [s.fold_factor() if s._frozen else s.soft_mask() for s in self.sources]
        return self._gather([v.float() for v in vals], self._one(torch.float32))

    def learned_keep(self) -> Tensor:
        return self._gather([s.learned_keep() for s in self.sources], self._one(torch.bool))

    def hard_mask(self) -> Tensor:
        return self._gather([s.hard_mask() for s in self.sources], self._one(torch.bool))

    def fold_factor(self) -> Tensor:
        return self._gather([s.fold_factor().float() for s in self.sources],
                            self._one(torch.float32))

    def ranking_scores(self) -> Tensor:
        vals = [s.ranking_scores().float() for s in self.sources]
        return self._gather(vals, torch.tensor(float("inf"), device=self.index.device))

    def freeze(self, keep: Tensor) -> None:
        """Write ``keep`` (bool, ``score_shape``) into the sources and freeze them."""
        keep = keep.to(device=self.index.device, dtype=torch.bool).reshape(-1)
        for src, sel, slot in self.source_slots():
            new = src.hard_mask().detach().clone().reshape(-1)
            new[slot] = keep[sel]
            src.freeze(new)

    def unfreeze(self) -> None:
        for src in self.sources:
            src.unfreeze()

    def forward(self, weight: Tensor) -> Tensor:
        factor = self.fold_factor() if self.hard else self.soft_mask()
        return weight * factor.to(weight.dtype)
