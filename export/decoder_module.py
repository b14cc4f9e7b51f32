"""A Hugging Face causal LM as a module of flat tensors: past key/values in, present out.

:class:`CacheDecoder` is what :func:`sparsify_fx.export.onnx_decoder.export_decoder`
hands to ``torch.onnx.export``: ``forward(input_ids, attention_mask, [position_ids],
past_key_0, past_value_0, past_key_1, ...)`` builds a ``transformers.DynamicCache``
from the past tensors, calls the model with ``use_cache=True`` and returns
``(logits, present_key_0, present_value_0, ...)``. Shapes (``batch``, ``sequence`` new
tokens, ``past_sequence`` cached tokens, ``total_sequence = past + sequence``):

* ``input_ids``, ``position_ids``: ``(batch, sequence)`` int64;
* ``attention_mask``: ``(batch, total_sequence)`` int64 (1 = attend, 0 = padding);
* past key / value ``i``: ``(batch, kv_heads_i, past_sequence, head_dim_i)``;
* ``logits``: ``(batch, sequence, vocab)``; present ``i``: past ``i`` with
  ``total_sequence`` positions.

:func:`cache_layout` reads the cache's shapes from one forward of the model (so a model
shrunk to fewer KV heads, or layers of different widths, exports its own smaller
cache) and refuses models whose cache is not one full-attention key/value pair per
layer (sliding windows, encoder-decoder, linear attention). The model is only read:
its train/eval flags are restored.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsify_fx.errors import ConfigError, InputError

#: graph input / output names (the Hugging Face Optimum convention)
PAST = "past_key_values.{i}.{kind}"
PRESENT = "present.{i}.{kind}"


@dataclass(frozen=True)
class CacheLayout:
    """The key/value cache a decoder takes and returns.

    ``keys`` / ``values``: per layer ``(kv_heads, head_dim)``; ``position_ids``: whether
    the model takes position ids (generation passes them, as ``generate`` does);
    ``cache_keyword``: the forward keyword of the cache (``cache`` in transformers 5,
    ``past_key_values`` before); ``vocab``: logits' last dim."""

    keys: tuple[tuple[int, int], ...]
    values: tuple[tuple[int, int], ...]
    position_ids: bool
    cache_keyword: str
    vocab: int

    @property
    def layers(self) -> int:
        return len(self.keys)

    def past_names(self) -> list[str]:
        return [PAST.format(i=i, kind=kind) for i in range(self.layers)
                for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [PRESENT.format(i=i, kind=kind) for i in range(self.layers)
                for kind in ("key", "value")]

    def input_names(self) -> list[str]:
        return (["input_ids", "attention_mask"] + (["position_ids"] if self.position_ids else [])
                + self.past_names())

    def output_names(self) -> list[str]:
        return ["logits"] + self.present_names()

    def shapes(self) -> list[tuple[int, int]]:
        """``(heads, head_dim)`` of each past tensor, in input order."""
        return [s for pair in zip(self.keys, self.values) for s in pair]

    def empty_past(self, batch: int, dtype: Any = np.float32) -> list[np.ndarray]:
        """Past tensors of length 0 (a prefill)."""
        return [np.zeros((batch, h, 0, d), dtype=dtype) for h, d in self.shapes()]

    def cache_bytes(self, batch: int, tokens: int, itemsize: int = 4) -> int:
        """Bytes of the cache holding ``tokens`` positions for ``batch`` sequences."""
        return sum(batch * h * tokens * d * itemsize for h, d in self.shapes())


def _forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return {}


def check_causal_lm(model: Any) -> None:
    """InputError unless ``model`` looks like a Hugging Face causal LM (an ``nn.Module``
    with a ``config`` and ``generate``)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config") \
            or not callable(getattr(model, "generate", None)):
        raise InputError(
            f"export_decoder needs a Hugging Face causal LM (AutoModelForCausalLM: an "
            f"nn.Module with .config and .generate), got {type(model).__name__}; for a "
            "transform() capture pass sparsify_fx.shrink(gm) (channel masks) or "
            "sparsify_fx.passes.shrink.to_source.fold_to_source(gm) (element masks)")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{type(model).__name__} is an encoder-decoder model; "
                          "export_decoder exports decoder-only causal LMs")
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # noqa: BLE001 - older transformers: no layer types to check
        types = []
    other = sorted({t for t in types if t != "full_attention"})
    if other:
        raise ConfigError(f"{type(model).__name__}'s cache has {', '.join(other)} layers; "
                          "export_decoder exports full-attention caches only (one growing "
                          "key/value pair per layer)")


def _cache_keyword(model: nn.Module) -> str:
    params = _forward_parameters(model)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ConfigError(f"{type(model).__name__}.forward takes neither cache= nor "
                      "past_key_values=; it cannot run with a key/value cache")


def returned_cache(out: Any) -> Any:
    """The cache object of a model output (``.cache`` or ``.past_key_values``)."""
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    raise ConfigError("the model returned no cache with use_cache=True; it cannot be "
                      "exported as a decoder with past key/values")


def _layers(cache: Any) -> list[tuple[Tensor, Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None:  # a legacy tuple of (key, value) pairs
        return [(k, v) for k, v, *_ in cache]
    pairs = []
    for layer in layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, Tensor) or not isinstance(v, Tensor) or k.dim() != 4:
            raise ConfigError(f"cache layer {type(layer).__name__} holds no 4-D key/value "
                              "tensors; export_decoder needs (batch, heads, length, dim) pairs")
        pairs.append((k, v))
    return pairs


def cache_layout(model: nn.Module) -> CacheLayout:
    """The cache ``model`` returns for a 2-token prompt (eval mode; flags restored)."""
    check_causal_lm(model)
    keyword = _cache_keyword(model)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        ids = torch.zeros(1, 2, dtype=torch.long)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    finally:
        for module, mode in flags:
            module.training = mode
    pairs = _layers(returned_cache(out))
    if not pairs:
        raise ConfigError(f"{type(model).__name__} returned an empty cache")
    keys = tuple((int(k.shape[1]), int(k.shape[3])) for k, _ in pairs)
    values = tuple((int(v.shape[1]), int(v.shape[3])) for _, v in pairs)
    return CacheLayout(keys, values, "position_ids" in _forward_parameters(model), keyword,
                       int(out.logits.shape[-1]))


def _fixed_layer_class() -> type:
    """A ``DynamicLayer`` whose length is its tensors' dim 2, also when it is 0 (the
    stock one tests ``numel() == 0``, a branch torch.export cannot keep symbolic)."""
    from transformers.cache_utils import DynamicLayer

    class FixedLengthLayer(DynamicLayer):
        def get_seq_length(self) -> int:
            return self.keys.shape[-2]

    return FixedLengthLayer


def make_cache(past: list[Tensor]) -> Any:
    """A ``transformers.DynamicCache`` holding ``past`` (key, value, key, value, ...)."""
    from transformers import DynamicCache
    layer_class = _fixed_layer_class()
    cache = DynamicCache()
    layers = []
    for i in range(0, len(past), 2):
        layer = layer_class()
        layer.update(past[i], past[i + 1])
        layers.append(layer)
    cache.layers = layers
    return cache


class CacheDecoder(nn.Module):
    """``model`` with flat cache tensors in and out (module docstring). Holds ``model``
    as a submodule; eval mode is the caller's business."""

    def __init__(self, model: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *tensors: Tensor
                ) -> tuple[Tensor, ...]:
        n = 1 if self.layout.position_ids else 0
        past = list(tensors[n:])
        if len(past) != 2 * self.layout.layers:
            raise InputError(f"the decoder takes {2 * self.layout.layers} past tensors "
                             f"({self.layout.layers} layers), got {len(past)}")
        kwargs: dict[str, Any] = {self.layout.cache_keyword: make_cache(past)}
        if n:
            kwargs["position_ids"] = tensors[0]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **kwargs)
        present = [t for pair in _layers(returned_cache(out)) for t in pair]
        return (out.logits, *present)


def example_inputs(layout: CacheLayout, batch: int = 2, seq: int = 3, past: int = 3,
                   vocab: int | None = None, seed: int = 0) -> tuple[Tensor, ...]:
    """Positional inputs of :class:`CacheDecoder` (random tokens and past tensors; every
    dynamic dim >= 2: torch.export specialises sizes 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab or layout.vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    out: list[Tensor] = [ids, mask]
    if layout.position_ids:
        out.append(torch.arange(past, past + seq).unsqueeze(0).repeat(batch, 1))
    out += [torch.randn(batch, h, past, d, generator=g) for h, d in layout.shapes()]
    return tuple(out)


def dynamic_shapes(layout: CacheLayout) -> tuple[Any, ...]:
    """``dynamic_shapes`` for :class:`CacheDecoder`'s forward: ``batch``, ``sequence``,
    ``past_sequence`` (may be 0), ``total_sequence``."""
    from torch.export import Dim
    batch, seq = Dim("batch"), Dim("sequence")
    past, total = Dim("past_sequence", min=0), Dim("total_sequence")
    rest: list[Any] = [{0: batch, 1: seq}] if layout.position_ids else []
    rest += [{0: batch, 2: past} for _ in layout.shapes()]
    return ({0: batch, 1: seq}, {0: batch, 1: total}, tuple(rest))  # *tensors: one tuple


__all__ = ["CacheLayout", "CacheDecoder", "cache_layout", "check_causal_lm", "make_cache",
           "returned_cache", "example_inputs", "dynamic_shapes", "PAST", "PRESENT"]
