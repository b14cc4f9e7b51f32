"""Guard a capture against random draws made in Python while it runs.

A tracer (torch.fx, or torch.export for Python's ``random`` and NumPy) runs the
model's Python code once; a random draw there (stochastic layer skipping such as
LayerDrop: ``if self.training and torch.rand(()) < p``) is frozen into the graph
as that one outcome. :func:`refuse_random_draws` compares the global RNG states
(torch CPU, ``random``, NumPy) before and after, puts them back when they moved
(capture must not shift the user's random stream) and raises :class:`TraceError`.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch

from sparsify_fx.errors import TraceError

RngStates = tuple[torch.Tensor, Any, Any]


def rng_states() -> RngStates:
    """The global RNG states a model's Python code may draw from."""
    return torch.random.get_rng_state(), random.getstate(), np.random.get_state()


def same_rng_states(a: RngStates, b: RngStates) -> bool:
    return (torch.equal(a[0], b[0]) and a[1] == b[1] and a[2][0] == b[2][0]
            and np.array_equal(a[2][1], b[2][1]) and tuple(a[2][2:]) == tuple(b[2][2:]))


def restore_rng_states(states: RngStates) -> None:
    torch.random.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


@contextlib.contextmanager
def refuse_random_draws(capture: str) -> Iterator[None]:
    """Run a capture; TraceError if it drew random numbers. The RNG states are put back
    whenever they moved, also when the capture itself raises."""
    before = rng_states()
    try:
        yield
    finally:
        drew = not same_rng_states(before, rng_states())
        if drew:
            restore_rng_states(before)
    if drew:
        raise TraceError(
            f"random numbers were drawn in Python while {capture} ran the model (stochastic "
            "layer skipping such as LayerDrop: `if self.training and torch.rand(()) < p`): "
            "the graph would freeze that one draw; the module stays in Python (partial capture)")
