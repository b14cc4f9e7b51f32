"""Mixture-of-experts rules of the ATen channel walk (read-only).

Experts stored as fused 3-D parameters (``gate_up_proj`` ``(E, 2I, H)``, ``down_proj``
``(E, H, I)``, or transposed ``(E, in, out)``) and called through a *grouped matmul*
(``transformers::grouped_mm_fallback``, ``aten._grouped_mm``: ``(S, in) x (E, in, out)``,
the rows of ``S`` sorted by expert, ``offs`` the cumulative rows per expert):

* a grouped matmul with a 3-D parameter operand is a *producer* of kind ``"experts"``:
  its ``out`` channels get new ids **shared by every expert** (unit ``i`` is removed
  from all experts of the layer at once, so the fused tensor stays one tensor of the
  same width per expert, and a uniform cut is a config width); its input channels are
  read like a linear's. Its MACs follow the weight: the parameter's expert count is
  recorded as a trailing "kernel" dim of :attr:`Producer.shape`, so the weight cost
  (dense MACs / (batch x numel)) times ``E`` is the MACs of one (out, in) pair;
* routing reads only the router's output: ``topk`` / ``sort`` / ``kthvalue`` /
  ``argsort`` of a tracked value keep the channels ranked over whole (the router's
  columns: experts are never removed here) and carry no channel further;
* ``index`` / ``gather`` / ``index_select`` picking positions along dims where every
  position holds the same channel ids (tokens routed to experts: ``x[perm // k]``)
  keep the channel ids; picking along a dim whose ids vary keeps those whole (named,
  unless they are whole already, as the router's probabilities after ``topk``).

An expert parameter read by anything else (a per-expert loop ``w[e]``, a bias picked
per token) stays whole, named by the walk's usual rules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from sparsify_fx.mask import MaskSet, SharedChannelMask
from sparsify_fx.passes.aten.grouped import gather_fibres
from sparsify_fx.passes.aten.values import DerivedParam, ParamRef, Tracked, concrete_shape
from sparsify_fx.passes.channels.graph_types import Producer

if TYPE_CHECKING:
    from sparsify_fx.passes.aten.channel_walk import AtenChannelWalk

#: grouped matmuls over per-expert weights ``(S, in) x (E, in, out) -> (S, out)``
GROUPED_MM = {"grouped_mm_fallback", "_grouped_mm", "grouped_mm"}
#: selection by value (router top-k): the ranked channels stay whole
SELECT_OPS = {"topk", "sort", "argsort", "kthvalue", "msort"}
#: picking positions by an index tensor
GATHER_OPS = {"index", "gather", "index_select"}
EXPERT_OPS = GROUPED_MM | SELECT_OPS | GATHER_OPS
#: the producer kind of a grouped matmul over 3-D expert weights
EXPERTS = "experts"


def visit_expert_op(walk: "AtenChannelWalk", node: fx.Node, name: str) -> Any:
    """Dispatch of :data:`EXPERT_OPS` (see module doc)."""
    if name in GROUPED_MM:
        return _grouped_mm(walk, node)
    if name in SELECT_OPS:
        return _select(walk, node)
    if name == "index":
        return _index(walk, node)
    return _gather(walk, node, name)


# -- grouped matmul --------------------------------------------------------------------
def _param_shape(walk: "AtenChannelWalk", name: str) -> tuple[int, ...]:
    owner, _, attr = name.rpartition(".")
    mod = walk.gm.get_submodule(owner) if owner else walk.gm
    return tuple(getattr(mod, attr).shape)


def _input_ids(walk: "AtenChannelWalk", x: Any, width: int) -> Any:
    """Ids of the contracted (last) input dim, or whole ones; ids that may be non-zero
    while pruned stay whole (as for a linear's input)."""
    if not isinstance(x, Tracked):
        return walk.emit(torch.full((width,), -1, dtype=torch.long))
    ids = x.ids.reshape(-1, x.ids.shape[-1])
    zero = x.zero.reshape(-1, x.ids.shape[-1])
    walk.whole.update(torch.unique(ids[(ids >= 0) & ~zero]).tolist())
    if ids.shape[-1] != width or not bool((ids == ids[0]).all()):
        walk.make_whole(x)
        return walk.emit(torch.full((width,), -1, dtype=torch.long))
    return walk.emit(ids[0])


def _grouped_mm(walk: "AtenChannelWalk", node: fx.Node) -> Any:
    ref = walk.value(node.args[1])
    if not isinstance(ref, ParamRef):
        if isinstance(walk.value(node.args[0]), Tracked) or isinstance(ref, Tracked):
            return walk.reject(node, "grouped matmul whose weight is not a 3-D parameter")
        return None
    stored = _param_shape(walk, ref.name)
    if len(stored) != 3:
        return walk.reject(node, "grouped matmul whose weight is not a 3-D parameter")
    experts = stored[0]
    # the operand is (E, in, out): the parameter itself ("io"), or (E, out, in) transposed
    in_ch, out_ch = (stored[2], stored[1]) if ref.transposed else (stored[1], stored[2])
    layout = "oi" if ref.transposed else "io"
    index = len(walk.producers)
    masked = ref.name in walk.masked
    out_ids = walk.new_ids(out_ch, index if masked else -1)
    if not masked:
        walk.whole.update(out_ids.tolist())
    in_ids = _input_ids(walk, walk.value(node.args[0]), in_ch)
    bias = walk.__dict__.get("expert_biases", {}).get(node.name)
    walk.producers[node.name] = Producer(node.name, ref.name, bias, ref.masked, EXPERTS, 1,
                                         out_ids.numpy(), in_ids, (out_ch, in_ch, experts),
                                         weight_layout=layout)
    out_shape = walk.shape(node)
    view = [1] * (len(out_shape) - 1) + [out_ch]
    return Tracked(out_ids.reshape(view).expand(out_shape), torch.ones(out_shape, dtype=torch.bool))


# -- routing ---------------------------------------------------------------------------
def _select(walk: "AtenChannelWalk", node: fx.Node) -> Any:
    """Values ranked along a dim: what is ranked stays whole; nothing flows on."""
    walk.make_whole(walk.value(node.args[0]))
    val = node.meta.get("val")
    return tuple(None for _ in val) if isinstance(val, (list, tuple)) else None


def _constant_along(t: Tracked, dims: list[int]) -> bool:
    for d in dims:
        if t.ids.shape[d] > 1 and not (bool((t.ids == t.ids.narrow(d, 0, 1)).all())
                                       and bool((t.zero == t.zero.narrow(d, 0, 1)).all())):
            return False
    return True


def _vary(walk: "AtenChannelWalk", node: fx.Node, x: Tracked, what: str) -> Any:
    """Positions picked along a dim whose channel ids vary: those stay whole (named
    unless they are whole already)."""
    ids = set(torch.unique(x.ids[x.ids >= 0]).tolist())
    if ids <= walk.whole:
        return None
    return walk.reject(node, f"{what} picks positions along a channel dim")


def _index(walk: "AtenChannelWalk", node: fx.Node) -> Any:
    """``x[..., idx, ...]`` (``aten.index.Tensor``) with one index tensor."""
    x = walk.value(node.args[0])
    indices = list(node.args[1])
    if isinstance(x, ParamRef):  # a parameter picked per token (an expert bias b[ids])
        bias = _expert_bias(walk, node, x)
        return bias if bias is not None else DerivedParam(x.name)  # else: whole, named
    if not isinstance(x, Tracked):
        return walk.reject(node, "index with channels in its index tensors")
    if any(isinstance(walk.value(i), Tracked) for i in indices):
        return walk.reject(node, "index with channels in its index tensors")
    at = [d for d, i in enumerate(indices) if i is not None]
    out_shape = concrete_shape(node)
    if len(at) != 1 or out_shape is None:
        return walk.reject(node, "index with several index tensors")
    d = at[0]
    if not _constant_along(x, [d]):
        return _vary(walk, node, x, "index")
    idx_rank = len(out_shape) - x.ids.dim() + 1
    shape = (*x.ids.shape[:d], *(1,) * idx_rank, *x.ids.shape[d + 1:])
    ids = x.ids.narrow(d, 0, 1).reshape(shape).expand(out_shape)
    zero = x.zero.narrow(d, 0, 1).reshape(shape).expand(out_shape)
    return Tracked(ids.contiguous(), zero.contiguous())


def _param_of(node: Any) -> tuple[str | None, bool]:
    """The parameter an operand node reads (through mask nodes and transposes) and
    whether it is read transposed."""
    transposed = False
    while isinstance(node, fx.Node) and (node.op == "call_module" or (
            node.op == "call_function" and _op(node) in ("transpose", "permute", "mT"))):
        transposed ^= node.op == "call_function"
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target), transposed
    return None, False


def _expert_bias(walk: "AtenChannelWalk", node: fx.Node, ref: ParamRef) -> Tracked | None:
    """``b[expert_ids]`` of a ``(E, out)`` parameter added to a grouped matmul's output
    (``out.add_(b[ids])``): that producer's bias (gated with its units, sliced with them);
    the value carries no ids of its own and is 0 where a unit is pruned."""
    shape = _param_shape(walk, ref.name)
    out_shape = concrete_shape(node)
    if len(shape) != 2 or len(node.args[1]) != 1 or out_shape is None:
        return None
    for user in node.users:
        if _op(user) not in ("add", "add_") or len(user.args) != 2:
            continue
        mm = user.args[0] if user.args[1] is node else user.args[1]
        if not (isinstance(mm, fx.Node) and _op(mm) in GROUPED_MM and len(mm.args) > 1):
            continue
        weight, transposed = _param_of(mm.args[1])
        stored = _param_shape(walk, weight) if weight is not None else ()
        if len(stored) != 3 or (stored[0], stored[1] if transposed else stored[2]) != shape:
            continue
        biases = walk.__dict__.setdefault("expert_biases", {})
        biases[mm.name] = ref.name
        if mm.name in walk.producers:  # the matmul came first in the graph
            walk.producers[mm.name].bias = ref.name
        return Tracked(torch.full(out_shape, -1, dtype=torch.long),
                       torch.ones(out_shape, dtype=torch.bool))
    return None


def _gather(walk: "AtenChannelWalk", node: fx.Node, name: str) -> Any:
    """``gather(x, dim, idx)`` / ``index_select(x, dim, idx)``."""
    x = walk.value(node.args[0])
    if isinstance(x, ParamRef):
        return DerivedParam(x.name)
    if not isinstance(x, Tracked) or isinstance(walk.value(node.args[2]), Tracked):
        return walk.reject(node, f"{name} with channels in its index")
    d = int(node.args[1]) % x.ids.dim()
    out_shape = concrete_shape(node)
    if out_shape is None:
        return walk.reject(node, f"{name} output shape unknown")
    if not _constant_along(x, [d]):
        x = gather_fibres(walk, x, d)  # each fibre's sets tied, or None
        if x is None:
            return _vary(walk, node, walk.value(node.args[0]), name)
    ids, zero = x.ids.narrow(d, 0, 1), x.zero.narrow(d, 0, 1)
    for other in range(x.ids.dim()):
        if other != d and out_shape[other] != ids.shape[other]:
            ids, zero = ids.narrow(other, 0, out_shape[other]), zero.narrow(other, 0, out_shape[other])
    return Tracked(ids.expand(out_shape).contiguous(), zero.expand(out_shape).contiguous())


def clamp_keeps_zero(node: fx.Node, name: str) -> bool:
    """``clamp`` / ``clamp_min`` / ``clamp_max`` with constant bounds around 0 maps 0 to 0
    (a gated expert's ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``)."""
    if name not in ("clamp", "clamp_min", "clamp_max"):
        return False
    args = list(node.args[1:]) + [None] * 2
    low = node.kwargs.get("min", args[0] if name != "clamp_max" else None)
    high = node.kwargs.get("max", args[1] if name == "clamp" else args[0] if name == "clamp_max"
                           else None)
    for bound, ok in ((low, lambda v: v <= 0), (high, lambda v: v >= 0)):
        if isinstance(bound, fx.Node) or (bound is not None and not isinstance(bound, (int, float))):
            return False
        if bound is not None and not ok(float(bound)):
            return False
    return True


# -- weights and masks -------------------------------------------------------------------
def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def expert_weight_kind(node: fx.Node, shape: Any) -> str | None:
    """:data:`EXPERTS` when the ``get_attr`` ``node`` (a 3-D parameter) is the weight
    operand of a grouped matmul, directly or through a transpose of its last two dims."""
    if len(tuple(shape)) != 3:
        return None
    frontier = [node]
    for _ in range(2):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op != "call_function":
                    continue
                if _op(user) in GROUPED_MM and len(user.args) > 1 and user.args[1] is n:
                    return EXPERTS
                if _op(user) in ("transpose", "permute", "mT"):
                    nxt.append(user)
        frontier = nxt
    return None


def mask_expert_bias(gm: fx.GraphModule, prod: Producer, sources: list, index: torch.Tensor,
                     device: torch.device) -> None:
    """A follower mask (gating dim 1 with the producer's units) between an expert bias
    ``(E, out)`` and the ops reading it; mutates ``gm``."""
    node = next((n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) == prod.bias),
                None)
    if node is None or prod.bias is None:
        return
    mask_set = getattr(gm, MaskSet.ATTRIBUTE)
    key = MaskSet.key_for(prod.bias)
    while key in mask_set:
        key += "_"
    shape = tuple(gm.get_parameter(prod.bias).shape)
    mask_set[key] = SharedChannelMask(shape, sources, index.to(device), prod.bias, "bias",
                                      auxiliary=True, channel_dim=1).to(device)
    users = [u for u in node.users if not (u.op == "call_module" and str(u.target).startswith(
        MaskSet.ATTRIBUTE + "."))]
    with gm.graph.inserting_after(node):
        masked = gm.graph.call_module(f"{MaskSet.ATTRIBUTE}.{key}", (node,))
    for user in users:
        user.replace_input_with(node, masked)


def uniform_classes(graph: fx.GraphModule, cg: Any, signature: Any
                    ) -> tuple[dict[tuple, list[int]], dict[tuple, int], dict[int, int]]:
    """Group indices of ``cg`` by what one uniform width must cover: ``(classes, steps,
    multiples)``. Most groups: ``signature(group)`` (the structure), step 1. The experts
    groups of ``n`` units form one class (step: the grouped-matmul alignment, ``16 /
    itemsize`` units) with every MLP group inside the module holding experts (a shared
    expert) whose unit count is a multiple ``m x n`` of theirs: the config field holding the
    experts' width holds it too (``moe_intermediate_size x n_shared_experts``), so it keeps
    ``m`` units per expert unit kept (``multiples[group index] = m``)."""
    attention = {int(g) for p in cg.producers.values() if p.kind == "attention_matmul"
                 for g in cg.slots(p.out_ids)[0] if g >= 0}
    align: dict[int, int] = {}
    parents: dict[str, int] = {}  # module holding an experts module -> its unit count
    for g in cg.groups:
        for p in g.producers:
            prod = cg.producers[p]
            if prod.kind == EXPERTS:
                n = len(g.components)
                size = graph.get_parameter(prod.weight).element_size()
                align[n] = max(align.get(n, 1), 16 // size)
                parents[prod.weight.rpartition(".")[0].rpartition(".")[0]] = n
    classes: dict[tuple, list[int]] = {}
    steps: dict[tuple, int] = {}
    multiples: dict[int, int] = {}
    for g in cg.groups:
        n, key = len(g.components), None
        kinds = {cg.producers[p].kind for p in g.producers}
        if EXPERTS in kinds:
            key = ("units", n)
        elif g.index not in attention:
            weights = [cg.producers[p].weight for p in g.producers]
            for parent, units in parents.items():
                prefix = parent + "." if parent else ""
                if n % units == 0 and weights and all(w.startswith(prefix) for w in weights):
                    key, multiples[g.index] = ("units", units), n // units
        key = key or signature(g)
        classes.setdefault(key, []).append(g.index)
        steps[key] = align.get(key[1], 1) if key[0] == "units" else 1
    return classes, steps, multiples


def mask_channel_dim(prod: Producer) -> int:
    """The weight dim a producer's channel mask gates: 0 for ``(out, in)``, 1 for
    ``(in, out)``; expert weights: 1 for ``(E, out, in)``, 2 for ``(E, in, out)``."""
    if prod.kind == EXPERTS:
        return 1 if prod.weight_layout == "oi" else 2
    return 1 if prod.weight_layout == "io" else 0


__all__ = ["visit_expert_op", "uniform_classes", "mask_expert_bias", "clamp_keeps_zero", "expert_weight_kind", "mask_channel_dim", "EXPERT_OPS",
           "GROUPED_MM", "SELECT_OPS", "GATHER_OPS", "EXPERTS"]
