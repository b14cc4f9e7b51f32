"""What the latency table times, read from a transformed graph, and the dense model's latency.

``op_signatures``: one :class:`~sparsify_fx.latency.table.OpSignature` per Conv/Linear
call (shapes from ShapeProp on the example inputs). ``strip_masks``: a plain copy of
the graph with every mask node bypassed (the dense function's graph, for timing only).
``measure_models``: median onnxruntime latencies (``time_interleaved``) of plain models
exported with :func:`sparsify_fx.export.onnx_export.export_onnx` (the path the benchmark
verifies; ``onnx_session``).
Only ``op_signatures`` touches the input graph, and only its nodes' ``tensor_meta``.
"""
from __future__ import annotations

import copy
import hashlib
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from sparsify_fx.capture.inputs import as_model_inputs
from sparsify_fx.errors import ConfigError, InputError
from sparsify_fx.latency.table import OpSignature
from sparsify_fx.mask_index import hard_masks

MASK_PREFIX = "sparsify_masks."


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def positional_inputs(model: nn.Module, inputs: Any) -> tuple[Any, ...]:
    """Example inputs (a tensor, a tuple, a dict of keyword tensors or a ``ModelInputs``)
    as ``model``'s positional arguments (keywords bound to its parameters): how graphs
    are propagated and ONNX sessions fed here."""
    given = as_model_inputs(inputs)
    if given is None:
        raise InputError("the latency probe needs example inputs (a tensor, a tuple or a "
                         "dict of keyword tensors)")
    return given.positional(model)


def op_signatures(gm: fx.GraphModule, inputs: Any) -> dict[str, OpSignature]:
    """``{node name: OpSignature}`` for every conv/linear call_function node of ``gm``
    (``inputs``: as :func:`positional_inputs` takes them)."""
    from sparsify_fx.passes.channels.analysis import CONV_FUNCS, LINEAR_FUNCS
    inputs = positional_inputs(gm, inputs)
    with torch.no_grad(), hard_masks(gm, False):
        ShapeProp(gm).propagate(*inputs)
    out: dict[str, OpSignature] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not (node.target in CONV_FUNCS
                                              or node.target in LINEAR_FUNCS):
            continue
        x, w = _shape(node.args[0]), _shape(node.args[1])
        if x is None or w is None:
            continue
        if node.target in LINEAR_FUNCS:
            tokens = math.prod(x[1:-1]) if len(x) > 2 else 1
            out[node.name] = OpSignature("linear", int(x[0]) if len(x) > 1 else 1,
                                         int(w[1]), int(w[0]), 1, (int(tokens),))
            continue
        nd = CONV_FUNCS[node.target]

        def arg(i: int, name: str, default: Any) -> Any:
            return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

        kernel = tuple(int(k) for k in w[2:])
        stride, dilation = _tuple(arg(3, "stride", 1), nd), _tuple(arg(5, "dilation", 1), nd)
        padding = arg(4, "padding", 0)
        if padding == "valid":
            padding = 0
        elif padding == "same":
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
        groups = int(arg(6, "groups", 1))
        out[node.name] = OpSignature("conv", int(x[0]), int(x[1]), int(w[0]), groups,
                                     tuple(int(s) for s in x[2:]), kernel, stride,
                                     _tuple(padding, nd), dilation)
    return out


def attention_signature(gm: fx.GraphModule, prod: Any, heads: int) -> OpSignature | None:
    """The op an attention producer of the channel analysis runs (shapes from the
    ``tensor_meta`` :func:`op_signatures` left): its in/out projections are Linear ops;
    its ``q k^T`` producer stands for the whole attention core (``q k^T``, softmax,
    ``attn v``: one ``"attention"`` op, ``groups`` = heads, timed per kept head); its
    ``attn v`` producer has no op of its own (None, costs 0). ``nn.MultiheadAttention``
    only: raises :class:`ConfigError` for windowed attention."""
    node = next((n for n in gm.graph.nodes if n.name == prod.node), None)
    mod = gm.get_submodule(str(node.target)) if node is not None and node.op == "call_module" \
        else None
    if not isinstance(mod, nn.MultiheadAttention):
        raise ConfigError(f"the latency table times nn.MultiheadAttention heads only; "
                          f"{prod.weight} ({prod.kind}) is another attention: budget it with "
                          "target_macs, or exclude its weights (exclude=['*attn*'])")
    x = node.args[0] if node.args else node.kwargs.get("query")
    shape = _shape(x)
    if shape is None:
        return None
    if len(shape) == 2:
        batch, tokens = 1, shape[0]
    else:
        batch, tokens = (shape[0], shape[1]) if mod.batch_first else (shape[1], shape[0])
    if prod.kind in ("attention_qkv", "attention_out"):
        return OpSignature("linear", int(batch), int(prod.shape[1]), int(prod.shape[0]), 1,
                           (int(tokens),))
    if str(prod.weight).endswith("attention_scores"):
        e = int(prod.shape[0])
        return OpSignature("attention", int(batch), e, e, int(heads), (int(tokens), int(tokens)))
    return None


def strip_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with every mask node replaced by its raw weight and no masks left
    (the dense model's graph: only its latency is meaningful, not its outputs)."""
    plain = copy.deepcopy(gm)
    for node in list(plain.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(MASK_PREFIX):
            node.replace_all_uses_with(node.args[0])
            plain.graph.erase_node(node)
    plain.graph.eliminate_dead_code()
    for name in [n for n, _ in plain.named_children() if n == MASK_PREFIX[:-1]]:
        delattr(plain, name)
    for module in list(plain.modules()):
        if torch.nn.utils.parametrize.is_parametrized(module):
            _unparametrize(module)
    if hasattr(plain, "sparsify_config"):
        delattr(plain, "sparsify_config")
    plain.recompile()
    return plain


def _unparametrize(module: nn.Module) -> None:
    """Turn a parametrized module (of a copy) back into its plain class with its raw
    tensors. Not ``remove_parametrizations``: that edits the generated class, which the
    copy shares with the original model."""
    lists = module._modules.pop("parametrizations")
    module.__class__ = type(module).__bases__[0]
    for attr, plist in lists.items():
        module._parameters[attr] = plist.original


def model_key(gm: fx.GraphModule, inputs: tuple[Tensor, ...]) -> str:
    """A stable key for one model's remainder: graph code, parameter shapes, input shapes."""
    h = hashlib.sha1(gm.code.encode())
    for name, p in gm.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
    h.update(str([tuple(t.shape) for t in positional_inputs(gm, inputs)
                  if isinstance(t, Tensor)]).encode())
    return "model|" + h.hexdigest()[:16]


def export_plain(model: nn.Module, inputs: tuple[Tensor, ...], path: Path) -> None:
    """Export the plain ``model`` with :func:`sparsify_fx.export.onnx_export.export_onnx`
    (the path users take; a CPU copy if the model is elsewhere) to ``path``, for timing
    (dense initializers, not verified). Sets ``model`` to eval mode."""
    from sparsify_fx.export.onnx_export import export_onnx
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).cpu()  # onnxruntime runs on the CPU; the model stays put
    inputs = tuple(t.detach().cpu() if isinstance(t, Tensor) else t
                   for t in positional_inputs(model, inputs))
    try:
        export_onnx(model.eval(), inputs if len(inputs) > 1 else inputs[0], path,
                    sparse=False, verify=False, latency_runs=0)
    except Exception as exc:  # ExportError and friends
        raise ConfigError(f"measuring model latency needs an ONNX export of the "
                          f"model: {exc}") from exc


def onnx_session(model: nn.Module, inputs: tuple[Tensor, ...], threads: int, path: Path):
    """:func:`export_plain` to ``path``, then an onnxruntime session on it (no spinning)."""
    from sparsify_fx.latency.table import ort_session
    export_plain(model, inputs, path)
    return ort_session(path, threads)


def interleaved_times(sessions: list, inputs: tuple[Tensor, ...] | list, runs: int = 30,
                      min_seconds: float = 1.0, warmup: int = 3) -> list[list[float]]:
    """Milliseconds of every run of each onnxruntime session, timed interleaved: every
    round runs each session once (in reversed order every other round), so a load
    change hits all alike. At least ``runs``
    rounds and ``min_seconds`` of timing (a short model would otherwise be timed within
    one burst of load), after ``warmup`` runs each. ``inputs``: one tuple for all
    sessions, or one per session (numpy arrays or tensors, positional)."""
    per = inputs if isinstance(inputs, list) else [inputs] * len(sessions)
    feeds = [{i.name: (t.detach().cpu().numpy() if isinstance(t, Tensor) else t)
              for i, t in zip(s.get_inputs(), [t for t in x if t is not None])}
             for s, x in zip(sessions, per)]
    for s, feed in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    start = time.perf_counter()
    while len(times[0]) < runs or time.perf_counter() - start < min_seconds:
        for k in order:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append((time.perf_counter() - t) * 1e3)
        order.reverse()  # A B, B A, ...: no session always runs right after another
    return times


def time_interleaved(sessions: list, inputs: tuple[Tensor, ...] | list, runs: int = 30,
                     min_seconds: float = 1.0) -> list[float]:
    """Median milliseconds of each session (:func:`interleaved_times`)."""
    return [statistics.median(t) for t in interleaved_times(sessions, inputs, runs, min_seconds)]


def median_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of ``times[r] / reference[r]`` (runs of one round share the
    machine's state: steadier than a ratio of medians when load comes and goes)."""
    return statistics.median(t / r for t, r in zip(times, reference))


def onnx_bytes(model: nn.Module, inputs: tuple[Tensor, ...]) -> bytes:
    """The plain ``model`` exported by :func:`export_plain`, as serialized bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_plain(model, inputs, path)
        return path.read_bytes()


def windowed_fractions(models: list, inputs: tuple[Tensor, ...] | tuple, threads: int,
                       windows: int = 3, runs: int = 30, min_seconds: float = 1.0
                       ) -> tuple[list[float], list[list[float]]]:
    """Latency of each ONNX model (bytes or path) relative to ``models[0]``, measured in
    ``windows`` windows, each with fresh sessions (:func:`ort_session`) timed interleaved
    (:func:`interleaved_times`). Returns (median ms of each model over all windows, the
    fraction of each model in each window: the median over the window's rounds of
    ``ms / ms of models[0]``). This VM's fractions move by several per cent between
    windows even when idle (docs/latency.md); the median over windows is the estimate."""
    from sparsify_fx.latency.table import ort_session
    ms: list[list[float]] = [[] for _ in models]
    fractions: list[list[float]] = [[] for _ in models]
    for _ in range(max(1, windows)):
        sessions = [ort_session(m, threads) for m in models]
        times = interleaved_times(sessions, inputs, runs=runs, min_seconds=min_seconds)
        for k, t in enumerate(times):
            ms[k].append(statistics.median(t))
            fractions[k].append(median_ratio(t, times[0]))
    return [statistics.median(v) for v in ms], fractions


def measure_models(models: list[nn.Module], inputs: tuple[Tensor, ...], threads: int,
                   runs: int = 30) -> list[float]:
    """Median onnxruntime latency (ms) of each model exported to ONNX (CPU, ``threads``),
    timed interleaved (:func:`time_interleaved`). ``inputs``: as
    :func:`positional_inputs` takes them."""
    inputs = positional_inputs(models[0], inputs)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = [onnx_session(m, inputs, threads, Path(tmp) / f"model{k}.onnx")
                    for k, m in enumerate(models)]
        return time_interleaved(sessions, inputs, runs)


def measure_model(model: nn.Module, inputs: tuple[Tensor, ...], threads: int,
                  runs: int = 30) -> float:
    """Median onnxruntime latency (ms) of ``model`` exported to ONNX (CPU, ``threads``)."""
    return measure_models([model], inputs, threads, runs)[0]
