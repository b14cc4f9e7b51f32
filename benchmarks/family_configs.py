"""Tiny random configs for every model family of the installed transformers (the family
sweep's, ``benchmarks/family_sweep.py``): which classes, which generic fields, the
retries when a class refuses the first config, and building + running the model.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch


HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 2, 4, 2, 16, 96
MIN_VOCAB = 96
#: the MACs target of the cut; when channels kept whole put it out of reach, the first
#: reachable fallback is cut instead (the row says so)
TARGET, FALLBACK_TARGETS = 0.5, (0.7, 0.9)
#: a built model over this many parameters is no tiny config (skipped, named)
MAX_PARAMS = 150_000_000
#: generic config fields (and values) set where the config class has the field
FIELDS: dict[str, Any] = {
    "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "intermediate_size": INTER,
    "max_position_embeddings": 64, "use_cache": False, "num_labels": 3,
    # mixture of experts, kept small
    "moe_intermediate_size": 32, "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "shared_expert_intermediate_size": 32, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    # encoder-decoder style configs used as decoders
    "decoder_layers": LAYERS, "encoder_layers": LAYERS, "decoder_attention_heads": HEADS,
    "encoder_attention_heads": HEADS, "d_model": HIDDEN, "decoder_ffn_dim": INTER,
    "encoder_ffn_dim": INTER, "num_layers": LAYERS,
    # attention windows and chunked attention bigger than the test sequences
    # multi-head latent attention and partial rotary, at head_dim 16
    "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
    "v_head_dim": 16, "rotary_dim": 8,
    # state-space mixers: a few heads of 16 channels and 16 states (the defaults give
    # 128 heads of one channel and 256 states at hidden 64)
    "mamba_n_heads": 8, "mamba_num_heads": 8, "n_mamba_heads": 8, "mamba_head_dim": 16,
    "mamba_headdim": 16, "mamba_d_state": 16, "ssm_state_size": 16,
    # widths a config keeps apart from the generic ones: a padded vocabulary, a grouped
    # low-rank output, a sliding-window attention's own heads, decoupled input and output
    # embedding widths (left at 256 / 1664 they held most MACs at hidden 64)
    "input_embedding_size": HIDDEN, "output_embedding_size": HIDDEN,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": MIN_VOCAB,
    "unpadded_vocab_size": MIN_VOCAB, "o_lora_rank": 32, "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": KV_HEADS, "swa_head_dim": HEAD_DIM,
    "sliding_window": 64, "attention_dropout": 0.0, "hidden_dropout": 0.0,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
}
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
               "sep_token_id", "cls_token_id", "mask_token_id", "unk_token_id")


def families(transformers: Any) -> list[tuple[str, str, str]]:
    """``(family, class name, kind)`` with kind ``"lm"`` for every ``*ForCausalLM`` and
    ``"cls"`` for every ``*ForSequenceClassification`` of a family without a causal LM."""
    names = [n for n in dir(transformers) if not n.startswith(("Auto", "TF", "Flax"))]
    causal = {n[:-len("ForCausalLM")]: n for n in names if n.endswith("ForCausalLM")}
    rows = [(fam, cls, "lm") for fam, cls in sorted(causal.items())]
    for n in names:
        if n.endswith("ForSequenceClassification"):
            fam = n[:-len("ForSequenceClassification")]
            if fam not in causal:
                rows.append((fam, n, "cls"))
    return rows


def _config_fields(config_class: type) -> set[str]:
    params = inspect.signature(config_class.__init__).parameters
    return {p for p in params if p not in ("self", "kwargs", "args")}


#: the fields that set a model's depth
DEPTH_FIELDS = ("num_hidden_layers", "num_layers", "decoder_layers")
#: what a retry changes when the first tiny config is refused or does not run:
#: ``(fields left out, depth)``: the KV head count left out (classes needing as many as
#: query heads: latent attention); a deeper tiny model (a per-layer pattern the config
#: builds needs a few more layers, e.g. a layer shared by two hybrid layers); the depth
#: left out (per-layer lists sized for the default depth)
VARIANTS: tuple[tuple[tuple[str, ...], int | None], ...] = (
    ((), LAYERS), (("num_key_value_heads",), LAYERS), ((), 3), ((), 4), ((), 8),
    (DEPTH_FIELDS, None), (("num_key_value_heads", *DEPTH_FIELDS), None))


def tiny_config(model_class: type, leave_out: tuple[str, ...] = (), depth: int | None = LAYERS
                ) -> Any:
    """A tiny random config for ``model_class`` from its own ``config_class`` (see module
    doc), without the generic fields ``leave_out`` (class defaults instead), ``depth``
    layers (None: the class default); ValueError naming why when it cannot be built
    generically."""
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise ValueError("the class names no config_class")
    fields = _config_fields(config_class)
    mapping = getattr(config_class, "attribute_map", {}) or {}
    kwargs: dict[str, Any] = {}
    for name, value in FIELDS.items():
        if name in leave_out:
            continue
        target = name if name in fields else mapping.get(name)
        if target in fields and target not in kwargs:
            kwargs[target] = depth if name in DEPTH_FIELDS and depth is not None else value
    if not any(k in kwargs for k in ("hidden_size", mapping.get("hidden_size"), "d_model")):
        raise ValueError(f"{config_class.__name__} has no hidden size field")
    try:
        default = config_class()
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{config_class.__name__}() fails: {type(exc).__name__}: {exc}") from exc
    if hasattr(default, "text_config") and getattr(default, "text_config") is not None and \
            "hidden_size" not in fields:
        raise ValueError(f"{config_class.__name__} nests a text_config (multimodal)")
    # special tokens: small ids (0, 1, 2, ...) so the vocabulary stays small; the
    # vocabulary is at least every special id the config keeps
    ids = []
    for i, attr in enumerate(SPECIAL_IDS):
        v = getattr(default, attr, None)
        if attr in fields and (v is not None or attr == "pad_token_id"):
            kwargs[attr] = [i] if isinstance(v, (list, tuple)) else i
            ids.append(i)
        elif isinstance(v, int):
            ids.append(v)
    vocab = max([MIN_VOCAB, *(i + 1 for i in ids)])
    if "vocab_size" in fields:
        kwargs["vocab_size"] = vocab
    try:
        config = config_class(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{config_class.__name__}(tiny) fails: {type(exc).__name__}: "
                         f"{str(exc)[:200]}") from exc
    return config


def takes_mask(model_class: type) -> bool:
    """Whether ``model_class.forward`` names ``attention_mask`` (FNet's takes none: passing
    one through its ``**kwargs`` is refused by the capture)."""
    return "attention_mask" in inspect.signature(model_class.forward).parameters


def make_inputs(kind: str, vocab: int, batch: int, seq: int, seed: int,
                mask: bool = True) -> tuple | dict:
    """Token ids (``lm``: a tuple), or ids and a padding mask by keyword (``cls``; only the
    ids when ``mask`` is false: a forward without ``attention_mask``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 96), (batch, seq), generator=g)
    if kind == "cls":
        if not mask:
            return {"input_ids": ids}
        attention = torch.ones(batch, seq, dtype=torch.long)
        attention[0, -2:] = 0
        return {"input_ids": ids, "attention_mask": attention}  # by keyword: any signature
    return (ids,)


def run_logits(model: Any, x: Any) -> torch.Tensor:
    """The logits of ``model`` on inputs ``x`` (a tuple, or a dict of keyword tensors)."""
    return _logits(model(**x) if isinstance(x, dict) else model(*x))


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if "logits" in out else out[0]


def vocab_of(config: Any) -> int:
    v = getattr(config, "vocab_size", None)
    return int(v) if isinstance(v, int) else MIN_VOCAB


def build_family(model_class: type, kind: str, seed: int, row: dict) -> tuple:
    """``(model, config, inputs, vocab)`` of the first of :data:`VARIANTS` whose config
    builds and whose model runs (``row["config_variant"]``: what it left out); Nones with
    the first failure in ``row["reason"]`` when none does."""
    first = ""
    for leave_out, depth in VARIANTS:
        try:
            config = tiny_config(model_class, leave_out, depth)
        except ValueError as exc:
            first = first or str(exc)[:300]
            continue
        try:  # counted on the meta device first: a default left large (a per-layer
            # vocabulary of 262k) would not be tiny
            with torch.device("meta"):
                n_params = sum(p.numel() for p in model_class(config).parameters())
        except Exception as exc:  # noqa: BLE001
            first = first or f"does not build: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        if n_params > MAX_PARAMS:
            first = first or (f"the tiny config still has {n_params / 1e6:.0f}M parameters "
                              f"(a field left at its default), over {MAX_PARAMS / 1e6:.0f}M")
            continue
        torch.manual_seed(seed)
        try:
            model = model_class(config).eval()
            vocab = vocab_of(config)
            x = make_inputs(kind, vocab, 2, 8, seed=0, mask=takes_mask(model_class))
            with torch.no_grad():
                run_logits(model, x)
        except Exception as exc:  # noqa: BLE001  the family does not run as built
            first = first or f"does not run as built: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        variant = [f"class default {', '.join(leave_out)}"] if leave_out else []
        if depth is not None and depth != LAYERS:
            variant.append(f"{depth} layers")
        if variant:
            row["config_variant"] = "; ".join(variant)
        return model, config, x, vocab
    row["reason"] = first
    return None, None, None, None
