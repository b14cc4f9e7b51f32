"""Greedy generation over an ONNX decoder file in onnxruntime (prefill, then one token a step).

The file is the one :func:`sparsify_fx.export.onnx_decoder.export_decoder` writes:
inputs ``input_ids``, ``attention_mask``, [``position_ids``], ``past_key_values.<i>.key``
/ ``.value``; outputs ``logits``, ``present.<i>.key`` / ``.value``. :class:`OnnxDecoder`
reads the cache's shapes from the graph inputs, so it runs any such file (fp32 or
int8, any number of layers and KV heads).

:func:`greedy_generate` does what ``model.generate(do_sample=False, use_cache=True)``
does: the prompt (left padding allowed: ``attention_mask`` 0 on the left) runs once with
an empty past (the prefill); each next token is the arg-max of the last position's
logits, fed with the returned cache, the mask grown by one and the position ids
``generate`` uses (``cumsum(mask) - 1``, 0 at padding; then last + 1). With
``eos_token_id``, a row that produced it gets ``pad_token_id`` from then on and the
loop stops once every row has (as ``generate``). ``forced_tokens`` feeds given tokens
instead of the arg-max (teacher forcing: the logits of another model's tokens).

Only numpy and onnxruntime are imported (the timing children of the decode-speed
helper load nothing else).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparsify_fx.errors import InputError

_PAST = "past_key_values."


@dataclass
class Generation:
    """What :func:`greedy_generate` produced.

    ``sequences``: ``(batch, prompt + new)`` int64, prompt then new tokens (as
    ``generate`` returns them); ``logits``: one ``(batch, vocab)`` float array per new
    token, the logits it was chosen from; ``prefill_s``: seconds of the prefill step
    (the prompt in, the first new token out); ``step_s``: seconds of each later step
    (one token in, the next out), argmax and feeds included."""

    sequences: np.ndarray
    prompt_length: int
    logits: list[np.ndarray] = field(repr=False)
    prefill_s: float
    step_s: list[float]

    @property
    def new_tokens(self) -> np.ndarray:
        return self.sequences[:, self.prompt_length:]

    @property
    def decode_s(self) -> float:
        return float(sum(self.step_s))

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens (all rows) per second of the prefill."""
        return self.sequences.shape[0] * self.prompt_length / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens fed per second of decoding (rows x steps after the prefill)."""
        steps = len(self.step_s)
        return self.sequences.shape[0] * steps / self.decode_s if steps else float("nan")


class OnnxDecoder:
    """An onnxruntime session on a decoder file, with its cache layout.

    ``source``: a path or an open ``InferenceSession``; ``threads``: intra-op threads
    (``None``: onnxruntime's default) of the session opened here, with default options
    otherwise. Attributes: ``past_names`` (graph input order), ``past_shapes`` (heads,
    head_dim) per past input, ``position_ids`` (whether the file takes them), ``vocab``
    (the logits' last dim; ``None`` if the file leaves it dynamic)."""

    def __init__(self, source: str | os.PathLike | Any, threads: int | None = None) -> None:
        if isinstance(source, (str, os.PathLike)):
            import onnxruntime as ort
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            source = ort.InferenceSession(str(source), options,
                                          providers=["CPUExecutionProvider"])
        self.session = source
        inputs = {i.name: i for i in source.get_inputs()}
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        self.past_names = [n for n in inputs if n.startswith(_PAST)]
        if missing or not self.past_names:
            raise InputError(f"this ONNX file is not a decoder with a cache (inputs "
                             f"{', '.join(inputs)}); write one with export_decoder")
        self.position_ids = "position_ids" in inputs
        self.past_shapes = [(int(inputs[n].shape[1]), int(inputs[n].shape[3]))
                            for n in self.past_names]
        self.output_names = [o.name for o in source.get_outputs()]
        vocab = source.get_outputs()[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else None

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), np.float32) for h, d in self.past_shapes]

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One run: ``(logits, present tensors)``."""
        feed = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past_names, past))}
        if self.position_ids:
            feed["position_ids"] = positions
        out = self.session.run(None, feed)
        return out[0], list(out[1:])


def _as_int64(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.dtype.kind not in "iu":
        raise InputError(f"{name} must be integer token ids of shape (batch, length), got "
                         f"{a.dtype} {a.shape}")
    return a.astype(np.int64)


def greedy_generate(decoder: OnnxDecoder | str | os.PathLike, input_ids: Any,
                    attention_mask: Any = None, max_new_tokens: int = 16, *,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                    forced_tokens: Any = None, threads: int | None = None) -> Generation:
    """Greedy decoding of ``max_new_tokens`` tokens after ``input_ids`` (module
    docstring). ``decoder``: an :class:`OnnxDecoder` or a file path (opened with
    ``threads``). Raises :class:`InputError` for inputs of the wrong shape."""
    dec = decoder if isinstance(decoder, OnnxDecoder) else OnnxDecoder(decoder, threads)
    ids = _as_int64(input_ids, "input_ids")
    batch, length = ids.shape
    mask = (np.ones_like(ids) if attention_mask is None
            else _as_int64(attention_mask, "attention_mask"))
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    forced = None if forced_tokens is None else _as_int64(forced_tokens, "forced_tokens")
    if forced is not None and (forced.shape[0] != batch or forced.shape[1] < max_new_tokens):
        raise InputError(f"forced_tokens has shape {forced.shape}; pass (batch, >= "
                         f"max_new_tokens) = ({batch}, {max_new_tokens})")
    eos = ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ()))
    if eos and pad_token_id is None:
        raise InputError("eos_token_id needs pad_token_id (what a finished row gets)")
    positions = np.where(mask == 0, 0, np.cumsum(mask, axis=1) - 1).astype(np.int64)
    past = dec.empty_past(batch)
    unfinished = np.ones(batch, dtype=bool)
    new: list[np.ndarray] = []
    logits_per_step: list[np.ndarray] = []
    step_s: list[float] = []
    prefill_s = 0.0
    feed_ids = ids
    for k in range(max_new_tokens):
        start = time.perf_counter()
        logits, past = dec.step(feed_ids, mask, positions, past)
        last = logits[:, -1, :]
        token = (forced[:, k] if forced is not None else last.argmax(-1)).astype(np.int64)
        if eos:
            token = np.where(unfinished, token, np.int64(pad_token_id))
            unfinished &= ~np.isin(token, list(eos))
        elapsed = time.perf_counter() - start
        if k == 0:
            prefill_s = elapsed
        else:
            step_s.append(elapsed)
        new.append(token)
        logits_per_step.append(np.array(last, dtype=np.float32))
        if eos and not unfinished.any():
            break
        feed_ids = token[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    sequences = np.concatenate([ids, np.stack(new, axis=1)], axis=1)
    return Generation(sequences, length, logits_per_step, prefill_s, step_s)


__all__ = ["Generation", "OnnxDecoder", "greedy_generate"]
