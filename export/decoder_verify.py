"""Verification of an ONNX decoder against PyTorch's own ``generate()`` with a cache.

Contract of :func:`verify_decoder`, for every prompt (default :func:`default_prompts`:
one row of 5 tokens; two rows of 7, the first left-padded by 2):

* the reference is ``model.generate(do_sample=False, num_beams=1, use_cache=True,
  max_new_tokens=n)`` (``n = 16`` by default, eos as in the model's generation config)
  with the raw logits of each step (``output_logits``);
* **fp32**: :func:`~sparsify_fx.export.onnx_generate.greedy_generate` over the file must
  return the same tokens, and every step's logits must be within
  ``atol + rtol * max |PyTorch logits|`` of PyTorch's;
* **int8** (``int8=`` an :class:`~sparsify_fx.export.int8_verify.Int8Tolerance`):
  int8 rounding may flip a near-tie and send greedy decoding elsewhere, so the logits
  are compared teacher-forced (the file is fed PyTorch's tokens) within the int8 bound
  ``atol + rtol * max |PyTorch logits|``; the greedy tokens' agreement (leading new
  tokens equal, as a fraction) is reported, not required.

Anything else raises :class:`~sparsify_fx.errors.GenerationMismatchError` naming the
prompt, the step, the row and the bound. ``model`` is only read (flags restored).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsify_fx.errors import GenerationMismatchError
from sparsify_fx.export.onnx_generate import OnnxDecoder, greedy_generate

if TYPE_CHECKING:
    from sparsify_fx.export.int8_verify import Int8Tolerance

#: a prompt: ``(input_ids, attention_mask)``, both ``(batch, length)`` int64
Prompt = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class GenerationCheck:
    """One verified prompt: ``batch`` x ``prompt_length`` tokens, ``new_tokens`` compared;
    ``tokens_equal``: greedy tokens identical to PyTorch's; ``agreement``: fraction of
    new tokens equal before the first difference; ``max_abs_diff`` / ``bound``: the
    worst step's logits (teacher-forced for int8); ``teacher_forced``: int8 check."""

    batch: int
    prompt_length: int
    new_tokens: int
    tokens_equal: bool
    agreement: float
    max_abs_diff: float
    bound: float
    teacher_forced: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def default_prompts(vocab: int, seed: int = 0) -> list[Prompt]:
    """One row of 5 random tokens; two rows of 7, the first left-padded by 2 (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    low = min(3, vocab - 1)  # clear of the usual special ids
    one = torch.randint(low, vocab, (1, 5), generator=g)
    two = torch.randint(low, vocab, (2, 7), generator=g)
    mask = torch.ones_like(two)
    mask[0, :2] = 0
    return [(one, torch.ones_like(one)), (two, mask)]


def generation_ids(model: nn.Module) -> tuple[Any, int | None]:
    """``(eos_token_id, pad_token_id)`` as ``generate`` uses them (pad falls back to eos)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return eos, pad


def torch_greedy(model: nn.Module, prompt: Prompt, new_tokens: int
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """PyTorch's greedy ``generate`` with a cache: ``(sequences, raw logits per step)``."""
    from transformers import GenerationConfig
    eos, pad = generation_ids(model)
    config = GenerationConfig(do_sample=False, num_beams=1, use_cache=True,
                              max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad,
                              output_logits=True, return_dict_in_generate=True)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=prompt[0], attention_mask=prompt[1],
                                 generation_config=config)
    finally:
        for module, mode in flags:
            module.training = mode
    return out.sequences.cpu().numpy(), [t.float().cpu().numpy() for t in out.logits]


def _agreement(got: np.ndarray, want: np.ndarray) -> float:
    n = want.shape[1]
    same = np.all(got[:, :n] == want, axis=0) if got.shape[1] >= n else np.zeros(n, bool)
    lead = int(np.argmin(same)) if not same.all() else n
    return lead / n if n else 1.0


def _logit_diff(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float, int]:
    """(worst |diff| over steps, max |want|, the worst step)."""
    diffs = [float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got, want)]
    scale = max(float(np.abs(w).max()) for w in want)
    worst = int(np.argmax(diffs))
    return diffs[worst], scale, worst


def verify_decoder(model: nn.Module, decoder: OnnxDecoder, *, what: str = "the decoder",
                   prompts: list[Prompt] | None = None, new_tokens: int = 16,
                   rtol: float = 1e-4, atol: float = 1e-5, int8: Int8Tolerance | None = None,
                   eos: Any = None, pad: int | None = None) -> list[GenerationCheck]:
    """Check ``decoder`` against ``model.generate`` (module docstring); one
    :class:`GenerationCheck` per prompt. ``eos`` / ``pad``: default from the model."""
    if eos is None and pad is None:
        eos, pad = generation_ids(model)
    vocab = int(model.config.vocab_size) if hasattr(model, "config") else 2
    checks = []
    for p, prompt in enumerate(prompts or default_prompts(vocab)):
        ids, mask = prompt
        want, want_logits = torch_greedy(model, prompt, new_tokens)
        n = want.shape[1] - ids.shape[1]
        label = f"prompt {p} ({ids.shape[0]} x {ids.shape[1]} tokens)"
        free = greedy_generate(decoder, ids, mask, n, eos_token_id=eos, pad_token_id=pad)
        equal = free.sequences.shape == want.shape and bool(np.all(free.sequences == want))
        agreement = _agreement(free.new_tokens, want[:, ids.shape[1]:])
        if int8 is None:
            if not equal:
                step = int(round(agreement * n))
                row = int(np.argmax(free.sequences[:, ids.shape[1] + step]
                                    != want[:, ids.shape[1] + step])) if step < n else 0
                raise GenerationMismatchError(
                    f"{what}: greedy tokens differ from PyTorch's generate() on {label} at "
                    f"new token {step} of row {row} (onnxruntime "
                    f"{free.new_tokens[row].tolist()}, PyTorch "
                    f"{want[row, ids.shape[1]:].tolist()}); the export does not compute what "
                    "the model computes: check the model runs with a cache in PyTorch, or "
                    "report it with the model's config")
            got_logits, forced = free.logits, False
            bound_rtol, bound_atol = rtol, atol
        else:
            teacher = greedy_generate(decoder, ids, mask, n, forced_tokens=want[:, ids.shape[1]:])
            got_logits, forced = teacher.logits, True
            bound_rtol, bound_atol = int8.rtol, int8.atol
        worst, scale, step = _logit_diff(got_logits, want_logits)
        bound = bound_atol + bound_rtol * scale
        if not np.isfinite(worst) or worst > bound:
            fix = ("loosen int8_tolerance=Int8Tolerance(rtol=...) or export fp32" if forced
                   else "pass rtol=/atol= if the model is numerically sensitive")
            raise GenerationMismatchError(
                f"{what}: logits of new token {step} on {label} differ from PyTorch's by "
                f"{worst:.4g} > tolerance {bound:.4g} (atol {bound_atol:g} + rtol "
                f"{bound_rtol:g} x logit scale {scale:.4g}"
                f"{', teacher-forced' if forced else ''}); {fix}")
        checks.append(GenerationCheck(int(ids.shape[0]), int(ids.shape[1]), n, equal,
                                      agreement, worst, bound, forced))
    return checks


__all__ = ["GenerationCheck", "Prompt", "default_prompts", "generation_ids", "torch_greedy",
           "verify_decoder"]
