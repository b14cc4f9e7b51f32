"""onnxruntime latency lookup table: time each Conv/Linear at several kept widths, cache it.

One entry per op signature (kind, batch, channels, spatial size, kernel, stride,
padding, dilation, groups): a grid of milliseconds over kept output x kept input
channels (kept conv groups for a grouped conv), made non-decreasing along both
axes, read by bilinear interpolation (:class:`OpTable`). The model-level
calibration (``{"remainder", "scale"}``: the whole model's latency is ``remainder + scale
x sum of op entries``, fitted from the dense model and a half-width probe of it timed
interleaved; the remainder covers activations, adds, pooling, session overhead) is
stored under a model signature. Tables live in one JSON file per environment (onnxruntime version,
thread count, CPU model) under :func:`cache_dir`; a second build reads them and
measures nothing. Read by :mod:`sparsify_fx.budgets.cost_model`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sparsify_fx.errors import ConfigError

#: kept-width grid, as fractions of the layer's channels (plus one channel)
WIDTHS = (0.25, 0.5, 0.75, 1.0)
CACHE_ENV = "SPARSIFY_FX_CACHE_DIR"


@dataclass(frozen=True)
class OpSignature:
    """What decides one op's latency. ``spatial``: input spatial dims (conv) or
    ``(tokens per sample,)`` (linear); ``kernel``/``stride``/``padding``/``dilation``:
    per spatial dim (empty for linear)."""

    kind: str  # "conv" | "linear" | "attention" (q k^T, softmax, attn v; groups = heads)
    batch: int
    in_ch: int
    out_ch: int
    groups: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    def key(self) -> str:
        def t(v: tuple[int, ...]) -> str:
            return "x".join(map(str, v))
        return (f"{self.kind}|n{self.batch}|i{self.in_ch}|o{self.out_ch}|g{self.groups}"
                f"|s{t(self.spatial)}|k{t(self.kernel)}|st{t(self.stride)}"
                f"|p{t(self.padding)}|d{t(self.dilation)}")


#: timer(signature, kept out channels, kept in channels) -> milliseconds; for a grouped
#: conv the kept channels are whole conv groups
Timer = Callable[[OpSignature, int, int], float]


@dataclass
class OpTable:
    """Milliseconds on a grid ``outs x ins`` of kept channel counts (ascending)."""

    outs: list[int]
    ins: list[int]
    ms: list[list[float]]  # ms[a][b]: outs[a] outputs, ins[b] inputs

    def monotone(self) -> "OpTable":
        """A copy made non-decreasing along both axes (running maximum): timing noise
        must not make a wider layer look faster (the cut's search assumes monotone cost)."""
        a = np.maximum.accumulate(np.maximum.accumulate(np.asarray(self.ms, float), 0), 1)
        return OpTable(list(self.outs), list(self.ins), a.tolist())

    def __call__(self, kept_out: float, kept_in: float) -> float:
        """Bilinear interpolation (linear towards 0 below the smallest grid width,
        clamped above the largest); 0 when nothing is kept."""
        if kept_out <= 0 or kept_in <= 0:
            return 0.0
        ms = np.asarray(self.ms, float)
        row = np.array([_interp(kept_in, self.ins, ms[a]) for a in range(len(self.outs))])
        return float(_interp(kept_out, self.outs, row))

    def to_json(self) -> dict:
        return {"outs": self.outs, "ins": self.ins, "ms": self.ms}

    @classmethod
    def from_json(cls, d: dict) -> "OpTable":
        return cls([int(v) for v in d["outs"]], [int(v) for v in d["ins"]],
                   [[float(v) for v in r] for r in d["ms"]])


def _interp(x: float, xs: Sequence[int], ys: np.ndarray) -> float:
    if len(xs) == 1:
        return float(ys[0]) * min(1.0, x / xs[0])
    if x < xs[0]:
        return float(ys[0]) * x / xs[0]
    return float(np.interp(x, xs, ys))


def grid(total: int, prunable: bool, round_to: int = 1) -> list[int]:
    """Kept counts to time: every :data:`WIDTHS` fraction of ``total`` rounded to a
    multiple of ``round_to`` (at least ``round_to``; ``total`` itself always), or just
    ``total`` when this side never loses channels. ``round_to`` is the cut's channel
    rounding: the table is timed at the widths the cut can produce."""
    if not prunable:
        return [total]
    step = max(1, int(round_to))
    return sorted({min(total, max(step, round(f * total / step) * step)) for f in WIDTHS}
                  | {total})


def environment(threads: int) -> dict[str, str]:
    """What a table is only valid for: onnxruntime version, threads, CPU model."""
    import onnxruntime as ort
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"onnxruntime": ort.__version__, "threads": str(threads), "cpu": cpu,
            "machine": platform.machine()}


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$SPARSIFY_FX_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparsify_fx``,
    else ``~/.cache/sparsify_fx``."""
    if path is not None:
        return Path(path)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparsify_fx"


@dataclass
class LatencyTable:
    """Op tables and model remainders for one environment, backed by one JSON file."""

    env: dict[str, str]
    ops: dict[str, OpTable] = field(default_factory=dict)
    remainders: dict[str, dict[str, float]] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, threads: int, directory: str | os.PathLike | None = None) -> "LatencyTable":
        """The cached table for this environment (empty if none yet)."""
        env = environment(threads)
        digest = hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]
        path = cache_dir(directory) / f"latency-{digest}.json"
        table = cls(env, path=path)
        table._merge_file()
        return table

    def _merge_file(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # unreadable cache: measured again and rewritten
        if data.get("env") != self.env:
            return
        for k, v in data.get("ops", {}).items():
            self.ops.setdefault(k, OpTable.from_json(v))
        for k, v in data.get("remainders", {}).items():
            if isinstance(v, dict):
                self.remainders.setdefault(k, {n: float(x) for n, x in v.items()})

    def save(self) -> None:
        """Write atomically, keeping entries another process added meanwhile."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the latency cache directory {self.path.parent}: "
                              f"{exc}; pass cache_dir= or set ${CACHE_ENV}") from exc
        self._merge_file()
        data = {"env": self.env, "ops": {k: v.to_json() for k, v in self.ops.items()},
                "remainders": self.remainders}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)

    def missing(self, sig: OpSignature, out_prunable: bool, in_prunable: bool,
                round_to: int = 1) -> int:
        """How many timings :meth:`measure` would make for this op (0: cached)."""
        outs, ins = _axes(sig, out_prunable, in_prunable, round_to)
        if self._cached(sig, outs, ins) is not None:
            return 0
        return len(outs) * (1 if sig.groups > 1 else len(ins))

    def _cached(self, sig: OpSignature, outs: list[int], ins: list[int]) -> OpTable | None:
        """The stored table of ``sig`` if it was timed at every one of these widths."""
        have = self.ops.get(sig.key())
        if have is not None and set(outs) <= set(have.outs) and (
                sig.groups > 1 or set(ins) <= set(have.ins)):
            return have
        return None

    def measure(self, sig: OpSignature, out_prunable: bool, in_prunable: bool,
                timer: Timer, round_to: int = 1) -> OpTable:
        """The op's table, timed with ``timer`` unless cached (a cached table measured on a
        grid without these widths is re-measured). ``round_to``: see :func:`grid`."""
        outs, ins = _axes(sig, out_prunable, in_prunable, round_to)
        have = self._cached(sig, outs, ins)
        if have is not None:
            return have
        if sig.groups > 1:  # ins axis unused: inputs follow the groups
            per_in = sig.in_ch // sig.groups
            pairs = [(o, o // (sig.out_ch // sig.groups) * per_in) for o in outs]
        else:
            pairs = [(o, i) for o in outs for i in ins]
        many = getattr(timer, "many", None)  # times the whole grid interleaved, if offered
        flat = many(sig, pairs) if many is not None else [timer(sig, o, i) for o, i in pairs]
        cols = 1 if sig.groups > 1 else len(ins)
        ms = [flat[a * cols:(a + 1) * cols] for a in range(len(outs))]
        table = OpTable(outs, [1] if sig.groups > 1 else ins, ms).monotone()
        self.ops[sig.key()] = table
        return table


def _axes(sig: OpSignature, out_prunable: bool, in_prunable: bool,
          round_to: int = 1) -> tuple[list[int], list[int]]:
    """Kept output / input counts to time (a grouped conv: whole groups, one axis)."""
    if sig.groups > 1:
        per_group = sig.out_ch // sig.groups
        counts = [g * per_group for g in grid(sig.groups, out_prunable,
                                              max(1, round_to // per_group))]
        return counts, [1]
    return grid(sig.out_ch, out_prunable, round_to), grid(sig.in_ch, in_prunable, round_to)


# -- onnxruntime timing --------------------------------------------------------------------
def ort_session(model: "str | os.PathLike | bytes", threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` (``model``: a path or serialized bytes) with
    ``threads`` intra-op threads and **no thread spinning**. Every timing in this project
    interleaves several sessions; a spinning thread pool keeps burning a core after its
    run and slows the next session's run (measured: dense mobilenet_v2 27 ms interleaved
    with spinning vs 7.3 ms without, and ratios of one model to itself off by 13 %)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _op_model(sig: OpSignature, kept_out: int, kept_in: int):  # -> onnx.ModelProto
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    if sig.kind == "attention":  # kept heads x head_dim channels; spatial = (tokens, keys)
        d = sig.out_ch // sig.groups
        x_shape = [sig.batch, max(1, kept_out // d), sig.spatial[0], d]
        nodes = [helper.make_node("Transpose", ["x"], ["kt"], perm=[0, 1, 3, 2]),
                 helper.make_node("MatMul", ["x", "kt"], ["s"]),
                 helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "x"], ["y"])]
        graph = helper.make_graph(
            nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model, np.asarray(rng.standard_normal(x_shape), dtype=np.float32)
    if sig.kind == "linear":
        tokens = sig.batch * (sig.spatial[0] if sig.spatial else 1)
        x_shape, y_shape = [tokens, kept_in], [tokens, kept_out]
        w = rng.standard_normal((kept_out, kept_in), dtype=np.float32)
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    else:
        groups = max(1, kept_out // (sig.out_ch // sig.groups)) if sig.groups > 1 else 1
        x_shape = [sig.batch, kept_in, *sig.spatial]
        w = rng.standard_normal((kept_out, kept_in // groups, *sig.kernel), dtype=np.float32)
        out_sp = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in
                  zip(sig.spatial, sig.padding, sig.dilation, sig.kernel, sig.stride)]
        y_shape = [sig.batch, kept_out, *out_sp]
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=groups,
                                kernel_shape=list(sig.kernel), strides=list(sig.stride),
                                pads=list(sig.padding) * 2, dilations=list(sig.dilation))
    b = rng.standard_normal((kept_out,), dtype=np.float32)
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, np.asarray(rng.standard_normal(x_shape), dtype=np.float32)


def time_session(session, feed: dict, min_runs: int = 7, min_ms: float = 20.0,
                 max_runs: int = 200, stat=statistics.median) -> float:
    """``stat`` (median) of ``session.run`` milliseconds after one warm-up: at least
    ``min_runs`` runs and ``min_ms`` of running."""
    session.run(None, feed)
    times: list[float] = []
    while len(times) < min_runs or (sum(times) < min_ms and len(times) < max_runs):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return stat(times)


def ort_timer(threads: int) -> Timer:
    """A :data:`Timer` that builds a one-op ONNX model and times it in onnxruntime
    (:func:`ort_session`: CPU, ``threads`` intra-op threads, no spinning, default graph
    optimisations): the fastest of at least 7
    runs (and 20 ms), minus the fastest empty ``session.run`` (Python and dispatch
    overhead, counted in the remainder)."""
    def session(model):
        return ort_session(model.SerializeToString(), threads)

    base_sig = OpSignature("linear", 1, 1, 1, 1, (1,))
    base_model, base_x = _op_model(base_sig, 1, 1)
    # ops are timed by their fastest run: on a shared machine a burst of load can slow most
    # runs of one session (medians 50x off were seen); the fastest run is the op's own cost
    overhead = time_session(session(base_model), {"x": base_x}, min_runs=50, stat=min)

    def timer(sig: OpSignature, kept_out: int, kept_in: int) -> float:
        model, x = _op_model(sig, kept_out, kept_in)
        return max(0.0, time_session(session(model), {"x": x}, stat=min) - overhead)

    def many(sig: OpSignature, pairs: list[tuple[int, int]], min_runs: int = 7,
             min_ms: float = 20.0) -> list[float]:
        """Every width of one op, timed round-robin (a load change hits all widths alike,
        so the table's shape survives a noisy machine): fastest run per width."""
        runs = []
        for o, i in pairs:
            model, x = _op_model(sig, o, i)
            sess = session(model)
            sess.run(None, {"x": x})
            runs.append((sess, {"x": x}))
        times: list[list[float]] = [[] for _ in runs]
        while len(times[0]) < min_runs or (sum(times[-1]) < min_ms and len(times[0]) < 200):
            for k, (sess, feed) in enumerate(runs):
                t = time.perf_counter()
                sess.run(None, feed)
                times[k].append((time.perf_counter() - t) * 1e3)
        return [max(0.0, min(t) - overhead) for t in times]

    timer.many = many  # type: ignore[attr-defined]
    return timer
