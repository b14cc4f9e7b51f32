"""``sparsify-fx export``: fold a saved model and write a verified sparse ONNX file.

    sparsify-fx export MODEL --input-shape 1,3,224,224 -o model.onnx [options]

``MODEL`` is a file written by ``torch.save(model)`` (a whole pickled module,
transformed or folded; loaded with ``weights_only=False``, so only load files
you trust) or ``torchvision:<name>`` for an untrained torchvision model
(``weights=None``). Exit status: 0 written and verified, 1 export or
verification failed (nothing written), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from sparsify_fx.errors import SparsifyError

from .cli_models import load_model, parse_shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsify-fx export", description=__doc__.split("\n")[0])
    p.add_argument("model", help="torch.save'd nn.Module file, or torchvision:<name>")
    p.add_argument("-o", "--output", required=True, help="path of the .onnx file to write")
    p.add_argument("--input-shape", required=True,
                   help="example input shape, comma separated, e.g. 1,3,224,224")
    p.add_argument("--min-sparsity", type=float, default=0.5,
                   help="store initializers with at least this fraction of zeros as COO "
                        "(default 0.5)")
    p.add_argument("--dense", action="store_true", help="keep every initializer dense")
    p.add_argument("--no-verify", action="store_true",
                   help="skip onnx.checker and the onnxruntime comparison")
    p.add_argument("--external-data", action="store_true",
                   help="write weights to <output>.data (default: only over 2 GB)")
    p.add_argument("--fixed-batch", action="store_true", help="do not make dim 0 dynamic")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (exporter default)")
    p.add_argument("--torchscript", action="store_true",
                   help="use the deprecated TorchScript exporter instead of torch.export")
    p.add_argument("--seed", type=int, default=0, help="seed of the random example input")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    return p


def main(argv: list[str]) -> int:
    """Run the export subcommand; returns the exit status."""
    from .onnx_export import export_onnx

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or usage error (2)
        return int(exc.code or 0)
    try:
        model = load_model(args.model)
        generator = torch.Generator().manual_seed(args.seed)
        example = torch.randn(*parse_shape(args.input_shape), generator=generator)
        result = export_onnx(model, example, args.output, sparse=not args.dense,
                             min_sparsity=args.min_sparsity, verify=not args.no_verify,
                             dynamic_batch=not args.fixed_batch,
                             external_data=True if args.external_data else None,
                             opset=args.opset, dynamo=not args.torchscript)
    except SparsifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    for init in result.initializers:
        if init.storage == "sparse":
            print(f"  sparse {init.name:40s} sparsity {init.sparsity:.3f} "
                  f"{init.bytes:>12,} / {init.dense_bytes:,} bytes")
    if args.json:
        record = {"path": str(result.path), "bytes": result.bytes,
                  "dense_bytes": result.dense_bytes, "ratio": result.ratio,
                  "max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance,
                  "latency_ms": result.latency_ms,
                  "initializers": [asdict(i) for i in result.initializers]}
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
    return 0
