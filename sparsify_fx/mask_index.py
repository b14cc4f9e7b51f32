"""Find every mask in a transformed model: graph-level mask nodes and parametrizations.

Read-only: nothing here mutates the model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, fx, nn

from sparsify_fx.errors import InputError
from sparsify_fx.mask import Mask, MaskSet


@dataclass(frozen=True)
class MaskEntry:
    """One masked weight.

    ``name``: the weight's qualified name in the original model
    (``layer1.0.conv1.weight``). ``host``/``attr``: where the raw weight lives in
    the transformed model. ``route``: ``"graph"`` (mask node) or
    ``"parametrize"``. ``graph_module``/``node``: the mask node (graph route).
    """

    name: str
    mask: Mask
    host: nn.Module
    attr: str
    route: str
    graph_module: fx.GraphModule | None = None
    node: fx.Node | None = None

    @property
    def weight(self) -> Tensor:
        """The raw (unmasked) weight tensor, shape ``mask.weight_shape``."""
        if self.route == "parametrize":
            return getattr(self.host.parametrizations, self.attr).original
        return getattr(self.host, self.attr)

    @property
    def kind(self) -> str:
        return self.mask.kind


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel wrappers."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model "
            "returned by sparsify_fx.transform"
        )
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def main_graph(model: nn.Module) -> fx.GraphModule | None:
    """The one graph channel analyses read: ``model`` itself when it is a GraphModule, the
    train-mode graph of a torch.export capture (``train_graph``), else None."""
    model = unwrap(model)
    if isinstance(model, fx.GraphModule):
        return model
    graph = getattr(model, "train_graph", None)
    return graph if isinstance(graph, fx.GraphModule) else None


def _graph_entries(gm: fx.GraphModule) -> Iterator[MaskEntry]:
    seen: set[int] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(MaskSet.ATTRIBUTE + "."):
            continue
        mask = gm.get_submodule(node.target)
        if id(mask) in seen or not isinstance(mask, Mask):
            continue
        seen.add(id(mask))
        source = node.args[0]
        owner_path, _, attr = source.target.rpartition(".")
        yield MaskEntry(mask.weight_name, mask, gm.get_submodule(owner_path), attr,
                        "graph", gm, node)


def masks(model: nn.Module) -> list[MaskEntry]:
    """Every mask in ``model`` with the weight it masks, in graph then module order."""
    model = unwrap(model)
    entries: list[MaskEntry] = []
    seen: set[int] = set()  # a mask shared by two graphs (train/eval exports) is listed once
    for module in model.modules():
        if isinstance(module, fx.GraphModule) and hasattr(module, MaskSet.ATTRIBUTE):
            entries.extend(e for e in _graph_entries(module)
                           if id(e.mask) not in seen and not seen.add(id(e.mask)))
        plists = getattr(module, "parametrizations", None)
        if not isinstance(plists, nn.Module):
            continue
        # a traced copy keeps `parametrizations` as a plain Module holding the lists
        for attr, plist in plists.named_children():
            for p in plist.children():
                if isinstance(p, Mask):
                    entries.append(MaskEntry(p.weight_name, p, module, attr, "parametrize"))
    return entries


def mask_modules(model: nn.Module) -> list[Mask]:
    return [e.mask for e in masks(model)]


def set_hard(model: nn.Module, hard: bool = True) -> None:
    """Switch every mask to its binary (``hard=True``) or soft form. Mutates masks."""
    for m in mask_modules(model):
        m.hard = hard


@contextlib.contextmanager
def hard_masks(model: nn.Module, hard: bool = True) -> Iterator[nn.Module]:
    """Context manager: evaluate with binary masks, restoring each mask's mode after."""
    ms = mask_modules(model)
    before = [m.hard for m in ms]
    for m in ms:
        m.hard = hard
    try:
        yield model
    finally:
        for m, h in zip(ms, before):
            m.hard = h


def sparsity(model: nn.Module, per_layer: bool = False,
             kind: str = "hard") -> float | dict[str, float]:
    """Fraction of masked weights that are zero, counted from the mask tensors.

    ``kind="hard"``: the binary mask. ``kind="soft"``: one minus the mean soft
    mask value (divided by the method's scale), i.e. the expected sparsity.
    ``per_layer=True`` returns ``{weight name: sparsity}``.
    """
    if kind not in ("hard", "soft"):
        raise InputError(f"sparsity kind must be 'hard' or 'soft', got {kind!r}")
    entries = [e for e in masks(model) if not e.mask.auxiliary]
    if not entries:
        raise InputError("model has no sparsify_fx masks; call sparsify_fx.transform first")
    zeros: dict[str, float] = {}
    total: dict[str, int] = {}
    with torch.no_grad():
        for e in entries:
            m = e.mask
            if kind == "hard":
                kept = float(m.kept_weights())
            else:
                kept = float(m.soft_mask().float().sum() / m.scale) * m.weights_per_score
            zeros[e.name] = m.numel() - kept
            total[e.name] = m.numel()
    if per_layer:
        return {n: zeros[n] / total[n] for n in zeros}
    return sum(zeros.values()) / sum(total.values())
