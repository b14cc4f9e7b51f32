"""``sparsify-fx report MODEL``: print the per-layer sparsity/params/MACs table.

MODEL is ``torchvision:<name>`` (or a bare torchvision name, ``weights=None``),
``package.module:factory`` with ``--weights state_dict.pt`` (``weights_only``),
or a whole pickled module (transformed, folded or plain) with
``--trust-pickle``, which runs code from the file. Writes only the files named
by ``--output`` and ``--plot``. Errors: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from sparsify_fx.cli.guarded import run_guarded
from sparsify_fx.errors import InputError

from sparsify_fx.cli.model_inputs import MODEL_HELP, TRUST_PICKLE_HELP, check_runs, load_model, parse_shape

FORMATS = ("table", "markdown", "json", "csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsify-fx report",
        description="Per-layer sparsity, parameters and MACs (FLOPs = 2 x MACs) of a model.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help="state_dict file for MODEL (weights_only)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--input-shape", default="1,3,224,224",
                   help="example input shape, e.g. 1,3,224,224 (default)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--compare", metavar="MODEL",
                   help="second model (same forms as MODEL, no --weights): print before "
                        "(MODEL) / after side by side")
    p.add_argument("--plot", metavar="PNG", help="also write the per-layer sparsity plot")
    p.add_argument("--output", "-o", metavar="FILE", help="write the rendering here, not stdout")
    return p


def main(argv: list[str]) -> int:
    """Run the report subcommand; returns the exit status."""
    return run_guarded("sparsify-fx report", _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from sparsify_fx.export.report import report
    shape = parse_shape(args.input_shape)
    model = load_model(args.model, args.weights, args.trust_pickle)
    x = torch.randn(*shape)
    check_runs(model, x)
    rep = report(model, x, name=os.path.basename(args.model))
    if args.compare:
        other = load_model(args.compare, trust_pickle=args.trust_pickle)
        check_runs(other, x)
        before = report(other, x, name=os.path.basename(args.compare))
        shown = before.compare(rep)
    else:
        shown = rep
    text = {"table": lambda: str(shown), "markdown": shown.to_markdown,
            "json": shown.to_json, "csv": shown.to_csv}[args.format]()
    if args.plot:
        rep.plot(args.plot)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text if text.endswith("\n") else text + "\n")
        except OSError as exc:
            raise InputError(f"cannot write --output {args.output!r} ({exc.strerror}); pick a "
                             "writable path") from None
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
