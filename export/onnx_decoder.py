"""``export_decoder``: a causal LM as one verified ONNX decoder file with past key/values.

**One file serves prefill and decode**: the prefill is a run with past length 0 (empty
past tensors), each decode step a run with one new token and the cache so far. Why not
the two-file form (a prefill file without past inputs plus a decode file): the weights
would be written twice (or need shared external data), both files verified and timed,
and every consumer would have to pick a file per step; a past of length 0 costs one
empty concatenation per layer. ``input_ids`` take any number of new tokens, so the one
file also scores a whole text block (every position's logits are returned).

Dynamic dims: ``batch``, ``sequence`` (new tokens), ``past_sequence`` (0 allowed) and
``total_sequence`` (the attention mask: past + new); the graph's names and shapes are
:mod:`sparsify_fx.export.decoder_module`'s. A model shrunk to fewer heads / KV heads /
MLP units (``sparsify_fx.shrink`` of a channel capture, ``shrink_hf``) exports its own
smaller cache: shapes are read from what the model returns.

Pipeline: the model (a Hugging Face causal LM; a ``transform`` capture is converted:
channel masks by ``sparsify_fx.shrink``, element masks by ``fold_to_source``) is wrapped
by :class:`~sparsify_fx.export.decoder_module.CacheDecoder` and exported by
``torch.onnx.export`` (torch.export based); initializers with ``>= min_sparsity`` zeros
are stored COO; ``quantize="dynamic"`` quantizes the dense fp32 file with onnxruntime
(:func:`sparsify_fx.export.quantize.stage_int8`, int8 MatMul weights). Verification
(:func:`~sparsify_fx.export.decoder_verify.verify_decoder`) runs onnxruntime's greedy
generation against ``model.generate(do_sample=False, use_cache=True)``: equal tokens for
``new_tokens`` (16) new tokens and step logits within tolerance (int8: teacher-forced
logits within :class:`~sparsify_fx.export.int8_verify.Int8Tolerance`). Files are staged
in a temporary directory next to ``path`` and moved there only once verified; the
user's model is never changed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from sparsify_fx.errors import ConfigError, ExportError, InputError
from sparsify_fx.export.decoder_module import (CacheDecoder, CacheLayout, cache_layout,
                                               dynamic_shapes, example_inputs)
from sparsify_fx.export.decoder_verify import GenerationCheck, Prompt, verify_decoder
from sparsify_fx.export.onnx_check import checked_session
from sparsify_fx.export.onnx_generate import Generation, OnnxDecoder, greedy_generate
from sparsify_fx.export.ort_fusions import FusionResult, fuse_for_onnxruntime
from sparsify_fx.export.sparse_initializers import InitializerStorage, sparsify_initializers

if TYPE_CHECKING:
    from sparsify_fx.export.int8_verify import Int8Tolerance
    from sparsify_fx.export.quantize import QuantizedExport

#: default logits tolerance of the generation check (fraction of the logit scale): the
#: graph as exported, and one whose ops onnxruntime runs as fused kernels (a different
#: summation order: SmolLM2-135M structured to 0.75 differed by 1.4e-4 of the scale at
#: its third new token, 30 layers deep)
FP32_RTOL, FUSED_RTOL = 1e-4, 1e-3

#: protobuf cannot serialise a message of 2 GiB or more; keep a margin (as export_onnx)
PROTO_LIMIT = 2**31 - 64 * 2**20


@dataclass
class DecoderExport:
    """What :func:`export_decoder` wrote.

    ``path`` / ``bytes``: the file (int8 with ``quantize=``) and its bytes on disk
    (``.data`` included); ``dense_bytes``: the same graph with every initializer dense;
    ``layout``: the cache it takes (layers, KV heads, head dims); ``checks``: one
    :class:`GenerationCheck` per verified prompt (empty with ``verify=False``);
    ``quantized``: the int8 side (``None`` without ``quantize=``), its ``max_abs_diff``
    / ``tolerance`` from the teacher-forced check; ``fp32_checks``: the fp32 file's
    checks when ``quantize=`` (it is verified first); ``fusion``: the onnxruntime
    fusions applied (``None`` with ``fuse=False``)."""

    path: Path
    bytes: int
    dense_bytes: int
    layout: CacheLayout
    initializers: list[InitializerStorage]
    checks: list[GenerationCheck]
    external_data: Path | None = None
    quantized: QuantizedExport | None = None
    fp32_checks: list[GenerationCheck] = field(default_factory=list)
    fusion: FusionResult | None = None

    @property
    def input_names(self) -> list[str]:
        return self.layout.input_names()

    @property
    def output_names(self) -> list[str]:
        return self.layout.output_names()

    def decoder(self, threads: int | None = None) -> OnnxDecoder:
        """An :class:`OnnxDecoder` (onnxruntime session) on the file."""
        return OnnxDecoder(self.path, threads)

    def generate(self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 16,
                 **kwargs: Any) -> Generation:
        """:func:`greedy_generate` over the file."""
        return greedy_generate(self.decoder(), input_ids, attention_mask, max_new_tokens,
                               **kwargs)

    def summary(self) -> str:
        layout = self.layout
        heads = sorted({h for h, _ in layout.keys})
        verified = ("not verified" if not self.checks else
                    f"verified on {len(self.checks)} prompts x {self.checks[0].new_tokens} "
                    f"tokens, worst logit diff {max(c.max_abs_diff for c in self.checks):.3g}")
        int8 = "" if self.quantized is None else f" ({self.quantized.mode} int8)"
        fused = "" if self.fusion is None else f"; {self.fusion.describe()}"
        return (f"{self.path}{int8}: {self.bytes:,} bytes; {layout.layers} layers, KV heads "
                f"{'/'.join(map(str, heads))}; {verified}{fused}")


def _destination(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a str or PathLike, got {type(path).__name__}")
    target = Path(path).expanduser().absolute()
    if target.is_dir() or not target.parent.is_dir():
        raise ExportError(f"cannot write the decoder to {target}: it is a directory, or its "
                          "directory does not exist; pass a file path such as decoder.onnx "
                          "in an existing directory")
    return target


def source_model(model: nn.Module) -> nn.Module:
    """``model``, or the Hugging Face class of a ``transform`` capture: shrunk when it has
    channel masks, masks folded in otherwise (both read-only)."""
    from sparsify_fx.mask import SharedChannelMask
    from sparsify_fx.mask_index import masks
    found = masks(model) if not callable(getattr(model, "generate", None)) else []
    if not found:
        return model
    import sparsify_fx as sf
    from sparsify_fx.passes.shrink.to_source import fold_to_source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if any(isinstance(e.mask, SharedChannelMask) for e in found):
            return sf.shrink(model).eval()
        return fold_to_source(model).eval()


def save_proto(proto: onnx.ModelProto, file: Path, external: bool | None) -> Path | None:
    """Write ``proto`` to ``file``, with its tensors in ``<file>.data`` when asked or when
    it would pass protobuf's 2 GB limit; the ``.data`` path or ``None``."""
    if external is None:
        external = proto.ByteSize() > PROTO_LIMIT
    if not external:
        onnx.save_model(proto, str(file))
        return None
    data = file.with_name(file.name + ".data")
    onnx.save_model(proto, str(file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return data if data.exists() else None


def _torch_export(wrapper: CacheDecoder, args: tuple, opset: int | None) -> onnx.ModelProto:
    layout = wrapper.layout
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, args, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes(layout),
                input_names=layout.input_names(), output_names=layout.output_names(),
                opset_version=opset)
    except Exception as exc:  # noqa: BLE001 - torch.onnx raises many types
        raise ExportError(f"torch.onnx.export of {type(wrapper.model).__name__} with a "
                          f"key/value cache failed: {type(exc).__name__}: {exc}"[:2000]) from exc
    return program.model_proto


def _place(staged: Path, data: Path | None, target: Path) -> Path | None:
    final_data = None
    if data is not None:
        final_data = target.with_name(target.name + ".data")
        if final_data.name != data.name:
            head = onnx.load(str(staged), load_external_data=False)
            for tensor in head.graph.initializer:
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = final_data.name
            onnx.save_model(head, str(staged))
        os.replace(data, final_data)
    os.replace(staged, target)
    return final_data


def _matches_reference(layout: CacheLayout, args: tuple, reference: list[torch.Tensor],
                       work: Path, rtol: float, atol: float
                       ) -> Callable[[onnx.ModelProto], str | None]:
    """The fusion pass's acceptance check: the fused graph loads in onnxruntime and
    every output on ``args`` is within ``atol + rtol * max |reference|`` of PyTorch's
    (the full generation check still runs on the written file)."""
    import onnxruntime as ort
    wanted = [t.numpy() for t in reference]
    feeds = dict(zip(layout.input_names(), (a.numpy() for a in args)))

    def accept(proto: onnx.ModelProto) -> str | None:
        file = work / "fused_check.onnx"
        data = save_proto(proto, file, None)
        try:
            session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
            outputs = session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
            return f"onnxruntime refuses the fused graph: {exc}"[:300]
        finally:
            file.unlink(missing_ok=True)
            if data is not None:
                data.unlink(missing_ok=True)
        for name, got, want in zip(layout.output_names(), outputs, wanted):
            bound = atol + rtol * float(np.abs(want).max(initial=0.0))
            diff = float(np.abs(got - want).max(initial=0.0)) if got.shape == want.shape else None
            if diff is None or diff > bound:
                return (f"output {name} differs from PyTorch's "
                        f"({'shape ' + str(got.shape) if diff is None else f'{diff:.3g}'} "
                        f"vs bound {bound:.3g})")
        return None
    return accept


def _size(file: Path, data: Path | None) -> int:
    return file.stat().st_size + (data.stat().st_size if data else 0)


def export_decoder(model: nn.Module, path: str | os.PathLike, *, quantize: str | None = None,
                   verify: bool = True, new_tokens: int = 16, prompts: list[Prompt] | None = None,
                   sparse: bool = True, min_sparsity: float = 0.5, only_if_smaller: bool = True,
                   rtol: float | None = None, atol: float = 1e-5,
                   int8_tolerance: Int8Tolerance | None = None,
                   fp32_path: str | os.PathLike | None = None, opset: int | None = None,
                   external_data: bool | None = None, fuse: bool = True) -> DecoderExport:
    """Write ``model`` (a Hugging Face causal LM, dense, element-pruned or shrunk; or a
    ``transform`` capture of one) as a verified ONNX decoder with past key/values at
    ``path`` (module docstring). ``quantize="dynamic"``: dynamic int8 (``fp32_path``:
    also keep the verified fp32 file there). ``verify``: greedy generation of
    ``new_tokens`` tokens on ``prompts`` (default
    :func:`~sparsify_fx.export.decoder_verify.default_prompts`) against
    ``model.generate``; :class:`~sparsify_fx.errors.GenerationMismatchError` on a
    difference. ``sparse`` / ``min_sparsity`` / ``only_if_smaller`` / ``external_data``
    / ``opset``: as :func:`~sparsify_fx.export.onnx_export.export_onnx`. ``fuse``:
    rewrite RMSNorm / rotary / attention patterns into onnxruntime's fused ops
    (:mod:`sparsify_fx.export.ort_fusions`; the file then needs onnxruntime; verified
    like the unfused one; ``False`` keeps standard ONNX ops only). ``rtol`` (of the
    logit scale): default :data:`FP32_RTOL`, :data:`FUSED_RTOL` for a fused file. Raises
    :class:`ExportError` (nothing is left at ``path``), :class:`ConfigError` for an
    unsupported model or option."""
    if quantize not in (None, "dynamic"):
        raise ConfigError(f"export_decoder(quantize={quantize!r}): decoders support "
                          "quantize='dynamic' (int8 MatMul weights, no calibration) or None")
    if quantize is None and (int8_tolerance is not None or fp32_path is not None):
        raise ConfigError("int8_tolerance= / fp32_path= need quantize='dynamic'")
    if not (isinstance(new_tokens, int) and new_tokens >= 1):
        raise ConfigError(f"new_tokens must be an int >= 1, got {new_tokens!r}")
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    target = _destination(path)
    fp32_target = None if fp32_path is None else _destination(fp32_path)
    if fp32_target is not None and fp32_target == target:
        raise ConfigError(f"fp32_path= and path are both {target}; pass another fp32_path")
    model = source_model(model)
    layout = cache_layout(model)
    flags = [(m, m.training) for m in model.modules()]
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.eval()
        wrapper = CacheDecoder(model, layout).eval()
        args = example_inputs(layout)
        proto = _torch_export(wrapper, args, opset)
        reference: list[torch.Tensor] = []
        if fuse or quantize is not None:  # PyTorch's outputs on the example inputs
            with torch.no_grad():
                reference = [t.detach() for t in wrapper(*args)]
        fusion = (fuse_for_onnxruntime(proto, _matches_reference(
            layout, args, reference, work, FUSED_RTOL if rtol is None else rtol, atol))
            if fuse else None)
        if rtol is None:
            rtol = FUSED_RTOL if fusion is not None and fusion.counts else FP32_RTOL
        if fusion is not None:
            proto = fusion.proto
        dense_bytes = proto.ByteSize()
        request = dense_file = None
        if quantize is not None:
            from sparsify_fx.export.quantize import quantize_request
            request = quantize_request(quantize, None, args, batched=True,
                                       tolerance=int8_tolerance, metric=None,
                                       fp32_path=fp32_target)
            dense_file = work / "dense_fp32.onnx"
            save_proto(proto, dense_file, external_data)
        storage = sparsify_initializers(proto, float(min_sparsity) if sparse else 2.0,
                                        only_if_smaller=only_if_smaller)
        staged = work / target.name
        data = save_proto(proto, staged, external_data)
        del proto
        checks: list[GenerationCheck] = []
        if verify:
            session = checked_session(staged, "the exported decoder", OnnxDecoder,
                                      runtime_ops=fuse)
            what = "the fp32 decoder" + (" (fused for onnxruntime: fuse=False exports it "
                                         "unfused)" if fusion and fusion.counts else "")
            checks = verify_decoder(model, session, what=what, prompts=prompts,
                                    new_tokens=new_tokens, rtol=rtol, atol=atol)
        written = _size(staged, data)
        quantized = None
        fp32_checks: list[GenerationCheck] = []
        if request is not None:
            quantized, staged, data, storage, dense_bytes, fp32_checks, checks = _int8(
                request, dense_file, work, target, wrapper, args, reference, staged, data,
                written,
                dense_bytes, checks, verify=verify, sparse=sparse, min_sparsity=min_sparsity,
                only_if_smaller=only_if_smaller, external_data=external_data, prompts=prompts,
                new_tokens=new_tokens)
            written = _size(staged, data)
        final_data = _place(staged, data, target)
    except OSError as exc:
        raise ExportError(f"writing {target} failed: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for module, mode in flags:
            module.training = mode
    return DecoderExport(target, written, dense_bytes, layout, storage, checks, final_data,
                         quantized, fp32_checks, fusion)


def _int8(request: Any, dense_file: Path, work: Path, target: Path, wrapper: CacheDecoder,
          args: tuple, reference: list[torch.Tensor], staged: Path, data: Path | None,
          written: int, dense_bytes: int,
          checks: list[GenerationCheck], *, verify: bool, sparse: bool, min_sparsity: float,
          only_if_smaller: bool, external_data: bool | None, prompts: list[Prompt] | None,
          new_tokens: int) -> tuple:
    """Quantize the dense fp32 file, verify it teacher-forced; the int8 side's pieces
    (``reference``: PyTorch's outputs on ``args``)."""
    from sparsify_fx.export.quantize import quantized_result, stage_int8
    q = stage_int8(request, dense_file, work, "int8_" + target.name, model=wrapper,
                   example_inputs=args, example_reference=reference, reference_given=False,
                   verify=False, sparse=sparse, min_sparsity=min_sparsity,
                   only_if_smaller=only_if_smaller, external_data=external_data,
                   save=save_proto, open_session=OnnxDecoder)
    q_checks: list[GenerationCheck] = []
    if verify:
        session = checked_session(q.file, "the int8 decoder", OnnxDecoder, runtime_ops=True)
        q_checks = verify_decoder(wrapper.model, session, what="the dynamic int8 decoder",
                                  prompts=prompts, new_tokens=new_tokens, int8=request.tolerance)
    q_written = _size(q.file, q.data)
    if request.fp32_path is not None:
        _place(staged, data, request.fp32_path)
    fp32_diff = max((c.max_abs_diff for c in checks), default=None)
    quantized = quantized_result(request, q, q_written, fp32_bytes=written,
                                 fp32_dense_bytes=dense_bytes, fp32_diff=fp32_diff,
                                 fp32_latency=None, latency=None, fp32_path=request.fp32_path)
    if q_checks:
        quantized = replace(quantized, max_abs_diff=max(c.max_abs_diff for c in q_checks),
                            tolerance=max(c.bound for c in q_checks))
    return quantized, q.file, q.data, q.storage, q.dense_bytes, checks, q_checks


__all__ = ["DecoderExport", "export_decoder", "save_proto", "source_model", "PROTO_LIMIT"]
