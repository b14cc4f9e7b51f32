"""Dense vs CS at an exact 90 % on scikit-learn digits, through the Python API.

``make demo`` now runs ``sparsify-fx prune`` with ``examples/digits_cs90.toml``;
this module is the same job written against the API (``python -m
sparsify_fx.cli.demo``), and ``benchmarks/cs_digits.py`` reuses its functions.

Steps: train a dense DigitsCNN; transform a fresh one with CS and
``target_sparsity``; train with the CS scheduler (beta annealing, lambda
controller) and cut to the exact target; fine-tune with the mask fixed; fold;
print test accuracies and the per-layer report (sparsity, params, MACs); export a verified sparse ONNX file and check that
onnxruntime's test accuracy equals PyTorch's.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from sparsify_fx.data import Splits, digits
from sparsify_fx.mask_index import sparsity
from sparsify_fx.models import DigitsCNN
from sparsify_fx.prepare import transform
from sparsify_fx.training.trainer import Trainer, evaluate


@dataclass
class CSRun:
    """Outcome of :func:`train_cs`: the folded model and its numbers."""

    model: nn.Module
    test_acc: float
    sparsity: float
    changed_bits: int
    epochs: int


def train_dense(data: Splits, seed: int, epochs: int = 20, progress: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    Trainer(model, data.train, epochs=epochs, lr=0.05, seed=seed, progress=progress).fit()
    return model


def train_cs(data: Splits, seed: int, target: float, epochs: int = 20, finetune: int = 10,
             progress: bool = False, **cs_options: object) -> CSRun:
    """CS from scratch to exactly ``target`` sparsity, then ``finetune`` epochs with the mask fixed."""
    from sparsify_fx.export.fold import fold
    torch.manual_seed(seed)
    gm = transform(DigitsCNN(), method="cs", target_sparsity=target)
    trainer = Trainer(gm, data.train, epochs=epochs, lr=0.05, mask_lr=0.01, seed=seed,
                      progress=progress, **cs_options)
    run = trainer.fit()
    assert run.cut is not None
    if finetune:
        Trainer(gm, data.train, epochs=finetune, lr=0.01, seed=seed + 1, progress=progress).fit()
    folded = fold(gm)
    return CSRun(folded, evaluate(folded, data.loader("test")), float(sparsity(gm)),
                 run.cut.changed_bits, epochs + finetune)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=None, help="folder for the ONNX file (default: temp)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = digits(args.seed)

    print(f"== dense DigitsCNN on sklearn digits (seed {args.seed})", flush=True)
    dense = train_dense(data, args.seed, args.epochs, args.progress)
    dense_acc = evaluate(dense, data.loader("test"))
    print(f"dense test accuracy: {dense_acc:.2f} %", flush=True)

    print(f"== Continuous Sparsification to exactly {args.target:.0%} sparsity", flush=True)
    cs = train_cs(data, args.seed, args.target, args.epochs, progress=args.progress)
    print(f"CS sparsity over masked weights: {cs.sparsity:.4f} "
          f"(final exact cut changed {cs.changed_bits} mask bits vs s > 0)")
    print(f"CS test accuracy: {cs.test_acc:.2f} %  (dense {dense_acc:.2f} %, "
          f"gap {dense_acc - cs.test_acc:+.2f} points)", flush=True)
    _report_and_export(cs.model, data, args.out)
    return 0


def _report_and_export(model: nn.Module, data: Splits, out: str | None) -> None:
    """Report table and verified ONNX export of the folded model."""
    import numpy as np

    from sparsify_fx import export_onnx, report
    x_test, y_test = data.test.tensors
    print(report(model, x_test[:1]))
    folder = out or tempfile.mkdtemp(prefix="sparsify_fx_demo_")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "digits_cs.onnx")
    result = export_onnx(copy.deepcopy(model).eval(), (x_test[:8],), path)
    onnx_logits = result.run(x_test.numpy())
    onnx_acc = 100.0 * float((np.argmax(onnx_logits, 1) == y_test.numpy()).mean())
    torch_acc = evaluate(model, data.loader("test"))
    print(f"ONNX: {path}  {result.bytes} bytes (dense {result.dense_bytes}), "
          f"max abs diff {result.max_abs_diff:.2e}")
    print(f"onnxruntime test accuracy {onnx_acc:.2f} % vs PyTorch {torch_acc:.2f} %: "
          f"{'equal' if abs(onnx_acc - torch_acc) < 1e-9 else 'DIFFERENT'}")
    if abs(onnx_acc - torch_acc) > 1e-9:
        sys.exit(1)


if __name__ == "__main__":
    raise SystemExit(main())
