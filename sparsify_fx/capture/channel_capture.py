"""Channel pruning's capture switch: torch.fx, or torch.export when it sees more structure.

Contract, for ``transform(..., granularity="channel", capture="auto", example_inputs=...)``
(no ``target_latency``: the latency table times torch.fx module graphs): when torch.fx
traced the whole model but the channel analysis of its module graph left channels whole
at ops or modules it does not understand (``ChannelGraph.unsupported``), ``transform`` runs
again with ``capture="export"`` (the same arguments, ``dynamic_shapes`` as given) and keeps
the capture with the lower *floor*: the fraction of dense MACs that a MACs cut cannot go
below (channels that must stay whole and one channel per group, the "already take X" of
``apply_budget``; ``floor``, given by ``transform``: budgets/channel_cut.py ``macs_floor``). A switch emits one :class:`CaptureSwitchWarning`
naming both floors, plus the export attempt's own warnings; keeping torch.fx emits only its
own warnings (a failed export attempt says nothing). Models the fx analysis fully
understands and explicit captures are captured once, as before. Each attempt works on its
own deep copy: the user's model is never mutated.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn

from sparsify_fx.passes.stored_analysis import channel_graph_of

#: shared by every replay, so a replayed warning repeats as seldom as one warned directly
_REPLAY_REGISTRY: dict = {}


class CaptureSwitchWarning(UserWarning):
    """``capture="auto"`` returned a torch.export capture although torch.fx traced the model:
    its channel analysis keeps fewer channels whole (both fractions named)."""


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _replay(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                               registry=_REPLAY_REGISTRY, source=w.source)


@contextlib.contextmanager
def _recording() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the outer filters apply when they are replayed
        yield caught


class CaptureSwitch:
    """One ``transform`` call's switch: :meth:`holding` around the fx passes, then
    :meth:`choose` (see the module docstring)."""

    def __init__(self, capture: str, path: str, granularity: str, example_inputs: Any,
                 target_latency: float | None) -> None:
        self.active = (capture == "auto" and path == "fx" and granularity == "channel"
                       and example_inputs is not None and target_latency is None)
        self.held: list[warnings.WarningMessage] = []
        # the RNG as the masks of the fx attempt found it: the export attempt draws the
        # same (mask inits), as a capture="export" call would
        self.rng = _rng_state() if self.active else None

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold the warnings of the block (the fx capture's passes) until :meth:`choose`
        knows whether that capture is kept; a block that raises shows them at once."""
        if not self.active:
            yield
            return
        caught: list[warnings.WarningMessage] = []
        try:
            with _recording() as caught:
                yield
        except BaseException:
            _replay(caught)
            raise
        self.held = list(caught)

    def choose(self, model: nn.Module, transform: Callable[..., nn.Module],
               call: dict[str, Any], floor: Callable[[nn.Module], float]) -> nn.Module | None:
        """The torch.export capture to return instead of ``model`` (the fx capture), or
        None to keep ``model``. ``call``: ``transform``'s arguments as given
        (``method_options`` a dict), repeated with ``capture="export"``. ``floor``: a
        transformed model's MACs floor (see the module docstring)."""
        held, self.held = self.held, []
        unsupported = (channel_graph_of(model).unsupported
                       if self.active and isinstance(model, fx.GraphModule) else [])
        if not unsupported:
            _replay(held)
            return None
        again = {k: v for k, v in call.items() if k not in ("method_options", "capture")}
        after_fx = _rng_state()
        try:
            fx_floor = floor(model)
            _set_rng_state(self.rng)
            with _recording() as export_held:
                exported = transform(**again, **call.get("method_options", {}), capture="export")
                export_floor = floor(exported)
        except Exception:  # noqa: BLE001 - export or its channel walk failed: keep torch.fx
            fx_floor = export_floor = 1.0
        if not export_floor < fx_floor:
            _set_rng_state(after_fx)  # the fx result's RNG stream, as without the attempt
            _replay(held)
            return None
        _replay(export_held)
        shown = "; ".join(unsupported[:3]) + ("; ..." if len(unsupported) > 3 else "")
        warnings.warn(CaptureSwitchWarning(
            f"transform(capture='auto') used torch.export, not torch.fx: the torch.fx channel "
            f"analysis does not understand {len(unsupported)} op(s) ({shown}), so the "
            "channels a MACs cut must keep (those that stay whole, one per group) take "
            f"{fx_floor:.3f} of the dense MACs there, against {export_floor:.3f} on the "
            "torch.export capture (its channel walk reads the ATen ops inside those modules). "
            "Pass capture='fx' to keep the torch.fx GraphModule (target_latency budgets "
            "need one)."),
            stacklevel=3)
        return exported


__all__ = ["CaptureSwitch", "CaptureSwitchWarning"]
