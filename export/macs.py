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
restored and the hooks removed afterwards. Nothing else is mutated.
"""
from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from sparsify_fx.errors import InputError
from sparsify_fx.mask import Mask
from sparsify_fx.passes.trace import SparsifyTracer

aten = torch.ops.aten

Shape = tuple[int, ...]
#: parameter names of nn.MultiheadAttention input projections
ATTENTION_IN = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass
class WeightUse:
    """MACs charged to one weight, summed over every call that uses it."""

    name: str
    kind: str
    weight_shape: Shape
    groups: int = 1
    dense_macs: int = 0
    macs: float = 0.0
    output_shape: Shape | None = None
    calls: int = 0


@dataclass
class OtherOp:
    """MACs of one op that uses no prunable weight (attention matmuls, einsum, ...)."""

    name: str
    op: str
    macs: int
    output_shape: Shape | None


@dataclass
class MacCount:
    """Result of :func:`count_macs`. ``method``: ``"fx"`` (graph walk) or ``"eager"``."""

    weights: dict[str, WeightUse] = field(default_factory=dict)
    other: list[OtherOp] = field(default_factory=list)
    method: str = "fx"
    trace_error: str = ""


def _shape(x: Any) -> Shape | None:
    if isinstance(x, Tensor):
        return tuple(int(s) for s in x.shape)
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return tuple(int(s) for s in x[0].shape)
    return None


def _ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr() if t.numel() else 0
    except (RuntimeError, NotImplementedError):
        return 0


def conv_kind(weight_shape: Sequence[int], groups: int, transposed: bool) -> str:
    if transposed:
        return "conv_transpose"
    if groups > 1 and weight_shape[1] == 1:
        return "depthwise_conv"
    return "grouped_conv" if groups > 1 else "conv"


class Tally:
    """Accumulates weight uses and other ops; knows each weight's density."""

    def __init__(self, weights: dict[str, Tensor]) -> None:
        self.weights = weights
        self.owner = {p: n for n, t in weights.items() if (p := _ptr(t))}
        self._nnz: dict[tuple[str, int, int], int] = {}
        self.count = MacCount()

    def name_of(self, t: Any) -> str | None:
        return self.owner.get(_ptr(t)) if isinstance(t, Tensor) else None

    def nonzeros(self, name: str, start: int = 0, stop: int | None = None) -> int:
        w = self.weights[name]
        stop = w.shape[0] if stop is None else stop
        key = (name, start, stop)
        if key not in self._nnz:
            self._nnz[key] = int(torch.count_nonzero(w[start:stop]))
        return self._nnz[key]

    def density(self, name: str, used: Tensor | None = None) -> float:
        """Density of weight ``name``, or of the slice ``used`` of it (e.g. a q/k/v split)."""
        w = self.weights[name]
        if used is not None and used.numel() != w.numel():
            key = (name, -1 - int(used.storage_offset()), int(used.numel()))
            if key not in self._nnz:
                self._nnz[key] = int(torch.count_nonzero(used))
            return self._nnz[key] / used.numel()
        return self.nonzeros(name) / w.numel() if w.numel() else 0.0

    def add_weight(self, name: str, kind: str, dense: int, out: Any, groups: int = 1,
                   effective: float | None = None, used: Tensor | None = None) -> None:
        use = self.count.weights.get(name)
        if use is None:
            use = WeightUse(name, kind, tuple(self.weights[name].shape), groups)
            self.count.weights[name] = use
        use.dense_macs += int(dense)
        use.macs += dense * self.density(name, used) if effective is None else effective
        use.output_shape = use.output_shape or _shape(out)
        use.calls += 1

    def add_other(self, name: str, op: str, macs: int, out: Any) -> None:
        if macs:
            self.count.other.append(OtherOp(name, op, int(macs), _shape(out)))

    def add_matmul(self, label: str, op: str, a: Tensor, b: Tensor, out: Tensor) -> None:
        """A product contracting ``a``'s last dim; charged to a weight operand if any."""
        k = a.shape[-1] if a.dim() else 1
        macs = out.numel() * k if out.dim() else k
        for operand in (b, a):
            name = self.name_of(operand)
            if name is not None:
                kind = "attention_in_proj" if name.endswith(ATTENTION_IN) else "linear"
                self.add_weight(name, kind, macs, out, used=operand)
                return
        self.add_other(label, op, macs, out)

    def add_conv(self, label: str, x: Tensor, w: Tensor, out: Tensor, groups: int,
                 transposed: bool) -> None:
        per = math.prod(w.shape[1:])
        macs = (x.numel() if transposed else out.numel()) * per
        name = self.name_of(w)
        if name is None:
            self.add_other(label, "conv", macs, out)
        else:
            self.add_weight(name, conv_kind(w.shape, groups, transposed), macs, out, groups)

    def add_attention(self, label: str, q: Tensor, k: Tensor, v: Tensor, out: Any) -> None:
        """Both attention matmuls (q k^T and attn v) of SDPA-shaped tensors."""
        length, e = q.shape[-2], q.shape[-1]
        batch = q.numel() // max(length * e, 1)
        macs = batch * length * k.shape[-2] * (e + v.shape[-1])
        self.add_other(label, "attention", macs, out)

    def add_mha(self, label: str, embed: int, heads: int, q_tokens: int, k_tokens: int,
                v_tokens: int, src_len: int, in_w: list[Tensor | None],
                out_w: Tensor | None, out: Any) -> None:
        """nn.MultiheadAttention from shapes; ``in_w`` is [packed] or [q, k, v] weights."""
        tokens = (q_tokens, k_tokens, v_tokens)
        if len(in_w) == 1 and in_w[0] is not None:
            name = self.name_of(in_w[0])
            dense = sum(t * embed * in_w[0].shape[1] for t in tokens)
            if name is None:
                self.add_other(f"{label}.in_proj", "linear", dense, out)
            else:
                eff = sum(t * self.nonzeros(name, i * embed, (i + 1) * embed)
                          for i, t in enumerate(tokens))
                self.add_weight(name, "attention_in_proj", dense, out, effective=eff)
        else:
            for t, w in zip(tokens, in_w):
                if w is None:
                    continue
                name = self.name_of(w)
                if name is None:
                    self.add_other(f"{label}.in_proj", "linear", t * w.numel(), out)
                else:
                    self.add_weight(name, "attention_in_proj", t * w.numel(), out)
        self.add_other(label, "attention", 2 * q_tokens * src_len * embed, out)
        if out_w is not None:
            name = self.name_of(out_w)
            dense = q_tokens * out_w.numel()
            if name is None:
                self.add_other(f"{label}.out_proj", "linear", dense, out)
            else:
                self.add_weight(name, "attention_out_proj", dense, out)


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
    """fx.Interpreter that runs ``gm`` and charges each node's MACs to ``tally``."""

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


def _run_eager(model: nn.Module, inputs: tuple, tally: Tally) -> None:
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
            model(*inputs)
    finally:
        for h in handles:
            h.remove()


def _graph_of(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    if isinstance(model, fx.GraphModule):
        return model, ""
    try:
        return fx.GraphModule(model, SparsifyTracer((Mask,)).trace(model), type(model).__name__), ""
    except Exception as exc:  # noqa: BLE001 - any trace failure selects the eager fallback
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def count_macs(model: nn.Module, inputs: tuple, weights: dict[str, Tensor],
               masks: Sequence[tuple[str, Mask]] = (), eager: bool = False) -> MacCount:
    """Run ``model(*inputs)`` once and count MACs per weight and per other op.

    ``weights``: weight name -> the tensor the model computes with. ``masks``:
    (weight name, mask module) pairs; while counting each mask returns
    ``weights[name]``. Traces ``model`` (unless it is a GraphModule already);
    if tracing fails, or ``eager=True``, counts at the aten level instead.
    """
    tally = Tally(weights)
    gm, error = (None, "eager=True") if eager else _graph_of(model)
    tally.count.method = "fx" if gm is not None else "eager"
    tally.count.trace_error = error
    handles = [m.register_forward_hook(lambda mod, i, o, n=name: weights[n])
               for name, m in masks]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if gm is not None:
                GraphCounter(gm, tally).run(*inputs)
            else:
                _run_eager(model, inputs, tally)
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
    return tally.count


__all__ = ["count_macs", "MacCount", "WeightUse", "OtherOp", "Tally", "GraphCounter",
           "AtenCounter", "conv_kind"]
