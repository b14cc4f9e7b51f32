"""Close the loop on a latency cut: measure the shrunk model in onnxruntime, correct, re-cut.

The latency table predicts a cut's latency from ops timed alone; the model they add
up to can still run faster or slower (layouts shared between ops, elementwise ops
that shrink with the channels, kernels picked per width). :func:`verified_cut` turns
the prediction into a measurement, as NetAdapt does (Yang et al. 2018): cut, export
and time the shrunk model interleaved with the dense one, and when the measured
fraction misses the target by more than ``tol`` (relative), cut again aiming at
``aim x target / measured`` (a multiplicative secant step on the measured curve), or,
once rounds were measured on both sides of the target, between the two closest
(:func:`next_aim`).
The round whose measurement is closest to the target is kept. Mutates the masks
(through ``cut``) only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from sparsify_fx.errors import BudgetError

#: relative miss accepted without another round (the issue's goal is 10 %)
TOLERANCE = 0.05
#: cuts (the first included) a verified cut may make
MAX_ROUNDS = 4


@dataclass(frozen=True)
class LatencyCheck:
    """One round: the fraction the cut aimed at (in the table's estimate), the estimate
    of what it kept, and the measured fraction of the dense onnxruntime latency."""

    aimed: float
    estimated: float
    measured: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def verified_cut(target: float, cut: Callable[[float], object], estimate: Callable[[], float],
                 measure: Callable[[], float], tol: float | None = None,
                 max_rounds: int | None = None) -> tuple[object, list[LatencyCheck]]:
    """Cut to ``target`` (a fraction of the dense latency) until a measurement agrees.

    ``cut(aim)`` freezes the masks to the table's cut at fraction ``aim`` and returns its
    result; ``estimate()`` is the table's fraction for the current masks; ``measure()``
    times the current masks' shrunk model against the dense one (fraction). Stops when
    ``|measured / target - 1| <= tol`` or after ``max_rounds`` cuts, then leaves the masks
    at the round measured closest to the target. Returns (its cut result, every round).
    ``tol`` / ``max_rounds`` default to :data:`TOLERANCE` / :data:`MAX_ROUNDS` (read at
    call time).
    """
    tol = TOLERANCE if tol is None else tol
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    checks: list[LatencyCheck] = []
    results: list[object] = []
    aim = target
    for _ in range(max(1, max_rounds)):
        try:
            results.append(cut(aim))
        except BudgetError:
            if not checks:
                raise
            break  # a correction below the table's floor: keep the rounds so far
        checks.append(LatencyCheck(aim, estimate(), measure()))
        if abs(checks[-1].measured / target - 1.0) <= tol:
            return results[-1], checks
        nxt = next_aim(checks, target)
        if any(abs(nxt - c.aimed) < 1e-4 for c in checks):
            break  # the correction repeats an earlier round (e.g. clamped at 1.0)
        aim = nxt
    best = checks.index(closest(checks, target))
    if best != len(checks) - 1:
        results[best] = cut(checks[best].aimed)
    return results[best], checks


def next_aim(checks: list[LatencyCheck], target: float) -> float:
    """The next round's aim: when rounds were measured on both sides of ``target``,
    linear interpolation between the closest round below and the closest above (regula
    falsi: a noisy, steep measured curve does not make it oscillate); else the last
    aim times ``target / measured`` (at most 1)."""
    below = [c for c in checks if c.measured < target]
    above = [c for c in checks if c.measured > target]
    if below and above:
        lo = max(below, key=lambda c: c.measured)
        hi = min(above, key=lambda c: c.measured)
        if hi.aimed != lo.aimed:
            t = (target - lo.measured) / (hi.measured - lo.measured)
            return min(1.0, max(1e-6, lo.aimed + t * (hi.aimed - lo.aimed)))
    last = checks[-1]
    return min(1.0, last.aimed * target / max(last.measured, 1e-9))


def closest(checks: list[LatencyCheck], target: float) -> LatencyCheck:
    """The round measured closest to ``target`` (relative); the first of equals."""
    return min(checks, key=lambda c: abs(c.measured / target - 1.0))


def on_rank_zero(run: Callable[[], list[LatencyCheck]]) -> list[LatencyCheck]:
    """``run()`` on rank 0 of a torch.distributed job, its rounds shared with every rank
    (each rank's own timings would differ, and so would its masks); just ``run()``
    outside one. The caller then cuts at the agreed aim on every rank."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return run()
    box = [run() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]
