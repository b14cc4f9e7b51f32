"""Command line: ``sparsify-fx report ...`` and ``sparsify-fx export ...``.

Each subcommand lives next to the code it drives; this module only dispatches.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "report": ("sparsify_fx.export.report_cli", "Print the per-layer sparsity/params/MACs table."),
    "export": ("sparsify_fx.export.onnx_cli", "Fold and write a verified sparse ONNX file."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:8s} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
        print("usage: sparsify-fx {report,export} [options]\n\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
