"""Mask granularities: how a mask's scores map onto its weight, and fixed patterns.

* ``"element"``: one score per weight (scores have the weight's shape);
* ``"channel"``: one score per output channel (shape ``(C_out, 1, ...)``);
* ``"n:m"`` such as ``"2:4"``: one score per weight, and every cut keeps exactly
  the ``n`` best of each ``m`` consecutive weights along the input dimension
  (dim 1: input features / channels, at every output row and kernel position;
  dim 0 for a ``x @ W`` matmul weight such as GPT-2's ``(in, out)`` Conv1D), the
  layout NVIDIA ASP and cuSPARSELt expect. A trailing group shorter than
  ``m`` (input size not a multiple of ``m``) keeps ``ceil(n * len / m)`` (a
  single input channel stays dense).
  The pattern *is* the budget: its sparsity is ``1 - n/m``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sparsify_fx.errors import ConfigError

#: the kinds of granularity; an N:M granularity is written "n:m", e.g. "2:4"
GRANULARITIES = ("element", "channel", "n:m")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Granularity:
    """A parsed granularity: ``kind`` is one of :data:`GRANULARITIES`."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def is_pattern(self) -> bool:
        """True when cuts follow a fixed N:M pattern rather than a free budget."""
        return self.kind == "n:m"

    @property
    def density(self) -> float:
        return self.n / self.m if self.is_pattern else 1.0

    def score_shape(self, weight_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in weight_shape)
        if self.kind == "channel":
            return (shape[0],) + (1,) * (len(shape) - 1)
        return shape

    def pattern_keep(self, scores: Tensor, input_dim: int = 1) -> Tensor:
        """Bool keep mask (``scores``' shape): the ``n`` highest scores of every ``m``
        consecutive entries along ``input_dim`` (1 for Linear/Conv weights ``(out, in,
        ...)``; 0 for a ``x @ W`` matmul weight ``(in, out)``). Read-only."""
        if not self.is_pattern:
            raise ConfigError(f"granularity {self.kind!r} has no fixed pattern")
        if scores.dim() < 2:
            raise ConfigError(f"an {self.n}:{self.m} pattern needs a weight with an input "
                              f"dimension, got shape {tuple(scores.shape)}")
        moved = scores.detach().float().movedim(input_dim, -1)  # (..., in)
        width = moved.shape[-1]
        keep = torch.zeros_like(moved, dtype=torch.bool)
        full = (width // self.m) * self.m
        if full:
            groups = moved[..., :full].reshape(*moved.shape[:-1], full // self.m, self.m)
            top = torch.topk(groups, self.n, dim=-1, sorted=False).indices
            chosen = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
            keep[..., :full] = chosen.reshape(*moved.shape[:-1], full)
        rest = width - full
        if rest:
            k = math.ceil(self.n * rest / self.m)
            if k:
                top = torch.topk(moved[..., full:], k, dim=-1, sorted=False).indices
                keep[..., full:] = torch.zeros_like(moved[..., full:], dtype=torch.bool
                                                    ).scatter_(-1, top, True)
        return keep.movedim(-1, input_dim)

    def pattern_threshold(self, scores: Tensor, input_dim: int = 1) -> Tensor:
        """Per-group threshold (``scores``' shape and dtype, differentiable): the midpoint
        of the ``n``-th and ``(n+1)``-th highest score of every ``m`` consecutive entries
        along ``input_dim``, so ``scores > threshold`` is exactly :meth:`pattern_keep`
        (barring ties) and ``sigmoid(beta * (scores - threshold))`` is a top-``n``
        relaxation whose scores compete inside their group (learned N:M CS). A trailing
        short group uses its own ``ceil(n * len / m)``; one that keeps everything gets a
        threshold far below its scores. Read-only."""
        if not self.is_pattern:
            raise ConfigError(f"granularity {self.kind!r} has no fixed pattern")
        moved = scores.movedim(input_dim, -1)
        width = moved.shape[-1]
        full = (width // self.m) * self.m
        parts = []
        if full:
            groups = moved[..., :full].reshape(*moved.shape[:-1], full // self.m, self.m)
            top = torch.topk(groups, self.n + 1, dim=-1, sorted=True).values
            mid = (top[..., self.n - 1] + top[..., self.n]) / 2
            parts.append(mid.unsqueeze(-1).expand_as(groups).reshape(*moved.shape[:-1], full))
        rest = width - full
        if rest:
            tail = moved[..., full:]
            k = math.ceil(self.n * rest / self.m)
            if 0 < k < rest:
                top = torch.topk(tail, k + 1, dim=-1, sorted=True).values
                mid = (top[..., k - 1] + top[..., k]) / 2
            else:  # keeps all (or none) of the trailing group
                far = tail.detach().abs().amax(-1) + 1e4
                mid = -far if k else far
            parts.append(mid.unsqueeze(-1).expand_as(tail))
        return torch.cat(parts, -1).movedim(-1, input_dim)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_pattern else self.kind


def parse_granularity(text: str) -> Granularity:
    """``"element"``, ``"channel"`` or ``"n:m"`` (0 < n < m) -> :class:`Granularity`."""
    if text in ("element", "channel"):
        return Granularity(text)
    match = _NM.match(text) if isinstance(text, str) else None
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 0 < n < m:
            return Granularity("n:m", n, m)
    raise ConfigError(f"unknown granularity {text!r}; use element, channel or an N:M pattern "
                      "such as '2:4' (keep n of every m input weights, 0 < n < m)")


def pattern_sparsity(weight_shape: Sequence[int], granularity: Granularity) -> float:
    """Fraction of a weight the pattern zeroes (``1 - n/m`` when dim 1 divides by m)."""
    shape = tuple(int(s) for s in weight_shape)
    keep = granularity.pattern_keep(torch.zeros(shape))
    return 1.0 - float(keep.sum()) / math.prod(shape)


def pattern_target(granularity: Granularity, target_sparsity: object,
                   target_macs: object) -> object:
    """The target an N:M granularity implies (``1 - n/m``): returned when none was given;
    ConfigError for a MACs target or a different sparsity. Other granularities: unchanged."""
    if not granularity.is_pattern:
        return target_sparsity
    implied = 1.0 - granularity.density
    if target_macs is not None or isinstance(target_sparsity, dict) or (
            target_sparsity is not None and abs(float(target_sparsity) - implied) > 1e-9):  # type: ignore[arg-type]
        raise ConfigError(f"granularity '{granularity}' fixes the sparsity at {implied:g} (keep "
                          f"{granularity.n} of every {granularity.m}); drop target_sparsity/"
                          "target_macs or use granularity='element' for another budget")
    return implied


__all__ = ["GRANULARITIES", "Granularity", "parse_granularity", "pattern_sparsity",
           "pattern_target"]
