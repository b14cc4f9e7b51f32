"""``sparsify-fx prune MODEL --data DATA -o OUTDIR [--recipe recipe.toml] [options]``.

Every recipe key (:mod:`.recipe`) is also a flag (``target_sparsity`` ->
``--target-sparsity``); flags override the recipe. See docs/cli.md.
"""
from __future__ import annotations

import argparse
from typing import Any

from sparsify_fx.cli.guarded import run_guarded
from sparsify_fx.errors import InputError
from sparsify_fx.prune.recipe import KEYS, load_recipe, to_toml

_SPECIAL = {"model", "data"}


def build_parser() -> argparse.ArgumentParser:
    from sparsify_fx.cli.model_inputs import MODEL_HELP, TRUST_PICKLE_HELP
    from sparsify_fx.prune.datasets import DATA_HELP

    p = argparse.ArgumentParser(
        prog="sparsify-fx prune",
        description="Prune MODEL on DATA end to end: transform, train (progress bars, a "
                    "checkpoint every epoch), exact cut, fine-tune, fold (element) or shrink "
                    "(channel), then write model.pt, report.md/json, sparsity.png, a verified "
                    "model.onnx and summary.json into OUTDIR (hf:DIR models also hf/, the "
                    "save_pretrained folder; --task causal-lm also decoder.onnx, the verified "
                    "decoder with past key/values, and its prefill / decode tokens/s beside "
                    "dense). Rerun the same command to resume.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help=MODEL_HELP + ", or hf:DIR (a Hugging Face save_pretrained folder; "
                   "with --task)")
    p.add_argument("--data", default=None, help=f"DATA: {DATA_HELP}")
    p.add_argument("-o", "--output", metavar="OUTDIR", default=None,
                   help="folder for checkpoints and outputs (required unless --print-recipe)")
    p.add_argument("--recipe", metavar="TOML", default=None,
                   help="recipe file; keys are the long option names; flags override it")
    p.add_argument("--print-recipe", action="store_true",
                   help="print the effective recipe (defaults < recipe < flags) as TOML and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUTDIR that holds a run with another recipe (or restart it)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    for key in KEYS:
        if key.name in _SPECIAL:
            continue
        flag = "--" + key.name.replace("_", "-")
        default = "" if key.default is None else f" (default {key.default})"
        if key.kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=key.help + default)
        elif key.kind is list:
            p.add_argument(flag, action="append", default=None, metavar="GLOB",
                           help=key.help + " (repeatable)")
        else:
            p.add_argument(flag, type=key.kind, default=None, metavar=key.name.upper(),
                           choices=key.choices or None, help=key.help + default)
    return p


def main(argv: list[str]) -> int:
    """Run the prune subcommand; returns the exit status (0 done, 2 refused, 130 interrupted)."""
    return run_guarded("sparsify-fx prune", _main, argv)


def _print_summary(summary: dict[str, Any], outdir: str) -> None:
    metric, sp, macs, size = (summary["metric"], summary["sparsity"], summary["macs"],
                              summary["bytes"])
    unit = " %" if metric["name"] == "accuracy" else ""
    same = summary[metric["name"]]["onnx_equals_pytorch"]
    verdict = "equal to" if same else (
        "within tolerance of" if metric["onnx_within_tolerance"] else "DIFFERENT from")
    print(f"val {metric['name']}: before {metric['before']:.2f}{unit}, after "
          f"{metric['after']:.2f}{unit}, onnxruntime {metric['onnx']:.2f}{unit} "
          f"({verdict} PyTorch)")
    print(f"sparsity over masked weights {sp['masked']:.4f}, over all prunable weights "
          f"{sp['weights']:.4f}; MACs {macs['effective']:,.0f} / {macs['dense']:,} "
          f"({macs['ratio']:.3f} of dense)")
    print(f"model.onnx {size['model_onnx']:,} bytes (dense {size['model_onnx_dense']:,}); "
          f"wall time {summary['wall_time_s']:.1f} s; outputs in {outdir}")


def _main(argv: list[str]) -> int:
    from sparsify_fx.prune.outdir import OutDir
    from sparsify_fx.prune.outputs import command_line
    from sparsify_fx.prune.run import Context, run

    args = build_parser().parse_args(argv)
    flags = {k.name: getattr(args, k.name) for k in KEYS}
    recipe = load_recipe(args.recipe, flags)
    if args.print_recipe:
        print(to_toml(recipe), end="")
        return 0
    if not args.output:
        raise InputError("-o OUTDIR is required: the folder for checkpoints and outputs")
    ctx = Context(recipe, OutDir(args.output), progress=not args.quiet,
                  command=command_line(argv), trust_pickle=args.trust_pickle)
    try:
        summary = run(ctx, args.overwrite)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if summary is not None:
        _print_summary(summary, args.output)
        if ctx.hf is not None:
            print(f"Hugging Face model (save_pretrained): {args.output}/hf")
    return 0
