"""Find the prunable weights of a traced model and how each one can be masked.

A weight is prunable when either

* its owner *in the original model* is a Conv, ConvTranspose or Linear
  (``.weight``) or a MultiheadAttention input projection (``in_proj_weight`` /
  ``q|k|v_proj_weight``). Owner types are looked up in the original model
  because a GraphModule turns submodules reached only through ``get_attr`` into
  plain ``nn.Module``; or
* a ``get_attr`` node feeds it, whatever module owns it, as the *weight
  operand* of a conv/linear/matmul op (:data:`WEIGHT_OPERANDS`): ``F.conv*``,
  ``F.conv_transpose*``, ``F.linear``, the second operand of ``torch.matmul``
  / ``@`` / ``torch.mm`` / ``torch.addmm``, and their ATen forms in
  ``torch.export`` graphs (``aten.linear``, ``aten.conv2d``,
  ``aten.convolution``, ``aten.addmm``, ...). A top-level ``nn.Parameter``
  used by ``F.conv2d`` counts.

Embedding weights are never prunable, and neither is a weight *tied* to one
(GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``): tensors owned by an
``nn.Embedding``/``nn.EmbeddingBag`` or read by an embedding op are excluded.
One tensor reached under several names (tied weights) is one site.

Route ``"graph"``: the weight reaches the graph through ``get_attr`` nodes; a
mask node goes after them. Route ``"parametrize"``: the weight lives inside a
leaf module (or a module no graph covers); it is masked by parametrization.
Nothing is mutated here.
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from sparsify_fx.capture.fx_trace import TRACED_THROUGH
from sparsify_fx.passes.aten.experts import expert_weight_kind

ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def weight_kind(owner: nn.Module, attr: str) -> str | None:
    """Op kind of ``owner.<attr>`` if it is prunable, else None."""
    if isinstance(owner, nn.MultiheadAttention):
        return "attention_in_proj" if attr in ATTENTION_WEIGHTS else None
    if attr != "weight" or not isinstance(owner, TRACED_THROUGH):
        return None
    if isinstance(owner, nn.Linear):
        return "linear"
    if isinstance(owner, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "conv_transpose"
    groups = getattr(owner, "groups", 1)
    if groups > 1 and groups == owner.in_channels:
        return "depthwise_conv"
    return "grouped_conv" if groups > 1 else "conv"


def conv_weight_kind(shape: Sequence[int], groups: int, transposed: bool) -> str:
    """Kind of a conv weight from its shape and ``groups`` (depthwise: one input channel
    per group)."""
    if transposed:
        return "conv_transpose"
    if groups > 1:
        return "depthwise_conv" if int(shape[1]) == 1 else "grouped_conv"
    return "conv"


def _conv_op(groups_at: int, transposed_at: int | None = None,
             transposed: bool = False) -> Callable[[fx.Node, Sequence[int]], str]:
    def kind(node: fx.Node, shape: Sequence[int]) -> str:
        groups = _operand(node, groups_at, "groups", 1)
        flag = (_operand(node, transposed_at, "transposed", transposed) if transposed_at
                else transposed)
        return conv_weight_kind(shape, int(groups) if isinstance(groups, int) else 1, bool(flag))
    return kind


def _fixed(kind: str) -> Callable[[fx.Node, Sequence[int]], str]:
    return lambda node, shape: kind


def _operand(node: fx.Node, index: int, key: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


_aten = torch.ops.aten
#: op -> (index of the weight operand, its keyword name, kind of the weight given node and shape).
#: FX-level functions and ATen overload packets (any overload) alike.
WEIGHT_OPERANDS: dict[Any, tuple[int, str, Callable[[fx.Node, Sequence[int]], str]]] = {
    F.linear: (1, "weight", _fixed("linear")),
    torch.conv1d: (1, "weight", _conv_op(6)),
    torch.conv2d: (1, "weight", _conv_op(6)),
    torch.conv3d: (1, "weight", _conv_op(6)),
    torch.conv_transpose1d: (1, "weight", _conv_op(6, transposed=True)),
    torch.conv_transpose2d: (1, "weight", _conv_op(6, transposed=True)),
    torch.conv_transpose3d: (1, "weight", _conv_op(6, transposed=True)),
    torch.matmul: (1, "other", _fixed("matmul")),
    operator.matmul: (1, "other", _fixed("matmul")),
    torch.mm: (1, "mat2", _fixed("matmul")),
    torch.addmm: (2, "mat2", _fixed("matmul")),
    _aten.linear: (1, "weight", _fixed("linear")),
    _aten.conv1d: (1, "weight", _conv_op(6)),
    _aten.conv2d: (1, "weight", _conv_op(6)),
    _aten.conv3d: (1, "weight", _conv_op(6)),
    _aten.convolution: (1, "weight", _conv_op(8, transposed_at=6)),
    _aten._convolution: (1, "weight", _conv_op(8, transposed_at=6)),
    _aten.conv_transpose1d: (1, "weight", _conv_op(6, transposed=True)),
    _aten.conv_transpose2d: (1, "weight", _conv_op(6, transposed=True)),
    _aten.conv_transpose3d: (1, "weight", _conv_op(6, transposed=True)),
    _aten.matmul: (1, "other", _fixed("matmul")),
    _aten.mm: (1, "mat2", _fixed("matmul")),
    _aten.addmm: (2, "mat2", _fixed("matmul")),
}
_METHODS = {"matmul": torch.matmul, "__matmul__": operator.matmul, "mm": torch.mm,
            "addmm": torch.addmm}
EMBEDDING_OPS = (F.embedding, F.embedding_bag, _aten.embedding, _aten.embedding_bag,
                 _aten._embedding_bag)


def _op_key(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


def operand_kind(node: fx.Node, shape: Sequence[int]) -> str | None:
    """Kind of the weight a get_attr ``node`` feeds as a conv/linear/matmul weight operand."""
    for user in node.users:
        if user.op not in ("call_function", "call_method"):
            continue
        target = _METHODS.get(user.target) if user.op == "call_method" else user.target
        try:
            entry = WEIGHT_OPERANDS.get(_op_key(target))
        except TypeError:  # unhashable target
            entry = None
        if entry is None:
            continue
        index, key, kind = entry  # methods: self is args[0], so `x.mm(w)` matches torch.mm
        if _operand(user, index, key) is node:
            return kind(user, shape)
    return None


def _feeds_embedding(node: fx.Node) -> bool:
    return any(u.op == "call_function" and _op_key(u.target) in EMBEDDING_OPS
               and _operand(u, 0, "weight") is node for u in node.users)


def embedding_tensor_ids(root: nn.Module, original: nn.Module,
                         graphs: dict[str, fx.GraphModule]) -> set[int]:
    """ids of the tensors in ``root`` that are embedding weights (or tied to one)."""
    ids: set[int] = set()
    for path, module in original.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            try:
                ids.add(id(root.get_parameter(_join(path, "weight"))))
            except AttributeError:
                pass
    for gm in graphs.values():
        for node in gm.graph.nodes:
            if node.op == "get_attr" and _feeds_embedding(node):
                ids.add(id(_fetch(gm, node.target)))
    return ids


def _fetch(gm: nn.Module, target: str) -> Any:
    owner_path, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner_path), attr, None)


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Qualified names of every prunable weight in a plain module (module order)."""
    names = []
    for path, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if param is not None and weight_kind(module, attr) is not None:
                names.append(f"{path}.{attr}" if path else attr)
    return names


@dataclass
class WeightSite:
    """One prunable weight.

    ``name``: qualified name in the original model. ``host``: the module holding
    the weight in the transformed tree, ``host_path`` its path there, ``attr``
    the parameter name. ``nodes``: get_attr nodes (route "graph" only) in the
    GraphModule ``graph_module``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    route: str
    host: nn.Module
    attr: str
    graph_module: fx.GraphModule | None = None
    nodes: list[fx.Node] = field(default_factory=list)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _first_use(graphs: dict[str, fx.GraphModule]) -> Callable[[WeightSite], tuple[int, int]]:
    """Sort key: graph, then position of the first op reading the weight (torch.export
    hoists every get_attr to the top of the graph, so node order alone is not use order)."""
    order = {id(gm): i for i, gm in enumerate(graphs.values())}
    position = {n: i for gm in graphs.values() for i, n in enumerate(gm.graph.nodes)}

    def key(site: WeightSite) -> tuple[int, int]:
        uses = [position[u] for n in site.nodes for u in n.users] or [position[site.nodes[0]]]
        return order[id(site.graph_module)], min(uses)
    return key


def find_weight_sites(root: nn.Module, original: nn.Module,
                      graphs: dict[str, fx.GraphModule]) -> list[WeightSite]:
    """List prunable weights of ``root`` (graph order first, then leaf order).

    ``graphs`` maps a path in ``root`` (``""`` for the root itself) to the
    GraphModule traced or exported there; ``original`` is an untouched copy with
    the same paths, used to look owner types up. Embedding (and tied embedding)
    weights are left out; a tensor reached under several names is one site.
    """
    skip = embedding_tensor_ids(root, original, graphs)
    sites: dict[int, WeightSite] = {}
    for prefix, gm in graphs.items():
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            tensor = _fetch(gm, node.target)
            if not isinstance(tensor, nn.Parameter) or id(tensor) in skip:
                continue
            if id(tensor) in sites:
                sites[id(tensor)].nodes.append(node)
                continue
            owner_path, _, attr = node.target.rpartition(".")
            try:
                owner = original.get_submodule(_join(prefix, owner_path))
            except AttributeError:
                owner = None
            kind = weight_kind(owner, attr) if owner is not None else None
            kind = kind or operand_kind(node, tensor.shape) or expert_weight_kind(node, tensor.shape)
            if kind is None:
                continue
            sites[id(tensor)] = WeightSite(_join(prefix, node.target), kind, tuple(tensor.shape),
                                           "graph", gm.get_submodule(owner_path), attr, gm, [node])
    graph_sites = sorted(sites.values(), key=_first_use(graphs))
    sites = {id(getattr(s.host, s.attr)): s for s in graph_sites}
    for path, module in root.named_modules(remove_duplicate=True):
        for attr, param in module.named_parameters(recurse=False):
            if param is None or id(param) in sites or id(param) in skip:
                continue
            try:
                owner = original.get_submodule(path)
            except AttributeError:
                owner = module
            kind = weight_kind(owner, attr)
            if kind is not None:
                sites[id(param)] = WeightSite(_join(path, attr), kind, tuple(param.shape),
                                              "parametrize", module, attr)
    return list(sites.values())


def select_sites(sites: list[WeightSite], include: Sequence[str] | None,
                 exclude: Sequence[str] | None, keep_first: bool,
                 keep_last: bool) -> list[WeightSite]:
    """Apply name globs (matched against the weight name and its module path)."""
    def matches(site: WeightSite, patterns: Sequence[str]) -> bool:
        module_path = site.name.rpartition(".")[0]
        return any(fnmatch.fnmatchcase(site.name, p) or fnmatch.fnmatchcase(module_path, p)
                   for p in patterns)

    chosen = list(sites)
    if keep_first and chosen:
        chosen = chosen[1:]
    if keep_last and chosen:
        chosen = chosen[:-1]
    if include:
        chosen = [s for s in chosen if matches(s, include)]
    if exclude:
        chosen = [s for s in chosen if not matches(s, exclude)]
    return chosen
