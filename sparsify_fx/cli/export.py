"""``sparsify-fx export``: fold a saved model and write a verified sparse ONNX file.

    sparsify-fx export MODEL --input-shape 1,3,224,224 -o model.onnx [options]

``MODEL``: ``torchvision:<name>`` or ``package.module:factory`` with
``--weights state_dict.pt`` (loaded with ``weights_only=True``); a whole
pickled module (``torch.save(model)``, transformed or folded) only with
``--trust-pickle``, which runs code from the file. Exit status: 0 written and
verified; 2 refused with one line on stderr (bad argument, missing file, model
failing on the example input, export or verification failed: nothing written);
``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from sparsify_fx.cli.guarded import run_guarded

from sparsify_fx.cli.model_inputs import MODEL_HELP, TRUST_PICKLE_HELP, check_runs, load_model, parse_shape


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsify-fx export", description=__doc__.split("\n")[0])
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help="state_dict file for MODEL (weights_only)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
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
    """Run the export subcommand; returns the exit status (see module doc)."""
    return run_guarded("sparsify-fx export", _main, argv)


def _main(argv: list[str]) -> int:
    from sparsify_fx.export.onnx_export import export_onnx

    args = _parser().parse_args(argv)
    shape = parse_shape(args.input_shape)
    model = load_model(args.model, args.weights, args.trust_pickle)
    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn(*shape, generator=generator)
    check_runs(model, example)
    result = export_onnx(model, example, args.output, sparse=not args.dense,
                         min_sparsity=args.min_sparsity, verify=not args.no_verify,
                         dynamic_batch=not args.fixed_batch,
                         external_data=True if args.external_data else None,
                         opset=args.opset, dynamo=not args.torchscript)
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
