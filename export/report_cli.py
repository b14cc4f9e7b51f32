"""``sparsify-fx report MODEL``: print the per-layer sparsity/params/MACs table.

MODEL is a file written by ``torch.save(model)`` (a whole module: transformed,
folded or plain) or a torchvision model name (built with ``weights=None``).
Writes only the files named by ``--output`` and ``--plot``.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys

import torch
from torch import nn

from sparsify_fx.errors import InputError, SparsifyError

FORMATS = ("table", "markdown", "json", "csv")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; write it like 1,3,224,224")
    return shape


def load_model(spec: str) -> nn.Module:
    """A torch.save'd module from a path, or a torchvision model (weights=None) by name."""
    if os.path.exists(spec):
        obj = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(obj, nn.Module):
            raise InputError(
                f"{spec} holds a {type(obj).__name__}, not a module; save the whole model with "
                "torch.save(model, path) (a state_dict has no architecture to count)"
            )
        return obj
    import torchvision.models as tvm
    names = tvm.list_models()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        raise InputError(
            f"{spec!r} is neither an existing file nor a torchvision model name"
            + (f"; did you mean {', '.join(close)}?" if close else
               "; see torchvision.models.list_models()")
        )
    return tvm.get_model(spec, weights=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsify-fx report",
        description="Per-layer sparsity, parameters and MACs (FLOPs = 2 x MACs) of a model.")
    p.add_argument("model", help="torch.save'd whole module, or a torchvision model name")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224),
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
