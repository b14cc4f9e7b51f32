"""``sparsify-fx report MODEL``: print the per-layer sparsity/params/MACs table.

MODEL is a file written by ``torch.save(model)`` (a whole module: transformed,
folded or plain) or a torchvision model name (built with ``weights=None``).
Writes only the files named by ``--output`` and ``--plot``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from sparsify_fx.errors import SparsifyError

from .cli_models import load_model, parse_shape

FORMATS = ("table", "markdown", "json", "csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsify-fx report",
        description="Per-layer sparsity, parameters and MACs (FLOPs = 2 x MACs) of a model.")
    p.add_argument("model", help="torch.save'd whole module, or a torchvision model name")
    p.add_argument("--input-shape", type=parse_shape, default=(1, 3, 224, 224),
                   help="example input shape, e.g. 1,3,224,224 (default)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--compare", metavar="MODEL",
                   help="second model (path or name): print before (MODEL) / after side by side")
    p.add_argument("--plot", metavar="PNG", help="also write the per-layer sparsity plot")
    p.add_argument("--output", "-o", metavar="FILE", help="write the rendering here, not stdout")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from sparsify_fx.export.report import report
    try:
        model = load_model(args.model)
        x = torch.randn(*args.input_shape)
        rep = report(model, x, name=os.path.basename(args.model))
        if args.compare:
            before = report(load_model(args.compare), x, name=os.path.basename(args.compare))
            shown = before.compare(rep)
        else:
            shown = rep
        text = {"table": lambda: str(shown), "markdown": shown.to_markdown,
                "json": shown.to_json, "csv": shown.to_csv}[args.format]()
        if args.plot:
            rep.plot(args.plot)
    except SparsifyError as exc:
        print(f"sparsify-fx report: error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
