"""Command line: ``sparsify-fx {prune,report,export} ...`` (also ``python -m sparsify_fx``
and ``python -m sparsify_fx.cli``).

Holds every subcommand, one module each: :mod:`.prune` (arguments of the prune
job, which lives in ``sparsify_fx.prune``), :mod:`.report`, :mod:`.export`;
:mod:`.model_inputs` (``MODEL`` / ``--weights`` loading shared by all of them),
:mod:`.guarded` (one-line errors with exit status 2, ``--debug`` tracebacks,
SIGTERM as an interrupt) and :mod:`.demo` (the demo job written against the
Python API). This module only dispatches, importing a subcommand when it runs.

May import: anything in the package (it is the top of the data path); nothing
imports it but ``sparsify_fx.__main__`` and the prune job (for ``model_inputs``).
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "prune": ("sparsify_fx.cli.prune", "Prune a model on a dataset end to end (recipe, resume, "
                                       "torchrun), writing model, reports and verified ONNX."),
    "report": ("sparsify_fx.cli.report", "Print the per-layer sparsity/params/MACs table."),
    "export": ("sparsify_fx.cli.export", "Fold and write a verified sparse ONNX file."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:8s} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
        text = ("usage: sparsify-fx {prune,report,export} [options]   (sparsify-fx SUBCOMMAND -h "
                "for its options)\n\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"sparsify-fx: error: unknown subcommand {argv[0]!r}; use one of "
                  f"{', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
        print(text)
        return 0 if argv else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
