"""What each masked weight multiplies: its input activations during a forward pass.

A forward hook on every mask module remembers the masked weight it returns; a
``TorchFunctionMode`` then sees the op that consumes that exact tensor and hands the
op's other operand (the layer input) to a callback. This works the same on fx graphs,
torch.export graphs (``aten.linear`` / ``aten.addmm`` / ``aten.mm``) and parametrized
leaf modules, because it looks at tensors, not at graph structure.

Rule for the input operand: the argument just before the weight (``linear(x, w, b)``,
``addmm(b, x, w)``, ``mm(x, w)``, ``x @ w``). The input is returned as a 2-D float
``(tokens, in_features)`` view; nothing here mutates the model (hooks are removed on exit).
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from sparsify_fx.errors import ConfigError
from sparsify_fx.mask_index import MaskEntry

#: the kinds whose input is a (..., in_features) activation and whose weight is 2-D
SUPPORTED_KINDS = ("linear", "matmul")

OnInput = Callable[[str, Tensor], None]


class StopForward(Exception):
    """Raised by a callback to end a forward pass early (everything needed was seen)."""


def in_features(entry: MaskEntry) -> int:
    """Input width of a masked weight: dim 1 of a Linear ``(out, in)``, dim 0 of a matmul
    ``(in, out)`` operand (GPT-2's Conv1D)."""
    shape = entry.mask.weight_shape
    return int(shape[0] if entry.kind == "matmul" else shape[1])


def check_kinds(entries: Sequence[MaskEntry], method: str) -> None:
    """ConfigError naming the first masked weight that is not a 2-D linear/matmul weight."""
    for e in entries:
        if e.kind not in SUPPORTED_KINDS or len(e.mask.weight_shape) != 2:
            raise ConfigError(
                f"method {method!r} prunes Linear and matmul weights (layer inputs of shape "
                f"(..., in_features)), but {e.name} is a {e.kind or 'unknown'} weight of shape "
                f"{e.mask.weight_shape}; leave it out with exclude=[{e.name!r}] or use "
                "method='magnitude' for it")


class _Mode(TorchFunctionMode):
    def __init__(self, produced: dict[int, tuple[str, weakref.ref]], on_input: OnInput) -> None:
        super().__init__()
        self.produced = produced
        self.on_input = on_input

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self.produced:
            for pos, a in enumerate(args):
                hit = self.produced.get(id(a)) if isinstance(a, Tensor) else None
                if hit is not None and hit[1]() is a:
                    name = hit[0]
                    x = args[pos - 1] if pos >= 1 else None
                    if not isinstance(x, Tensor):
                        raise ConfigError(
                            f"masked weight {name} is used as the first operand of {func} "
                            "(weight @ x), so it has no (..., in_features) input to calibrate "
                            f"on; exclude it with exclude=[{name!r}]")
                    self.on_input(name, x)
        return func(*args, **kwargs)


@contextlib.contextmanager
def watch_inputs(entries: Sequence[MaskEntry], on_input: OnInput) -> Iterator[None]:
    """While active, every consumption of a masked weight in ``entries`` calls
    ``on_input(weight name, input)`` with the raw input operand (any shape ``(..., in)``).
    Call the model inside; hooks and the mode are removed on exit. Holds no tensor alive
    (weak references: a masked weight is freed after its use as in a plain forward)."""
    produced: dict[int, tuple[str, weakref.ref]] = {}
    handles = []
    for e in entries:
        def hook(_mod: nn.Module, _inp: Any, out: Tensor, name: str = e.name) -> None:
            produced[id(out)] = (name, weakref.ref(out))  # checked by identity when used
        handles.append(e.mask.register_forward_hook(hook))
    try:
        with _Mode(produced, on_input):
            yield
    finally:
        for h in handles:
            h.remove()
        produced.clear()


def rows_of(x: Tensor, width: int, name: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """``x`` ``(..., width)`` as a ``(tokens, width)`` matrix of ``dtype`` (float64 by
    default); ConfigError otherwise."""
    if x.shape[-1] != width:
        raise ConfigError(f"the input of {name} has last dim {x.shape[-1]}, expected its "
                          f"{width} input features; exclude it with exclude=[{name!r}]")
    return x.detach().reshape(-1, width).to(dtype)


@dataclass
class Group:
    """Masked weights that read the same input tensor (q/k/v, gate/up): one statistic."""

    names: list[str]
    #: how many times each forward consumes each weight (all must be seen per batch)
    uses: int = 1
    width: int = 0


def discover_groups(entries: Sequence[MaskEntry], run: Callable[[], Any]) -> list[Group]:
    """Run ``run()`` (one forward) once and group the masked weights by the input tensors
    they consume, in execution order. Weights consumed with identical inputs (same tensors,
    same number of times) share a group. ConfigError for a weight the forward never uses.
    Inputs are told apart by identity through weak references, so no activation is kept."""
    live: list[tuple[weakref.ref, int]] = []  # input tensors still alive -> serial number
    per_weight: dict[str, list[int]] = {}
    serials = itertools.count()

    def on_input(name: str, x: Tensor) -> None:
        live[:] = [(r, n) for r, n in live if r() is not None]
        serial = next((n for r, n in live if r() is x), None)
        if serial is None:
            serial = next(serials)
            live.append((weakref.ref(x), serial))
        per_weight.setdefault(name, []).append(serial)

    with watch_inputs(entries, on_input):
        run()
    missing = [e.name for e in entries if e.name not in per_weight]
    if missing:
        raise ConfigError(
            f"masked weight {missing[0]} (and {len(missing) - 1} more) never ran in the "
            "forward on the calibration batch, so it has no inputs to calibrate on; "
            f"exclude it with exclude=[{missing[0]!r}] or pass inputs that use it")
    width = {e.name: in_features(e) for e in entries}
    groups: list[tuple[list[int], Group]] = []
    for name, ids in per_weight.items():  # dict order: first use
        same = [g for key, g in groups if key == ids and g.width == width[name]]
        if same:
            same[0].names.append(name)
        else:
            groups.append((ids, Group([name], len(ids), width[name])))
    return [g for _, g in groups]


__all__ = ["SUPPORTED_KINDS", "StopForward", "in_features", "check_kinds", "watch_inputs",
           "rows_of", "Group", "discover_groups"]
