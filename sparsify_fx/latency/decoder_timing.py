"""What a latency budget on a captured decoder measures, and the timer that measures it.

The user states the workload (a small option object):

* :class:`DecodeStep` ``(past_length, batch, steps)``: one generated token per row with a
  key/value cache of ``past_length`` positions (the decode step of generation);
* :class:`ForwardPass` ``(sequence_length, batch)``: a forward pass over
  ``sequence_length`` tokens with an empty cache (the prefill of a prompt; the same
  computation as a ``use_cache=False`` forward).

Both are timed on what a deployment runs: the model written by
:func:`~sparsify_fx.export.onnx_decoder.export_decoder` (one ONNX file, prefill = past
length 0), driven by :func:`~sparsify_fx.export.onnx_generate.greedy_generate` in
onnxruntime (:mod:`sparsify_fx.latency.decode_speed`: a prompt of ``past_length`` /
``sequence_length`` tokens, then ``steps`` decode steps). A decode step is read from
the decode steps' seconds (the cache grows from ``past_length`` to ``past_length +
steps - 1``), a forward pass from the prefill's.

:class:`DecoderTimer` exports the dense source model once and times files against it
with :func:`~sparsify_fx.latency.decode_speed.compare_decode_speed`: every file in a
process of its own, ``rounds`` rounds in alternating order; a file's fraction is the
median over rounds of its seconds over the dense file's seconds in the same round.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

from torch import nn

from sparsify_fx.errors import ConfigError


def _positive(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class DecodeStep:
    """Time one decode step at ``past_length`` cached positions (``batch`` rows; the
    median over ``steps`` consecutive steps, the cache growing from ``past_length``)."""

    past_length: int = 128
    batch: int = 1
    steps: int = 16

    def __post_init__(self) -> None:
        for name in ("past_length", "batch", "steps"):
            _positive(name, getattr(self, name))

    kind = "decode"

    def speed_options(self) -> dict[str, int]:
        """``decode_speed`` options: the prompt fills the cache, then ``steps`` steps."""
        return {"prompt_length": self.past_length, "decode_tokens": self.steps,
                "batch": self.batch}

    def seconds(self, speed: Any) -> float:
        """Seconds of one decode step from a :class:`DecodeSpeed`."""
        return statistics.median(speed.decode_s) / self.steps

    def describe(self) -> str:
        return f"decode step at past length {self.past_length}, batch {self.batch}"


@dataclass(frozen=True)
class ForwardPass:
    """Time a forward pass over ``sequence_length`` tokens (``batch`` rows, empty cache)."""

    sequence_length: int = 128
    batch: int = 1

    def __post_init__(self) -> None:
        for name in ("sequence_length", "batch"):
            _positive(name, getattr(self, name))

    kind = "forward"

    def speed_options(self) -> dict[str, int]:
        """``decode_speed`` options: the prompt is the forward pass (one decode step after)."""
        return {"prompt_length": self.sequence_length, "decode_tokens": 1, "batch": self.batch}

    def seconds(self, speed: Any) -> float:
        return statistics.median(speed.prefill_s)

    def describe(self) -> str:
        return f"forward pass of {self.sequence_length} tokens, batch {self.batch}"


Workload = Union[DecodeStep, ForwardPass]


def check_workload(workload: Any) -> Workload:
    """``workload`` if it is a :class:`DecodeStep` or :class:`ForwardPass`, else ConfigError."""
    if not isinstance(workload, (DecodeStep, ForwardPass)):
        raise ConfigError(
            f"the latency of a captured decoder is measured for a stated workload: pass "
            f"DecodeStep(past_length=128) (one generated token with a cache) or "
            f"ForwardPass(sequence_length=128) (sparsify_fx.latency.decoder_timing), got "
            f"{workload!r}")
    return workload


def workload_dict(workload: Workload) -> dict[str, Any]:
    return {"kind": workload.kind, **asdict(workload)}


class DecoderTimer:
    """Export decoders of one model family and time them against the dense one.

    ``dense``: the dense source model (a Hugging Face causal LM, only read). Files go to
    a private temporary directory, removed with the timer. ``threads``: onnxruntime
    intra-op threads; ``rounds`` / ``runs``: as
    :func:`~sparsify_fx.latency.decode_speed.compare_decode_speed`."""

    def __init__(self, dense: nn.Module, workload: Workload, *, threads: int = 2,
                 rounds: int = 3, runs: int = 3) -> None:
        _positive("rounds", rounds)
        _positive("runs", runs)
        self.workload = check_workload(workload)
        self.threads, self.rounds, self.runs = threads, rounds, runs
        self.directory = Path(tempfile.mkdtemp(prefix="sparsify-decoder-timing-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        self._count = 0
        self.dense_path = self.export(dense, "dense")
        self.dense_ms: list[float] = []  # the dense file's ms in every comparison's rounds

    def export(self, model: nn.Module, name: str) -> Path:
        """``model`` (a causal LM, e.g. a shrunk capture's source class) as a decoder file
        (unverified: it is only timed; dense initializers, as a shrunk model stores them)."""
        from sparsify_fx.export.onnx_decoder import export_decoder
        self._count += 1
        path = self.directory / f"{self._count:02d}-{name}.onnx"
        export_decoder(model, path, verify=False, sparse=False)
        return path

    def fractions(self, paths: list[Path]) -> list[float]:
        """Latency of each file over the dense file's (median over rounds of the per-round
        ratio), every file in its own process, alternating rounds."""
        from sparsify_fx.latency.decode_speed import compare_decode_speed
        files = {"dense": self.dense_path, **{f"file{k}": p for k, p in enumerate(paths)}}
        comparison = compare_decode_speed(files, rounds=self.rounds, threads=self.threads,
                                          runs=self.runs, **self.workload.speed_options())
        dense = [self.workload.seconds(s) for s in comparison.rounds["dense"]]
        self.dense_ms.extend(1e3 * s for s in dense)
        return [statistics.median(self.workload.seconds(s) / d for s, d in
                                  zip(comparison.rounds[f"file{k}"], dense))
                for k in range(len(paths))]

    def measure(self, small: nn.Module, name: str = "pruned") -> float:
        """Export ``small`` and return its latency fraction of the dense file."""
        path = self.export(small, name)
        try:
            return self.fractions([path])[0]
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the exported files now."""
        self._cleanup()


__all__ = ["DecodeStep", "ForwardPass", "Workload", "DecoderTimer", "check_workload",
           "workload_dict"]
