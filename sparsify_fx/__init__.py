"""sparsify-fx: compiler-style sparsification of PyTorch models.

Data path: ``transform`` (trace + mask nodes) -> train (CS or a baseline) ->
``fold`` -> ``report`` / ``export_onnx``. Names are imported lazily so that
``import sparsify_fx`` stays cheap and the sub-packages never import in a cycle.
"""
from __future__ import annotations

import importlib
from typing import Any

from sparsify_fx.errors import (BudgetError, ConfigError, ExportError, FoldError,
                     GenerationMismatchError, InputError, SelectionError, ShrinkError,
                     SparsifyError, TargetNotAppliedError, TraceError, TrainingError)

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "transform": "sparsify_fx.prepare",
    "PartialTraceWarning": "sparsify_fx.prepare",
    "CaptureSwitchWarning": "sparsify_fx.prepare",
    "SparsifyConfig": "sparsify_fx.config",
    "masks": "sparsify_fx.mask_index",
    "MaskEntry": "sparsify_fx.mask_index",
    "sparsity": "sparsify_fx.mask_index",
    "hard_masks": "sparsify_fx.mask_index",
    "set_hard": "sparsify_fx.mask_index",
    "Mask": "sparsify_fx.mask",
    "CSMask": "sparsify_fx.mask",
    "FixedMask": "sparsify_fx.mask",
    "available_methods": "sparsify_fx.methods",
    "calibrate": "sparsify_fx.baselines.calibration",
    "fold": "sparsify_fx.export.fold",
    "report": "sparsify_fx.export.report",
    "export_onnx": "sparsify_fx.export.onnx_export",
    "export_decoder": "sparsify_fx.export.onnx_decoder",
    "greedy_generate": "sparsify_fx.export.onnx_generate",
    "OnnxDecoder": "sparsify_fx.export.onnx_generate",
    "decode_speed": "sparsify_fx.latency.decode_speed",
    "compare_decode_speed": "sparsify_fx.latency.decode_speed",
    "param_groups": "sparsify_fx.training.cs_scheduler",
    "CSScheduler": "sparsify_fx.training.cs_scheduler",
    "apply_budget": "sparsify_fx.budgets.exact_cut",
    "Trainer": "sparsify_fx.training.trainer",
    "shrink": "sparsify_fx.passes.shrink.shrink_graph",
    "plan_hf": "sparsify_fx.hf.heads",
    "shrink_hf": "sparsify_fx.hf.shrink",
    "safe_save": "sparsify_fx.hf.save",
    "fold_to_source": "sparsify_fx.passes.shrink.to_source",
    "shrink_to_source": "sparsify_fx.passes.shrink.to_source",
    "config_cannot_hold": "sparsify_fx.passes.shrink.config_probes",
    "channel_latency": "sparsify_fx.budgets.cost_model",
    "channel_macs": "sparsify_fx.budgets.cost_model",
    "capture_latency": "sparsify_fx.latency.capture_latency",
    "DecodeStep": "sparsify_fx.latency.decoder_timing", "ForwardPass": "sparsify_fx.latency.decoder_timing",
}

__all__ = sorted([*_LAZY, "SparsifyError", "InputError", "ConfigError", "TraceError",
                  "SelectionError", "FoldError", "BudgetError", "TrainingError",
                  "ExportError", "ShrinkError", "TargetNotAppliedError",
                  "GenerationMismatchError", "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsify_fx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
