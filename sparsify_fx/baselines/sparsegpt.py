"""``method="sparsegpt"``: one-shot pruning with layer-wise reconstruction (Frantar and
Alistarh, 2023).

Per masked weight ``W`` ``(out, in)`` with calibration inputs ``X`` ``(tokens, in)``:

* Hessian ``H = X^T X / tokens``; inputs never active (zero diagonal) get ``H_jj = 1`` and
  zero weights; dampening ``H += percdamp * mean(diag H) * I`` (1 %);
* ``U``: the upper Cholesky factor of ``H^-1``; columns are processed left to right in
  blocks of ``blocksize`` (128) with lazy updates: pruning column ``j`` adds
  ``-(w_j / U_jj) * U_j,j:`` to the columns after it (inside the block at once, to later
  blocks once per block), the optimal-brain-surgeon update restricted to the columns not
  yet processed;
* mask selection inside each block: the lowest ``w^2 / U_jj^2`` over the whole block
  (a block's share of the layer's count, so the layer is exact); N:M: at the first column
  of every group of ``m`` inputs, the ``m - n`` lowest of that group in each row, with
  the weights as updated so far.

The updated weights are written into the model (pruned ones zeroed); the masks hold the
pattern. Layers run sequentially (:mod:`sparsify_fx.baselines.calibration`), so each
layer's Hessian comes from the pruned layers before it; memory: one ``in x in`` Hessian.
Options: ``blocksize`` (128), ``percdamp`` (0.01), ``sequential`` (True).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from sparsify_fx.baselines._common import OptionMask
from sparsify_fx.baselines.calibration import LayerTarget, register_pruner, split_counts
from sparsify_fx.errors import ConfigError
from sparsify_fx.granularity import Granularity
from sparsify_fx.methods import MethodSpec, register_method


class SparseGPTMask(OptionMask):
    method = "sparsegpt"


def inverse_hessian_factor(hessian: Tensor, percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the dampened ``H^-1`` (float64, ``(in, in)``)
    and the bool mask of dead inputs (zero diagonal). ``hessian`` is not mutated."""
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(float(percdamp) * float(torch.diagonal(H).mean()))
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ConfigError(f"SparseGPT: the calibration Hessian is not positive definite "
                          f"after dampening ({err}); raise percdamp (now {percdamp}) or "
                          "calibrate on more tokens") from err


def _group_keep(n: int, m: int, width: int) -> int:
    return n if width == m else math.ceil(n * width / m)


def sparsegpt_prune(weight: Tensor, hessian: Tensor, *, prune: int = 0,
                    pattern: Granularity | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """SparseGPT on one layer: ``(updated weight, keep)`` for ``weight`` ``(out, in)`` and
    ``hessian`` ``(in, in)`` (any positive scale). ``prune``: weights to zero in all
    (element granularity), or ``pattern`` (N:M). float64 results; inputs not mutated."""
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ConfigError(f"SparseGPT blocksize must be a positive int, got {blocksize!r}")
    if not float(percdamp) >= 0.0:
        raise ConfigError(f"SparseGPT percdamp must be >= 0, got {percdamp!r}")
    if pattern is not None and blocksize % pattern.m:
        raise ConfigError(f"SparseGPT blocksize {blocksize} must be a multiple of m={pattern.m} "
                          f"for '{pattern}' (N:M groups may not straddle blocks)")
    W = weight.detach().to(torch.float64).clone(memory_format=torch.contiguous_format)
    rows, cols = W.shape
    U, dead = inverse_hessian_factor(hessian, percdamp)
    W[:, dead] = 0.0
    keep = torch.ones(rows, cols, dtype=torch.bool)
    starts = list(range(0, cols, blocksize))
    counts = split_counts(int(prune), [rows * (min(s + blocksize, cols) - s) for s in starts])
    for b, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        err = torch.zeros_like(W1)
        keep1 = torch.ones(W1.shape, dtype=torch.bool)
        if pattern is None and counts[b]:
            score = (W1 / d.unsqueeze(0)).pow(2).reshape(-1)
            keep1.view(-1)[torch.topk(score, counts[b], largest=False).indices] = False
        for i in range(i2 - i1):
            col = i1 + i
            if pattern is not None and col % pattern.m == 0:
                width = min(pattern.m, cols - col)
                drop = width - _group_keep(pattern.n, pattern.m, width)
                if drop:
                    score = (W1[:, i:i + width] / d[i:i + width].unsqueeze(0)).pow(2)
                    idx = torch.topk(score, drop, dim=1, largest=False).indices
                    keep1[:, i:i + width].scatter_(1, idx, False)
            w = W1[:, i]
            e = torch.where(keep1[:, i], torch.zeros_like(w), w) / d[i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, i1:i2] = torch.where(keep1, W1, torch.zeros_like(W1))
        W[:, i2:] -= err @ U[i1:i2, i2:]
        keep[:, i1:i2] = keep1
    return W, keep


class SparseGPTPruner:
    """SparseGPT's cut (:func:`sparsegpt_prune`) on the Hessian of the layer inputs."""

    statistic = "hessian"

    def prune(self, weight: Tensor, stat: Tensor, tokens: int, target: LayerTarget,
              options: Mapping[str, Any]) -> tuple[Tensor | None, Tensor]:
        return sparsegpt_prune(weight, stat / max(int(tokens), 1), prune=target.prune,
                               pattern=target.pattern, blocksize=options["blocksize"],
                               percdamp=options["percdamp"])


register_method(MethodSpec(
    "sparsegpt", SparseGPTMask, {"blocksize": 128, "percdamp": 0.01, "sequential": True},
    granularities=("element", "n:m"), budgets=("sparsity",),
    doc="SparseGPT: inverse-Hessian reconstruction, one-shot from calibration (calibrate).",
))
register_pruner("sparsegpt", SparseGPTPruner())

__all__ = ["SparseGPTMask", "SparseGPTPruner", "sparsegpt_prune", "inverse_hessian_factor"]
