"""Latency: what onnxruntime says a model, or one op at a kept width, costs.

Holds :mod:`.table` (per-op timings at kept widths, interpolation, the cache;
``ort_session``, the one way to open a timing session), :mod:`.probe` (which
ops of a graph the table times; interleaved timing of whole models) and
:mod:`.verify` (a latency cut checked by measuring the shrunk model, corrected
and re-cut) and :mod:`.decode_speed` (prefill / decode tokens/s of ONNX decoder
files, each timed in its own process); latency budgets on torch.export captures of
decoders: :mod:`.decoder_timing` (the stated workload, ``DecodeStep`` / ``ForwardPass``,
and the timer of exported decoders) and :mod:`.capture_latency` (the cost model fitted
from uniformly shrunk copies, measured by the timer).

May import: the core modules, ``sparsify_fx.passes``, ``sparsify_fx.export``
(to write the ONNX it times) and ``budgets`` (``verify`` re-cuts); never
``training`` or ``cli``.
"""
