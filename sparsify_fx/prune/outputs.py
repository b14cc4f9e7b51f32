"""Outputs of ``sparsify-fx prune`` and :func:`load_pruned`, which rebuilds ``model.pt``.

``model.pt`` (loadable with ``torch.load(weights_only=True)``) holds
``format``, ``spec`` (MODEL, the transform options, ``output``: ``fold`` or
``shrink``, the example input shape), ``state_dict`` (the pruned plain model)
and ``masked_state_dict`` (the transformed model after training, from which
``load_pruned`` rebuilds the exact architecture, shrunk channels included).
``hf:DIR`` runs also write ``hf/``: the pruned model as its source Hugging Face
class (``save_pretrained``) with the tokenizer / image processor files, which
``load_pruned`` loads; ``--task causal-lm`` runs also ``decoder.onnx`` and tokens/s
(:mod:`sparsify_fx.prune.decoder_outputs`).
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsify_fx.errors import ExportError, InputError
from sparsify_fx.prune.outdir import DECODER_FILE, HF_FOLDER, INT8_FILE, OUTPUTS, OutDir

#: training batches the static int8 export calibrates on
CALIBRATION_BATCHES = 8
#: the int8 file may lose at most this fraction of the fp32 accuracy (2 %: 1 point at 50 %)
INT8_MAX_ACCURACY_DROP = 0.02

if TYPE_CHECKING:
    from sparsify_fx.prune.datasets import Data
    from sparsify_fx.prune.run import Context

FORMAT = "sparsify-fx-prune/1"
TRANSFORM_KEYS = ("method", "granularity", "include", "exclude", "keep_first", "keep_last",
                  "target_sparsity", "target_macs", "target_latency")


def outputs_present(out: OutDir) -> bool:
    return all(out.file(n).is_file() for n in OUTPUTS)


def _finalize_model(gm: nn.Module, granularity: str) -> nn.Module:
    if granularity == "channel":
        from sparsify_fx.passes.shrink.shrink_graph import shrink
        return shrink(gm).eval()
    from sparsify_fx.export.fold import fold
    return fold(gm).eval()


def write_outputs(ctx: "Context", original: nn.Module, gm: nn.Module, data: "Data",
                  example: torch.Tensor, before: float, resumed: bool,
                  masks_equal: bool | None, wall_s: float) -> dict[str, Any]:
    """Fold or shrink ``gm``, then stage and publish every output; returns the summary.

    MACs and parameters are compared with ``original`` (the input model, untouched)."""
    from sparsify_fx.export.onnx_export import export_onnx
    from sparsify_fx.export.report import report
    from sparsify_fx.mask_index import sparsity

    t0 = time.monotonic()
    r, task = ctx.recipe, ctx.task
    final = _finalize_model(gm, r["granularity"])
    # element masks: the masked model's report counts sparsity over exactly the masked
    # weights; channel: the shrunk model is what runs, so report it
    rep = report(gm if r["granularity"] != "channel" else final, example, name=r["model"])
    dense = report(original, example)
    stage = ctx.out.staging()
    (stage / "report.json").write_text(rep.to_json() + "\n", encoding="utf-8")
    rep.plot(str(stage / "sparsity.png"))
    batch = next(iter(task.loader(data.val, 8)))[0]
    decoder = None
    try:
        onnx = export_onnx(final, (batch,), stage / "model.onnx")
        if ctx.hf is not None:
            from sparsify_fx.prune.hf_task import save_pruned
            saved = save_pruned(ctx.hf, final, stage / HF_FOLDER, batch)
            if ctx.hf.task == "causal-lm":  # the generation file, timed beside dense
                from sparsify_fx.prune.decoder_outputs import write_decoder
                decoder = write_decoder(ctx.hf.source, saved, stage)
    except ExportError as exc:
        raise ExportError(f"{exc} (the pruned model is kept in "
                          f"{ctx.out.checkpoint('final.pt')}; rerun resumes there)") from exc
    after = task.evaluate(final, data.val)
    onnx_metric = task.evaluate_onnx(onnx.run, data.val)
    int8 = _quantized(final, batch, data, ctx, stage) if r["quantize"] else None
    dense_onnx = _dense_onnx(original, batch, stage)
    generation = ""
    if decoder is not None:
        from sparsify_fx.prune.decoder_outputs import generation_markdown
        generation = "\n\n" + generation_markdown(decoder)
    (stage / "report.md").write_text(rep.to_markdown() + "\n\n"
                                     + _artefacts(dense_onnx, onnx, int8) + generation + "\n",
                                     encoding="utf-8")
    spec = {"model": r["model"], "weights": r["weights"],
            "transform": {**{k: r[k] for k in TRANSFORM_KEYS}, **ctx.method_options},
            "output": "shrink" if r["granularity"] == "channel" else "fold", "task": r["task"],
            "input_shape": list(example.shape)}
    torch.save({"format": FORMAT, "spec": spec, "state_dict": final.state_dict(),
                "masked_state_dict": gm.state_dict()}, stage / "model.pt")
    summary = {
        "command": ctx.command, "recipe": r, "data": data.description,
        "task": r["task"] or "classification",
        "metric": {"name": task.metric, "split": "val", "before": before, "after": after,
                   "onnx": onnx_metric, "tolerance": task.tolerance(data.val),
                   "onnx_within_tolerance": task.close(after, onnx_metric, data.val)},
        task.metric: {"split": "val", "before": before, "after": after, "onnx": onnx_metric,
                      "onnx_equals_pytorch": onnx_metric == after},
        "sparsity": {"target": r["target_sparsity"], "masked": float(sparsity(gm)),
                     "weights": rep.weight_sparsity},
        "latency": {"target_fraction": r["target_latency"],
                    "onnx_ms": onnx.latency_ms},
        "macs": {"target_fraction": r["target_macs"], "dense": dense.total_dense_macs,
                 "effective": rep.total_macs,
                 "ratio": rep.total_macs / max(dense.total_dense_macs, 1),
                 "input_shape": list(example.shape)},
        "params": {"before": dense.total_params, "after": rep.total_params,
                   "nonzero_after": rep.total_nonzeros},
        "bytes": {"model_onnx": onnx.bytes, "model_onnx_dense": onnx.dense_bytes,
                  "model_pt": (stage / "model.pt").stat().st_size},
        "onnx": {"max_abs_diff": onnx.max_abs_diff, "tolerance": onnx.tolerance},
        "dense_onnx": {"bytes": dense_onnx.bytes, "latency_ms": dense_onnx.latency_ms},
        "int8": int8,
        "decoder": decoder,
        "epochs": {"train": r["epochs"], "finetune": r["finetune_epochs"]},
        "wall_time_s": 0.0, "resumed": resumed, "world_size": ctx.world,
        "masks_equal_across_ranks": masks_equal, "notes": ctx.notes,
    }
    summary["wall_time_s"] = round(wall_s + time.monotonic() - t0, 3)
    (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    ctx.out.publish(stage, list(OUTPUTS) + ([INT8_FILE] if int8 else [])
                    + ([HF_FOLDER] if ctx.hf is not None else [])
                    + ([DECODER_FILE] if decoder is not None else []))
    return summary


def _dense_onnx(original: nn.Module, batch: torch.Tensor, stage: Any) -> Any:
    """The input model exported as fp32 ONNX (verified) into a scratch file that is not
    kept: the reference row of the Artefacts table."""
    from sparsify_fx.export.onnx_export import export_onnx
    with tempfile.TemporaryDirectory(dir=stage) as scratch:
        return export_onnx(original, (batch,), Path(scratch) / "dense.onnx")


def _artefacts(dense: Any, onnx: Any, int8: dict[str, Any] | None) -> str:
    """Markdown table of the deployed files: bytes and onnxruntime latency (the validation
    batch of 8, median of 5 runs), beside the input model exported as dense fp32."""
    def ms(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "-"
    rows = [("input model, dense fp32 (not kept)", dense.bytes, ms(dense.latency_ms)),
            ("model.onnx (pruned fp32)", onnx.bytes, ms(onnx.latency_ms)),
            ("model.onnx stored dense", onnx.dense_bytes, "-")]
    if int8:
        rows.append((f"{INT8_FILE} (pruned {int8['mode']})", int8["bytes"], ms(int8["latency_ms"])))
    lines = ["## Artefacts", "", "| file | bytes | onnxruntime ms |", "|---|---:|---:|"]
    lines += [f"| {name} | {size:,} | {t} |" for name, size, t in rows]
    return "\n".join(lines)


def _quantized(final: nn.Module, batch: torch.Tensor, data: "Data", ctx: "Context",
               stage: Any) -> dict[str, Any]:
    """Write and verify ``model_int8.onnx`` (recipe key ``quantize``); its summary entry:
    bytes, latency and accuracy of the int8 file beside the fp32 one's."""
    from sparsify_fx.export.onnx_export import export_onnx
    from sparsify_fx.export.quantize import Int8Tolerance

    r, task = ctx.recipe, ctx.task
    calibration = None
    if r["quantize"] == "int8":  # a few training batches: onnxruntime keeps their activations
        train = task.training_loader(data.train, r["batch_size"])
        calibration = [x for x, _ in itertools.islice(train, CALIBRATION_BATCHES)]
    try:
        res = export_onnx(final, (batch,), stage / INT8_FILE, quantize=r["quantize"],
                          calibration=calibration,
                          metric=lambda predict: task.int8_score(predict, data.val),
                          int8_tolerance=Int8Tolerance(max_metric_drop=INT8_MAX_ACCURACY_DROP))
    except ExportError as exc:
        raise ExportError(f"--quantize {r['quantize']}: {exc}") from exc
    q = res.quantized
    return {"mode": q.mode, "file": INT8_FILE, "bytes": q.bytes, "fp32_bytes": q.fp32_bytes,
            "latency_ms": q.latency_ms, "fp32_latency_ms": q.fp32_latency_ms,
            **_int8_metric(task.metric, q.metric_int8, q.metric_fp32),
            "max_abs_diff": q.max_abs_diff, "tolerance": q.tolerance,
            "calibration_batches": len(calibration) if calibration else 0}


def _int8_metric(metric: str, int8: float | None, fp32: float | None) -> dict[str, Any]:
    """The int8 check's scores as the task's metric: accuracy (percent) or perplexity."""
    def value(score: float | None) -> float | None:
        if score is None:
            return None
        return 100.0 * score if metric == "accuracy" else 1.0 / score
    return {f"{metric}_onnx": value(int8), f"{metric}_fp32_onnx": value(fp32)}


def command_line(argv: list[str]) -> str:
    return shlex.join(["sparsify-fx", "prune", *argv])


def load_pruned(path: str | os.PathLike, trust_pickle: bool = False) -> nn.Module:
    """Rebuild the pruned model saved by ``sparsify-fx prune`` as ``model.pt``.

    Builds MODEL from the spec, transforms it as the run did, loads the trained
    masks and weights, folds or shrinks, then loads ``state_dict`` (strict). The
    file is read with ``weights_only=True``; MODEL must be importable here.
    """
    from sparsify_fx.cli.model_inputs import load_model
    from sparsify_fx.prepare import transform

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - missing, truncated or foreign file
        raise InputError(f"cannot read {os.fspath(path)!r} as a prune model.pt "
                         f"({type(exc).__name__}); pass OUTDIR/model.pt") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise InputError(f"{os.fspath(path)!r} is not a model.pt written by sparsify-fx prune "
                         f"(format {FORMAT})")
    spec = saved["spec"]
    if spec.get("task") is not None:  # an hf:DIR run: its hf/ folder is the pruned model
        from sparsify_fx.prune.hf_task import load_saved
        return load_saved(Path(path).parent / HF_FOLDER, spec["task"])
    t = dict(spec["transform"])
    t["include"], t["exclude"] = t["include"] or None, t["exclude"] or None
    example = torch.zeros(spec["input_shape"])
    gm = transform(load_model(spec["model"], trust_pickle=trust_pickle), **t,
                   example_inputs=example)
    gm.load_state_dict(saved["masked_state_dict"])
    final = _finalize_model(gm, "channel" if spec["output"] == "shrink" else "element")
    final.load_state_dict(saved["state_dict"])
    return final
