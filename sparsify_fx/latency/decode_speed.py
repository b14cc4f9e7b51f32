"""Prefill and decode tokens/s of ONNX decoder files, each file in a process of its own.

What is timed is what a user of the file runs: :func:`~sparsify_fx.export.onnx_generate.
greedy_generate` (onnxruntime, default session options but ``threads`` intra-op
threads, CPU): a prompt of ``prompt_length`` random tokens (seeded, the same for every
file) with an empty past (the prefill), then ``decode_tokens`` steps of one token each
with the growing cache. Per generation: prefill tokens/s = ``batch x prompt_length /
prefill seconds``; decode tokens/s = ``batch x decode_tokens / seconds of the decode
steps`` (arg-max and feeds included, as a generation loop pays them).

:func:`measure_decode` times one file in this process (a warm-up generation, then
``runs``; medians). :func:`decode_speed` runs it in a child process (``python -m
sparsify_fx.latency.decode_speed``; the child imports only numpy and onnxruntime), so
files never share a process, its allocator or its thread pool. :func:`compare_decode_speed`
times several files for ``rounds`` rounds, each file once per round in its own process,
the order reversed every other round (A B C, C B A, ...): a load change on a shared
machine hits every file alike. A ratio is the median over rounds of a file's tokens/s
over the first file's in the same round.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from sparsify_fx.errors import ConfigError


@dataclass(frozen=True)
class DecodeSpeed:
    """One file's timing: ``prefill_s`` / ``decode_s`` per timed generation."""

    prompt_length: int
    decode_tokens: int
    batch: int
    threads: int | None
    prefill_s: list[float]
    decode_s: list[float]

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_length / statistics.median(self.prefill_s)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.decode_tokens / statistics.median(self.decode_s)

    @property
    def decode_ms_per_token(self) -> float:
        """Milliseconds of one decode step (all rows)."""
        return 1e3 * statistics.median(self.decode_s) / self.decode_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "decode_ms_per_token": self.decode_ms_per_token}


def _check(prompt_length: int, decode_tokens: int, batch: int, runs: int) -> None:
    for name, value in (("prompt_length", prompt_length), ("decode_tokens", decode_tokens),
                        ("batch", batch), ("runs", runs)):
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def measure_decode(path: str | os.PathLike, *, prompt_length: int = 128,
                   decode_tokens: int = 64, batch: int = 1, threads: int | None = 2,
                   runs: int = 3, seed: int = 0,
                   session_config: Mapping[str, str] | None = None) -> DecodeSpeed:
    """Time greedy generation over the decoder at ``path`` in this process (module
    docstring): one warm-up generation, then ``runs``. ``session_config``: onnxruntime
    session config entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``)."""
    from sparsify_fx.export.onnx_generate import OnnxDecoder, greedy_generate
    _check(prompt_length, decode_tokens, batch, runs)
    source: Any = path
    if session_config:
        import onnxruntime as ort
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        for key, value in session_config.items():
            so.add_session_config_entry(str(key), str(value))
        source = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    decoder = OnnxDecoder(source, threads)
    vocab = decoder.vocab or 2
    prompt = np.random.default_rng(seed).integers(0, vocab, (batch, prompt_length))
    prefill, decode = [], []
    for k in range(runs + 1):
        gen = greedy_generate(decoder, prompt, max_new_tokens=decode_tokens + 1)
        if k:  # the first generation warms the session up
            prefill.append(gen.prefill_s)
            decode.append(gen.decode_s)
    return DecodeSpeed(prompt_length, decode_tokens, batch, threads, prefill, decode)


def decode_speed(path: str | os.PathLike, *, prompt_length: int = 128, decode_tokens: int = 64,
                 batch: int = 1, threads: int | None = 2, runs: int = 3, seed: int = 0,
                 timeout: float = 1800,
                 session_config: Mapping[str, str] | None = None) -> DecodeSpeed:
    """:func:`measure_decode` in a child process of its own. Raises
    :class:`ConfigError` with the child's error when it fails."""
    _check(prompt_length, decode_tokens, batch, runs)
    request = dict(path=str(path), prompt_length=prompt_length, decode_tokens=decode_tokens,
                   batch=batch, threads=threads, runs=runs, seed=seed)
    if session_config:
        request["session_config"] = dict(session_config)
    done = subprocess.run([sys.executable, "-m", "sparsify_fx.latency.decode_speed",
                           json.dumps(request)], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode:
        raise ConfigError(f"timing {path} in a child process failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return DecodeSpeed(out["prompt_length"], out["decode_tokens"], out["batch"],
                       out["threads"], out["prefill_s"], out["decode_s"])


@dataclass
class DecodeComparison:
    """:func:`compare_decode_speed`'s result: every file's :class:`DecodeSpeed` per round,
    and per file the median over rounds of its tokens/s over the first file's."""

    rounds: dict[str, list[DecodeSpeed]]
    prefill_ratio: dict[str, float] = field(default_factory=dict)
    decode_ratio: dict[str, float] = field(default_factory=dict)

    def median(self, key: str, what: str = "decode_tokens_per_s") -> float:
        return statistics.median(getattr(s, what) for s in self.rounds[key])

    def to_dict(self) -> dict[str, Any]:
        return {k: {"prefill_tokens_per_s": self.median(k, "prefill_tokens_per_s"),
                    "decode_tokens_per_s": self.median(k),
                    "decode_ms_per_token": self.median(k, "decode_ms_per_token"),
                    "prefill_ratio": self.prefill_ratio[k], "decode_ratio": self.decode_ratio[k],
                    "rounds": [s.to_dict() for s in v]} for k, v in self.rounds.items()}


def compare_decode_speed(paths: Mapping[str, str | os.PathLike], *, rounds: int = 3,
                         **options: Any) -> DecodeComparison:
    """Time every file of ``paths`` (name -> file; the first is the reference) for
    ``rounds`` rounds, alternating (module docstring). ``options``: as
    :func:`decode_speed`."""
    if not paths:
        raise ConfigError("compare_decode_speed needs at least one file")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ConfigError(f"rounds must be an int >= 1, got {rounds!r}")
    keys = list(paths)
    result: dict[str, list[DecodeSpeed]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            result[k].append(decode_speed(paths[k], **options))
    base = result[keys[0]]
    comparison = DecodeComparison(result)
    for k, speeds in result.items():
        comparison.prefill_ratio[k] = statistics.median(
            s.prefill_tokens_per_s / b.prefill_tokens_per_s for s, b in zip(speeds, base))
        comparison.decode_ratio[k] = statistics.median(
            s.decode_tokens_per_s / b.decode_tokens_per_s for s, b in zip(speeds, base))
    return comparison


def _child(request: str) -> None:
    speed = measure_decode(**json.loads(request))
    print(json.dumps(asdict(speed)))


if __name__ == "__main__":
    _child(sys.argv[1])


__all__ = ["DecodeSpeed", "DecodeComparison", "measure_decode", "decode_speed",
           "compare_decode_speed"]
