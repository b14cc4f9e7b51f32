"""CS against magnitude, GMP, IMP, L0, STE and random masks, same trainer and budgets.

Runs models x methods x target sparsities x seeds, appends one JSON line per
run to ``<out>.jsonl`` as it goes (a partial run still yields results; rerun
with the same ``--out`` to resume), then writes ``<out>.json``, ``<out>.md``
and ``<out>.png`` (see compare_report.py).

    python benchmarks/compare.py --quick                      # CI smoke, digits
    python benchmarks/compare.py --data-dir ../shared/data/mnist --out benchmarks/results/compare_mnist

Every run: ``train`` epochs at lr 0.05 then ``finetune`` epochs at lr 0.01 with
the mask fixed (masks are cut to exactly the target in between; magnitude
prunes the dense model after its train phase). IMP runs one trajectory per
model and seed through the listed sparsities (one level per sparsity, weights
rewound to ``--rewind`` steps each level); each level costs ``train +
finetune`` epochs and its reported epochs are cumulative. ``gmp_cs_alloc`` is
GMP with the per-layer sparsities CS found for the same model, seed and target.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

import compare_methods as cm  # benchmarks/ is on sys.path when run as a script
from compare_report import write_outputs

import sparsify_fx as sf
from sparsify_fx.budgets.exact_cut import macs_fraction, weight_costs
from sparsify_fx.data import Splits, digits, mnist
from sparsify_fx.models import Conv2
from sparsify_fx.training.trainer import evaluate

METHODS = ("dense", "cs", "imp", "gmp", "gmp_cs_alloc", "l0", "ste", "magnitude", "random")


class LeNet300100(nn.Module):
    """LeNet-300-100: Flatten -> 300 -> 100 -> 10 (ReLU)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 300), nn.ReLU(),
                                 nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def model_factory(name: str, data: Splits) -> Callable[[], nn.Module]:
    side = int(data.train.tensors[0].shape[-1])
    if name == "lenet300100":
        return lambda: LeNet300100(side * side)
    if name == "conv2":
        return lambda: Conv2(side)
    raise SystemExit(f"unknown model {name!r}; use lenet300100 or conv2")


def measure(gm: nn.Module, data: Splits, example: torch.Tensor) -> dict[str, Any]:
    """Folded test accuracy, exact sparsity (masks and folded zeros) and effective MACs."""
    costs = weight_costs(gm, example)
    entries = [e for e in sf.masks(gm) if not e.mask.auxiliary]
    kept = sum(e.mask.kept_weights() for e in entries)
    total = sum(e.mask.numel() for e in entries)
    folded = sf.fold(gm)
    params = dict(folded.named_parameters())
    zeros = sum(int((params[e.name] == 0).sum()) for e in entries)
    return {"test_acc": evaluate(folded, data.loader("test")),
            "val_acc": evaluate(folded, data.loader("val")),
            "sparsity": zeros / total, "mask_sparsity": 1.0 - kept / total,
            "kept_weights": kept, "total_weights": total,
            "effective_macs": sum(e.mask.kept_weights() * costs[e.name] for e in entries),
            "macs_fraction": macs_fraction(gm, costs)}


def dense_measure(model: nn.Module, data: Splits, example: torch.Tensor) -> dict[str, Any]:
    gm = sf.transform(model, method="fixed")
    return measure(gm, data, example)


class Recorder:
    """Appends run rows to a JSON-lines file and remembers what is done (resume)."""

    def __init__(self, path: str, fresh: bool = False) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if fresh and os.path.exists(path):
            os.remove(path)
        if os.path.exists(path):
            with open(path) as fh:
                self.rows = [json.loads(line) for line in fh if line.strip()]

    def key(self, **k: Any) -> tuple:
        return (k["dataset"], k["model"], k["method"], round(float(k["target"]), 4), k["seed"])

    def done(self, **k: Any) -> bool:
        return any(self.key(**r) == self.key(**k) for r in self.rows)

    def find(self, **k: Any) -> dict[str, Any] | None:
        return next((r for r in self.rows if self.key(**r) == self.key(**k)), None)

    command = ""

    def add(self, row: dict[str, Any]) -> None:
        row["command"] = self.command
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{row['model']:12s} {row['method']:13s} t={row['target']:.2f} seed={row['seed']} "
              f"acc={row['test_acc']:6.2f} sparsity={row['sparsity']:.4f} "
              f"epochs={row['epochs']:3d} {row['wall_s']:6.1f}s", flush=True)


def run_all(args: argparse.Namespace, data: Splits, rec: Recorder) -> None:
    b = cm.Budget(args.train_epochs, args.finetune_epochs, args.batch_size)
    example = data.test.tensors[0][:2]
    methods = [m for m in METHODS if m in args.methods]
    for model_name in args.models:
        make = model_factory(model_name, data)
        for seed in args.seeds:
            base = dict(dataset=args.dataset, model=model_name, seed=seed)

            def record(method: str, target: float, fn: Callable[[], cm.Trained]) -> None:
                if rec.done(method=method, target=target, **base):
                    return
                start = time.perf_counter()
                out = fn()
                row = {**base, "method": method, "target": target, "epochs": out.epochs,
                       **measure(out.model, data, example), **out.extra}
                row["wall_s"] = time.perf_counter() - start
                rec.add(row)

            start = time.perf_counter()
            dense_out, after_train = cm.dense(make, data, b, seed)
            dense_s = time.perf_counter() - start
            if "dense" in methods and not rec.done(method="dense", target=0.0, **base):
                rec.add({**base, "method": "dense", "target": 0.0, "epochs": b.total,
                         **dense_measure(dense_out.model, data, example), "wall_s": dense_s})
            if "imp" in methods and not all(rec.done(method="imp", target=t, **base)
                                            for t in args.sparsities):
                _run_imp(args, make, data, b, seed, base, rec, example)
            for t in args.sparsities:
                if "cs" in methods:
                    record("cs", t, lambda: cm.cs(make, data, t, seed, b))
                if "gmp_cs_alloc" in methods and (cs_row := rec.find(method="cs", target=t, **base)):
                    alloc = cs_row["layer_sparsity"]
                    record("gmp_cs_alloc", t, lambda: cm.gmp(make, data, alloc, seed, b))
                for m in ("gmp", "l0", "ste", "random"):
                    if m in methods:
                        record(m, t, lambda m=m: getattr(cm, m)(make, data, t, seed, b))
                if "magnitude" in methods:
                    record("magnitude", t, lambda: cm.magnitude(after_train, data, t, seed, b))


def _run_imp(args: argparse.Namespace, make: Callable[[], nn.Module], data: Splits,
             b: cm.Budget, seed: int, base: dict[str, Any], rec: Recorder,
             example: torch.Tensor) -> None:
    start = time.perf_counter()
    targets = sorted(args.sparsities)
    steps = -(-len(data.train) // b.batch)
    rewind = int(round(args.rewind * steps))

    def on_level(row: dict[str, Any], gm: nn.Module) -> None:
        level = row["level"]
        target = 0.0 if level == 0 else targets[level - 1]
        out = {**base, "method": "imp", "target": target, "epochs": row["epochs"],
               "level": level, "rewind_iteration": rewind, **measure(gm, data, example),
               "wall_s": time.perf_counter() - start}
        if not rec.done(method="imp", target=target, **base):
            rec.add(out)

    cm.imp(make, data, targets, seed, b, rewind, on_level)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 2 sparsities, 1 seed, 4 + 2 epochs, 1 thread; always a fresh run")
    p.add_argument("--data-dir", default=None, help="MNIST folder (t10k IDX files); default digits")
    p.add_argument("--models", nargs="+", default=["lenet300100", "conv2"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95, 0.98])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 128 on MNIST, 32 on digits (1,257 training images)")
    p.add_argument("--rewind", type=float, default=0.5, help="IMP rewind point in epochs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: run two processes with disjoint --models/--seeds instead)")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild .json/.md/.png from <out>.jsonl (e.g. after parallel runs)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/compare_<data>)")
    args = p.parse_args(argv)
    if args.quick:  # CI smoke: every method and model once, under 3 minutes on 2 cores
        args.sparsities, args.seeds = [0.8, 0.95], [0]
        args.train_epochs, args.finetune_epochs = 4, 2
        args.threads = 1
    torch.set_num_threads(args.threads)
    args.dataset = "mnist" if args.data_dir else "digits"
    args.batch_size = args.batch_size or (128 if args.data_dir else 32)
    data = mnist(args.data_dir, 0) if args.data_dir else digits(0)
    here = os.path.dirname(os.path.abspath(__file__))
    default = f"compare_{args.dataset}{'_quick' if args.quick else ''}"
    stem = args.out or os.path.join(here, "results", default)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    # --quick is a smoke test: it always runs (never resumes from an earlier .jsonl)
    rec = Recorder(stem + ".jsonl", fresh=args.quick and not args.report_only)
    rec.command = command
    start = time.perf_counter()
    if not args.report_only:
        run_all(args, data, rec)
    commands = list(dict.fromkeys(r["command"] for r in rec.rows if "command" in r)) or [command]
    summary = write_outputs(rec.rows, stem, " ; ".join(commands), vars(args))
    print(summary)
    print(f"wrote {stem}.jsonl/.json/.md/.png in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
