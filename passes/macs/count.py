"""Count multiply-accumulates (MACs) by running the model's FX graph on real inputs.

One MAC is one multiply plus one add; FLOPs = 2 x MACs. What is counted:

* convolution (1d/2d/3d, grouped, depthwise): ``out.numel() * C_in/groups * prod(kernel)``;
  transposed convolution: ``in.numel() * C_out/groups * prod(kernel)``;
* linear: ``out.numel() * in_features``;
* matmul / mm / bmm / addmm / baddbmm / ``@``: ``out.numel() * contracted size``;
* einsum over two operands: the product of every index size;
* scaled_dot_product_attention: ``batch * heads * L * S * (E + Ev)``;
* nn.MultiheadAttention (a leaf module): q/k/v and output projections plus both
  attention matmuls, from the module's shapes (its fused kernel hides them);
* any other call (wrapped functions such as swin's ``shifted_window_attention``,
  leaf modules): the mm/bmm/convolution/attention aten ops it dispatches.

Not counted: bias adds, normalisation, activations, pooling, softmax, elementwise.

Weights are recognised by tensor storage: ``weights`` maps a weight name to the
tensor the model actually computes with (hard-masked for transformed models;
:func:`count_macs` makes every mask module return exactly that tensor through a
temporary forward hook). Effective MACs of a weight use = dense MACs x density of
that weight (for attention in-projections: per q/k/v block).
The model runs once in eval mode under ``torch.no_grad``; its training flags are
restored and the hooks removed afterwards.

Like ``torch.fx.passes.shape_prop.ShapeProp``, counting over a GraphModule (the model
itself, or its trace) writes each node's result into ``node.meta``: ``"tensor_meta"``
(shapes, as ShapeProp does) and ``"sparsify_macs"`` (:class:`NodeMacs`: the dense MACs
it computes per weight name and in other ops); ``gm.meta["sparsify_macs_counted"]``
records what they were counted for (:func:`counted_key`). Nothing else is mutated.
This is the one MAC counter: ``report`` and ``weight_costs`` (through
:func:`~sparsify_fx.passes.stored_analysis.weight_macs_of`) both read it.
"""
from __future__ import annotations

import builtins
import inspect
import math
import operator
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._python_dispatch import TorchDispatchMode

from sparsify_fx.errors import InputError
from sparsify_fx.mask import Mask
from sparsify_fx.mask_index import masks as mask_entries

from sparsify_fx.passes.aten.experts import GROUPED_MM
from sparsify_fx.passes.macs.tally import MacCount, NodeMacs, OtherOp, Tally, WeightUse, conv_kind
from sparsify_fx.capture.fx_trace import SparsifyTracer, absent_defaults

aten = torch.ops.aten
#: ``node.meta`` key of the :class:`NodeMacs` a node computed
MACS_META = "sparsify_macs"
#: ``gm.meta`` key of the :func:`counted_key` the nodes' MACs were counted for
COUNTED_META = "sparsify_macs_counted"

_SDPA_ATEN = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


class AtenCounter(TorchDispatchMode):
    """Counts mm/bmm/convolution/attention aten ops dispatched while active.

    ``label()`` names the op's context (module path or node name) in the tally.
    """

    def __init__(self, tally: Tally, label: Callable[[], str]) -> None:
        super().__init__()
        self.tally = tally
        self.label = label

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        t = self.tally
        if packet in (aten.mm, aten.bmm):
            t.add_matmul(self.label(), packet.__name__, args[0], args[1], out)
        elif packet in (aten.addmm, aten.baddbmm):
            t.add_matmul(self.label(), packet.__name__, args[1], args[2], out)
        elif packet in (aten.convolution, aten._convolution):
            t.add_conv(self.label(), args[0], args[1], out, int(args[8]), bool(args[6]))
        elif packet.__name__ in _SDPA_ATEN:
            t.add_attention(self.label(), args[0], args[1], args[2], out)
        elif packet.__name__ in GROUPED_MM:  # (S, in) x (E, in, out): one expert per row
            t.add_matmul(self.label(), "grouped_mm", args[0], args[1], out)
        elif packet is aten._native_multi_head_attention:
            q, k, v, embed, heads, qkv_w, _, proj_w = args[:8]
            t.add_mha(self.label(), int(embed), int(heads), q.numel() // embed,
                      k.numel() // embed, v.numel() // embed, k.shape[-2], [qkv_w], proj_w, out)
        return out


_CONV_FUNCS = {torch.conv1d: False, torch.conv2d: False, torch.conv3d: False,
               torch.conv_transpose1d: True, torch.conv_transpose2d: True,
               torch.conv_transpose3d: True}
_MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.mm, torch.bmm}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
_BIAS_MATMUL = {torch.addmm, torch.baddbmm}
_BIAS_METHODS = {"addmm", "baddbmm"}


def _arg(args: tuple, kwargs: dict, index: int, key: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(key, default)


def _einsum_macs(equation: str, operands: Sequence[Tensor]) -> int:
    """Product of every index size for a two-operand einsum (0 for one operand)."""
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    if len(inputs) < 2:
        return 0
    sizes: dict[str, int] = {}
    for spec, t in zip(inputs, operands):
        letters = [c for c in spec if c.isalpha()]
        ellipsis = t.dim() - len(letters)
        dims = list(t.shape)
        if "..." in spec:
            head = spec.split("...")[0]
            n_head = sum(c.isalpha() for c in head)
            for i in range(ellipsis):
                sizes[f"_{i}"] = max(sizes.get(f"_{i}", 1), dims[n_head + i])
            dims = dims[:n_head] + dims[n_head + ellipsis:]
        for c, s in zip(letters, dims):
            sizes[c] = max(sizes.get(c, 1), int(s))
    return math.prod(sizes.values())


def mha_call(tally: Tally, label: str, mha: nn.MultiheadAttention, args: tuple,
             kwargs: dict, out: Any) -> None:
    """Charge one nn.MultiheadAttention call (shapes from its query/key/value)."""
    q = _arg(args, kwargs, 0, "query")
    k = _arg(args, kwargs, 1, "key")
    v = _arg(args, kwargs, 2, "value")
    e = mha.embed_dim
    seq_dim = 1 if (mha.batch_first and k.dim() == 3) else 0
    in_w = ([mha.in_proj_weight] if mha._qkv_same_embed_dim
            else [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight])
    tally.add_mha(label, e, mha.num_heads, q.numel() // e, k.numel() // mha.kdim,
                  v.numel() // mha.vdim, int(k.shape[seq_dim]), in_w,
                  mha.out_proj.weight, out)


class GraphCounter(fx.Interpreter):
    """fx.Interpreter that runs ``gm`` and charges each node's MACs to ``tally``; writes
    each node's ``tensor_meta`` (as ShapeProp) and :class:`NodeMacs` (``MACS_META``)."""

    def __init__(self, gm: fx.GraphModule, tally: Tally) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.tally = tally
        self._label = ""

    def _where(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path}:{n.name}" if path else n.name

    def run_node(self, n: fx.Node) -> Any:
        self.tally.node = record = NodeMacs()
        try:
            out = self._count_node(n)
        finally:
            self.tally.node = None
        n.meta[MACS_META] = record
        _write_tensor_meta(n, out)
        return out

    def _count_node(self, n: fx.Node) -> Any:
        if n.op not in ("call_function", "call_method", "call_module"):
            return super().run_node(n)
        t, label = self.tally, self._where(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, Mask):
            return super().run_node(n)
        known = (n.target in _CONV_FUNCS or n.target in _MATMUL_FUNCS
                 or n.target in _BIAS_MATMUL or n.target is F.linear
                 or n.target is torch.einsum or n.target is F.scaled_dot_product_attention)
        if n.op == "call_method":
            known = n.target in _MATMUL_METHODS or n.target in _BIAS_METHODS
            if not known:
                return super().run_node(n)
        if module is not None:
            known = isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention))
        if not known:
            fn_module = getattr(n.target, "__module__", None) or ""
            if n.op == "call_function" and (n.target in vars(builtins).values()
                                            or fn_module in ("_operator", "operator")):
                return super().run_node(n)
            with AtenCounter(t, lambda: label):
                return super().run_node(n)
        out = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self._charge(n, module, label, args, kwargs, out)
        return out

    def _charge(self, n: fx.Node, module: nn.Module | None, label: str, args: tuple,
                kwargs: dict, out: Any) -> None:
        t, target = self.tally, n.target
        if isinstance(module, nn.MultiheadAttention):
            mha_call(t, label, module, args, kwargs, out)
        elif isinstance(module, nn.modules.conv._ConvNd):
            t.add_conv(label, args[0], module.weight, out, module.groups, module.transposed)
        elif isinstance(module, nn.Linear):
            t.add_matmul(label, "linear", args[0], module.weight, out)
        elif target in _CONV_FUNCS:
            t.add_conv(label, args[0], _arg(args, kwargs, 1, "weight"), out,
                       int(_arg(args, kwargs, 6, "groups", 1)), _CONV_FUNCS[target])
        elif target is F.linear:
            t.add_matmul(label, "linear", args[0], _arg(args, kwargs, 1, "weight"), out)
        elif target in _MATMUL_FUNCS or target in _MATMUL_METHODS:
            t.add_matmul(label, "matmul", args[0], _arg(args, kwargs, 1, "other"), out)
        elif target in _BIAS_MATMUL or target in _BIAS_METHODS:
            t.add_matmul(label, "matmul", args[1], args[2], out)
        elif target is torch.einsum:
            ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            t.add_other(label, "einsum", _einsum_macs(args[0], ops), out)
        elif target is F.scaled_dot_product_attention:
            t.add_attention(label, args[0], _arg(args, kwargs, 1, "key"),
                            _arg(args, kwargs, 2, "value"), out)


def _run_eager(model: nn.Module, inputs: tuple, tally: Tally,
               kwargs: Mapping[str, Any] | None = None) -> None:
    """Fallback for models fx cannot trace: aten-level counting, module paths as labels."""
    stack: list[str] = []
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, Mask):
            continue
        handles.append(module.register_forward_pre_hook(
            lambda m, i, p=path: None if stack.append(p) else None))
        handles.append(module.register_forward_hook(lambda m, i, o: None if stack.pop() else None))
    try:
        with AtenCounter(tally, lambda: stack[-1] if stack else ""):
            model(*inputs, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()


def _write_tensor_meta(n: fx.Node, out: Any) -> None:
    """``node.meta["tensor_meta"]`` / ``["type"]`` exactly as ShapeProp writes them."""
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    meta = map_aggregate(out, extract)
    if found:
        n.meta["tensor_meta"] = meta
    n.meta["type"] = type(out)


def input_shapes(inputs: Sequence[Any]) -> tuple:
    """Shape of each positional input (None for a non-tensor)."""
    return tuple(tuple(int(s) for s in x.shape) if isinstance(x, Tensor) else None
                 for x in inputs)


def counted_key(gm: fx.GraphModule, inputs: Sequence[Any], weights: dict[str, Tensor]) -> tuple:
    """What a count over ``gm`` depends on: the input shapes, the weights' names and shapes
    and the graph's nodes. Equal keys give equal dense MACs per node (mask values do not
    enter dense MACs)."""
    return (input_shapes(inputs),
            tuple(sorted((n, tuple(int(s) for s in t.shape)) for n, t in weights.items())),
            tuple((n.name, n.op, str(n.target)) for n in gm.graph.nodes))


def dense_weights(model: nn.Module) -> tuple[dict[str, Tensor], list[tuple[str, Mask]]]:
    """Weights for a dense count (every mask seen as identity): (name -> tensor, [(name,
    mask)]) for :func:`count_macs`. Masked weights are named by their mask's weight name
    and given as the raw tensor; every other parameter (mask parameters excepted) by its
    qualified name. Read-only."""
    entries = mask_entries(model)
    masked = {id(e.weight) for e in entries}
    skip = {id(p) for m in model.modules() if isinstance(m, Mask) for p in m.parameters()}
    weights = {n: p.detach() for n, p in model.named_parameters()
               if id(p) not in masked and id(p) not in skip}
    pairs = []
    for e in entries:
        weights[e.name] = e.weight.detach()
        pairs.append((e.name, e.mask))
    return weights, pairs


def _graph_of(model: nn.Module, n_args: int = 0, kwargs: Mapping[str, Any] | None = None
              ) -> tuple[fx.GraphModule | None, str]:
    if isinstance(model, fx.GraphModule):
        return model, ""
    concrete = absent_defaults(model, n_args, kwargs) if kwargs else None
    try:
        return fx.GraphModule(model, SparsifyTracer((Mask,)).trace(model, concrete_args=concrete),
                              type(model).__name__), ""
    except Exception as exc:  # noqa: BLE001 - any trace failure selects the eager fallback
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _bind(gm: fx.GraphModule, inputs: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """``inputs`` + ``kwargs`` as the positional arguments of ``gm``'s placeholders."""
    try:
        bound = inspect.signature(gm.forward).bind(*inputs, **kwargs)
    except TypeError as exc:
        raise InputError(f"the keyword inputs do not fit {type(gm).__name__}'s inputs "
                         f"({exc}); pass the keywords its forward takes") from exc
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def count_macs(model: nn.Module, inputs: tuple, weights: dict[str, Tensor],
               masks: Sequence[tuple[str, Mask]] = (), eager: bool = False,
               kwargs: Mapping[str, Any] | None = None) -> MacCount:
    """Run ``model(*inputs, **kwargs)`` once and count MACs per weight and per other op.

    ``weights``: weight name -> the tensor the model computes with. ``masks``:
    (weight name, mask module) pairs; while counting each mask returns
    ``weights[name]``. Traces ``model`` (unless it is a GraphModule already);
    if tracing fails, or ``eager=True``, counts at the aten level instead.
    On a GraphModule ``model`` writes ``node.meta`` (``tensor_meta``, ``MACS_META``)
    and ``model.meta[COUNTED_META]`` (see the module docstring); InputError if the
    model fails on ``inputs``. ``kwargs``: keyword tensors; a traced graph gets them bound
    to its placeholders (the parameters they do not give traced at their defaults).
    """
    tally = Tally(weights)
    kwargs = dict(kwargs or {})
    inputs = tuple(inputs)
    gm, error = (None, "eager=True") if eager else _graph_of(model, len(inputs), kwargs)
    if gm is not None and kwargs:
        inputs, kwargs = _bind(gm, inputs, kwargs), {}
    tally.count.method = "fx" if gm is not None else "eager"
    tally.count.trace_error = error
    handles = [m.register_forward_hook(lambda mod, i, o, n=name: weights[n])
               for name, m in masks]
    modes = [(m, m.training) for m in model.modules()]
    if gm is not None:
        gm.meta.pop(COUNTED_META, None)  # the nodes' MACs change below
    model.eval()
    try:
        with torch.no_grad():
            if gm is not None:
                GraphCounter(gm, tally).run(*inputs)
            else:
                _run_eager(model, inputs, tally, kwargs)
    except Exception as exc:
        raise InputError(
            f"running {type(model).__name__} on the example inputs failed while counting MACs "
            f"({type(exc).__name__}: {exc}). Pass example_inputs the model accepts, e.g. "
            "(torch.randn(1, 3, 224, 224),)."
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    if gm is not None:
        gm.meta[COUNTED_META] = counted_key(gm, inputs, weights)
    return tally.count


__all__ = ["count_macs", "dense_weights", "counted_key", "input_shapes", "MacCount", "NodeMacs",
           "WeightUse", "OtherOp", "Tally", "GraphCounter", "AtenCounter", "conv_kind",
           "MACS_META", "COUNTED_META"]
